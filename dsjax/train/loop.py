"""`train_and_evaluate(config, workdir)`: the training loop every entry point calls."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from dsjax import data, measure, models, plots, precision
from dsjax.config import base_config, validate, with_model_defaults
from dsjax.errors import CheckpointError, ConfigError
from dsjax.parallel import compression as compression_lib
from dsjax.parallel import distributed, pipeline, sharding
from dsjax.parallel import mesh as parallel_mesh
from dsjax.train import checkpoint, metrics, optim, precision_plan, step, tasks
from dsjax.train.state import TrainState, create_train_state
from dsjax.train.workdir import prepare_workdir

log = logging.getLogger(__name__)

# Config sections that must not change between a run and its resumption: they decide the
# meaning of the checkpointed arrays and of the data position.
_RESUME_INVARIANT = ("seed", "model", "data", "optimizer", "precision")
# Keys of those sections that only change how the step compiles, not what the arrays mean
# (BERT workdirs written when the encoder scan looped by default resume unrolled).
_RESUME_COMPILE_ONLY = {"model": ("scan_unroll",)}


def evaluate(state: TrainState, eval_fn: Any, arrays: dict[str, np.ndarray],
             batch_size: int, mesh: jax.sharding.Mesh | None = None,
             rules: Any = (), microbatches: int = 1) -> dict[str, float]:
  """Mean loss and accuracy (AUC for click prediction) over every example of a split.

  Args:
    state: the train state.
    eval_fn: the jitted `step.make_eval_step(task)`.
    arrays: the split, e.g. `{'image': ..., 'label': ...}`.
    batch_size: examples per eval batch (the last one is padded and masked); rounded up
      to a multiple of the mesh's batch shards times `microbatches`.
    mesh: the device mesh the state lives on; None: the default device.
    rules: logical -> mesh axis rules.
    microbatches: the pipeline micro-batches the model splits a batch into (1: none).

  Returns:
    `{'loss': ..., 'accuracy': ...}` (plus `'auc'` when the task scores examples).
  """
  # A split smaller than a batch is not padded up to a whole one (a 40-sequence split
  # would otherwise cost a 256-sequence forward pass).
  batch_size = min(batch_size, data.num_examples(arrays))
  ways = microbatches * (parallel_mesh.batch_divisor(mesh) if mesh is not None else 1)
  batch_size = -(-batch_size // ways) * ways
  totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
  scores, masks = [], []
  context = sharding.context(mesh, rules) if mesh is not None else contextlib.nullcontext()
  if mesh is not None:
    batch_sharding = sharding.batch_sharding(mesh)
    start, stop = sharding.local_rows(batch_sharding, batch_size)
  with context:
    for index, (batch, mask) in enumerate(data.eval_batches(arrays, batch_size)):
      host_mask = mask
      # Random inputs (MLM masks) follow the example, not the batching: the same loss
      # whatever the batch size, the mesh's rounding of it or the pipeline's.
      batch[tasks.EXAMPLE_INDEX] = np.arange(index * batch_size, (index + 1) * batch_size,
                                             dtype=np.int32)
      if mesh is not None:  # This process's rows (and their mask) as global arrays.
        batch = sharding.global_batch(
            {"mask": mask[start:stop], **{k: v[start:stop] for k, v in batch.items()}},
            batch_sharding, batch_size)
        mask = batch.pop("mask")
      out = jax.device_get(eval_fn(state, batch, mask, jax.random.PRNGKey(0)))
      if "score" in out:
        scores.append(np.asarray(out.pop("score")))
        masks.append(host_mask)
      for key, value in out.items():
        totals[key] += float(value)
  count = max(totals["count"], 1.0)
  result = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct_sum"] / count}
  if scores:
    keep = np.concatenate(masks) > 0
    labels = np.asarray(arrays["label"])
    result["auc"] = measure.roc_auc(labels, np.concatenate(scores)[keep])
  return result


def _check_resumable(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir whose saved config differs in a resume-invariant section."""
  saved = checkpoint.check_resumable(
      workdir, config, _RESUME_INVARIANT, ignore=_RESUME_COMPILE_ONLY,
      defaults=with_model_defaults(base_config(), config.model.name))
  if saved is None:
    return
  saved_steps = saved.get("train", {}).get("steps")
  if (saved_steps != config.train.steps and config.optimizer.schedule == "cosine"
      and not config.optimizer.decay_steps):
    log.warning("train.steps changed from %s to %d and the cosine schedule follows "
                "train.steps: from here the learning rate differs from a fresh %d-step run "
                "(set optimizer.decay_steps to keep one schedule across extensions)",
                saved_steps, config.train.steps, config.train.steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its last checkpoint if there is one.

  Args:
    config: the run's config (validated here).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events, config.json and
      summary.json go.

  Returns:
    The summary: final validation and test metrics, steps, throughput.
  """
  # Joining a multi-process job must precede anything that starts the backend (even
  # validation: the `mixed` preset asks which platform it runs on).
  distributed.initialize(config.distributed)
  validate(config)
  config, pretrained = _apply_init_from(config)
  primary = distributed.is_primary()
  workdir = prepare_workdir(workdir)
  train_cfg = config.train
  mesh = parallel_mesh.make_mesh(config.mesh)
  rules = sharding.config_rules(config.parallel)
  sharding.check_batch(mesh, train_cfg.batch_size // train_cfg.grad_accum_steps,
                       "train.batch_size / train.grad_accum_steps (the micro-batch)",
                       "set the batch size (or the micro-batch count)")

  data_config = config.data.copy_and_resolve_references()
  data_config.cache_dir = data_config.cache_dir or str(workdir)
  dataset = data.get_dataset(data_config)
  policy = precision.get_policy(config.precision.policy)
  spec = models.get_spec(config.model.name)
  if spec.searchable and not config.model.architecture:
    raise ConfigError(f"model {config.model.name} is a DNAS supernet: run dsjax-search first, "
                      "then retrain its result with --architecture W/architecture.json")
  build = _pipelined_builder(spec, config, mesh)
  microbatches = _pipeline_microbatches(config, mesh)
  task = tasks.make_task(spec.task, config.data, dataset.metadata)
  tasks.check_dataset(task, dataset.splits, config.model.name, dataset.name)
  tx, learning_rate_fn = optim.build_optimizer(config.optimizer, train_cfg.steps)
  grad_compression = _grad_compression(config, mesh)
  delayed = bool(config.parallel.delayed_update)

  def make_step(collect_stats: bool, density: float | None,
                compressed: compression_lib.Compression | None = grad_compression):
    return step.make_train_step(
        task, train_cfg.grad_accum_steps, learning_rate_fn, collect_stats=collect_stats,
        half_residuals=config.precision.half_residuals, grad_compression=compressed,
        density=density, delayed_update=delayed, dropout_rng=train_cfg.dropout_rng)

  plans = precision_plan.PlanRuntime(
      config.precision,
      lambda plan, dtype: build(config.model, dataset.num_classes, dtype, plan), make_step,
      task=task, mesh=mesh, rules=rules,
      density_at=(functools.partial(compression_lib.density_at, grad_compression)
                  if grad_compression else None))
  loss_scale = precision.loss_scale_for(policy, **config.precision.loss_scale.to_dict())
  with plans.context():
    state = create_train_state(plans.model(), tx, task.example_batch(dataset.splits["train"]),
                               config.seed, loss_scale, task=task, mesh=mesh, rules=rules,
                               grad_compression=grad_compression, delayed_update=delayed)
  # A circular pipeline keeps the layer stack stage-major; checkpoints and pretrained
  # weights are in the scan layout.
  layout = pipeline.circular_layout(mesh.shape["pipe"], config.parallel.pipeline_repeats)
  if pretrained is not None:
    state = _load_params(state, pretrained if layout is None else layout.from_scan(pretrained),
                         config.train.init_from)
  train_iter = data.BatchIterator(dataset.splits["train"], train_cfg.batch_size,
                                  seed=config.seed)
  batch_sharding = sharding.batch_sharding(mesh)
  # Each process reads only its own rows of every global batch.
  train_iter.rows = sharding.local_rows(batch_sharding, train_cfg.batch_size)

  def global_batch(host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.global_batch(host_batch, batch_sharding, train_cfg.batch_size)

  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints",
                                         max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save,
                                         layout=layout)
  latest = checkpointer.latest_step()
  if latest is not None:
    _check_resumable(workdir, config)
    state, host_state = checkpointer.restore(latest, state)
    train_iter.set_state(host_state["data"])
    plans.load_state_dict(host_state.get("precision"))
    state = plans.bind(state)
    log.info("resuming from step %d", latest)
  start_step = int(state.step)
  if primary:
    metrics.write_json(workdir / "config.json", json.loads(config.to_json()))
  writer = metrics.MetricWriter(workdir, tensorboard=config.logging.tensorboard,
                                resume_step=start_step)

  log.info("mesh %s", parallel_mesh.describe(mesh))
  eval_fn = jax.jit(step.make_eval_step(task), out_shardings=sharding.replicated(mesh))
  compile_start = time.perf_counter()
  memory, collectives, dense_bytes = {}, {}, 0
  if start_step < train_cfg.steps:
    first_batch = global_batch(train_iter.batch(start_step))
    rng = jax.device_put(state.rng, sharding.replicated(mesh))
    density = plans.density(start_step)
    if plans.collects(start_step):  # The controller's statistics variant.
      compiled = plans.compile(state, first_batch, rng, collect_stats=True, density=density)
    if not plans.collects_every_step():  # The plain step (the one memory is reported for).
      compiled = plans.compile(state, first_batch, rng, density=density)
    memory = measure.memory_report(compiled, state.params, state.opt_state)
    collectives = measure.collective_bytes(compiled)
    if grad_compression is not None:
      # The same step with XLA's dense all-reduce, compiled only to read its traffic.
      with plans.context():
        dense = jax.jit(make_step(False, None, None)).lower(state, first_batch, rng).compile()
      dense_bytes = measure.collective_bytes(dense)["total"]
  compile_time = time.perf_counter() - compile_start
  analytic_flops = 0.0  # Per device and step: 3x the forward matmul FLOPs.
  if spec.flops_per_example is not None:
    example = {key: value[:1] for key, value in dataset.splits["train"].items()}
    analytic_flops = (3 * spec.flops_per_example(config.model, dataset.num_classes, example)
                      * train_cfg.batch_size / mesh.size)

  def flops_per_step() -> float:
    # XLA's count misses matmuls that run as library calls (cuBLAS on GPU): prefer the
    # analytic count where the model has one (MaxText's MFU definition).
    return analytic_flops or plans.flops_per_step()

  peak_flops, peak_source = measure.device_peak_flops(
      half_precision=jnp.dtype(policy.compute_dtype) != jnp.float32)
  if memory:
    mib = 2.0**20
    log.info("per device on mesh %s: params %.1f MiB, optimizer %.1f MiB, activations and "
             "temporaries %.1f MiB, peak %.1f MiB; %.3g FLOPs per step (%s), compiled in %.1f s",
             parallel_mesh.describe(mesh), memory["params_bytes"] / mib,
             memory["opt_state_bytes"] / mib, memory["temp_bytes"] / mib,
             memory["peak_bytes"] / mib, flops_per_step(),
             "analytic" if analytic_flops else "XLA", compile_time)

  progress = tqdm.tqdm(total=train_cfg.steps, initial=start_step, unit="step",
                       disable=None if config.logging.progress_bar and primary else True)
  window_start, window_steps, train_time = time.perf_counter(), 0, 0.0
  data_time = host_time = 0.0  # Per logging window: waiting for data, dispatching.
  trace_start = (min(start_step + config.logging.trace_after_steps, train_cfg.steps - 1)
                 if config.logging.trace_dir else None)
  tracing = False
  try:
    for step_index in range(start_step, train_cfg.steps):
      if step_index == trace_start:
        jax.block_until_ready(state)
        jax.profiler.start_trace(config.logging.trace_dir)
        tracing = True
      data_start = time.perf_counter()
      batch = global_batch(next(train_iter))
      host_start = time.perf_counter()
      state, step_metrics = plans.step(state, batch, jax.random.fold_in(state.rng, step_index),
                                       step_index)
      done = step_index + 1
      state = plans.after_step(done, state, step_metrics, batch)
      if tracing and done == train_cfg.steps:  # Training steps only, not the evaluation.
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
      data_time += host_start - data_start
      host_time += time.perf_counter() - host_start
      window_steps += 1
      progress.update(1)
      is_last = done == train_cfg.steps
      is_eval = done % train_cfg.eval_every_steps == 0 or is_last
      if done % train_cfg.log_every_steps == 0 or is_eval:
        record = {**jax.device_get(step_metrics), **plans.log_fields()}
        elapsed = time.perf_counter() - window_start
        train_time += elapsed
        record["examples_per_sec"] = window_steps * train_cfg.batch_size / elapsed
        record["steps_per_sec"] = window_steps / elapsed
        record["comm_bytes"] = plans.comm_bytes()
        record["comm_bytes_dense"] = dense_bytes or record["comm_bytes"]
        record.update(_throughput(flops_per_step(), elapsed / window_steps, peak_flops,
                                  data_time / window_steps, host_time / window_steps))
        if done == window_steps + start_step:
          record["compile_time_s"] = compile_time
        if is_eval and dataset.splits.get("val") and data.num_examples(dataset.splits["val"]):
          val = evaluate(state, eval_fn, dataset.splits["val"], train_cfg.eval_batch_size,
                         mesh, rules, microbatches)
          record.update({f"eval_{key}": value for key, value in val.items()})
        writer.write(done, record)
        progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
        window_start, window_steps, data_time, host_time = time.perf_counter(), 0, 0.0, 0.0
      if done % config.checkpoint.every_steps == 0 or is_last:
        save_start = time.perf_counter()
        checkpointer.save(done, state, {"data": train_iter.get_state(),
                                        "precision": plans.state_dict()})
        window_start += time.perf_counter() - save_start  # Saving is not training time.
    checkpointer.wait()
  finally:
    if tracing:
      jax.profiler.stop_trace()
    progress.close()
    checkpointer.close()

  summary: dict[str, Any] = {"steps": int(state.step), "compile_time_s": compile_time,
                             "mesh": dict(mesh.shape), "processes": jax.process_count(),
                             "flops_per_step": flops_per_step(),
                             "flops_per_step_xla": plans.flops_per_step(),
                             "flops_source": "analytic" if analytic_flops else "xla",
                             "peak_flops": peak_flops, "peak_flops_source": peak_source}
  if memory:
    summary["memory"], summary["collective_bytes"] = memory, collectives
    summary["comm_bytes"] = plans.comm_bytes() or int(collectives["total"])  # Last step's.
    summary["comm_bytes_dense"] = int(dense_bytes or summary["comm_bytes"])
  if train_time > 0:
    summary["train_time_s"] = train_time
  for split, prefix in (("val", "eval"), ("test", "test")):
    if dataset.splits.get(split) and data.num_examples(dataset.splits[split]):
      result = evaluate(state, eval_fn, dataset.splits[split], train_cfg.eval_batch_size,
                        mesh, rules, microbatches)
      summary.update({f"{prefix}_{key}": value for key, value in result.items()})
  log.info("final: %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                  if isinstance(v, int | float)))
  writer.close()
  if primary:
    metrics.write_json(workdir / "summary.json", summary)
    if config.logging.plots:
      plots.write_plots(workdir)
  return summary


def _grad_compression(config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> compression_lib.Compression | None:
  """The configured gradient compression; None for XLA's dense all-reduce."""
  compressed = compression_lib.parse_compression(config.parallel.grad_compression)
  if compressed.mode == "none":
    return None
  others = {axis: mesh.shape[axis] for axis in ("pipe", "fsdp", "model") if mesh.shape[axis] > 1}
  if others:
    raise ConfigError(f"parallel.grad_compression={config.parallel.grad_compression} compresses "
                      "the data-parallel exchange only, but the mesh also has "
                      f"{', '.join(f'{k}={v}' for k, v in others.items())}; use a "
                      "data-only mesh (e.g. --mesh data=-1)")
  return compressed


def _apply_init_from(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads `train.init_from`: the checkpoint's model sizes and vocabulary replace the
  config's (a copy), so the model built is the pretrained one.

  Returns:
    `(config, pretrained params or None)`.
  """
  path = config.train.init_from
  if not path:
    return config, None
  spec = models.get_spec(config.model.name)
  if spec.load_pretrained is None:
    loadable = [name for name in models.known_models() if models.get_spec(name).load_pretrained]
    raise ConfigError(f"--init-from: model {spec.name} has no pretrained format; models that "
                      f"load one: {', '.join(loadable)}")
  fields, params, vocab_file = spec.load_pretrained(path)
  config = config.copy_and_resolve_references()
  changed = {key: value for key, value in fields.items() if config.model.get(key) != value}
  if changed:
    log.info("--init-from %s: model %s", path,
             ", ".join(f"{key}={value}" for key, value in changed.items()))
  config.model.update(fields)
  if not config.data.get("vocab_file") and "vocab_file" in config.data:
    if vocab_file is None:
      raise ConfigError(f"--init-from {path}: the folder has no vocab.txt, and the model's "
                        "token ids mean nothing without it; set --config.data.vocab_file")
    config.data.vocab_file = vocab_file
  validate(config)
  return config, params


def _load_params(state: TrainState, params: Any, path: str) -> TrainState:
  """Puts pretrained params into a fresh state, in the state's shardings."""
  want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), state.params)
  got = jax.tree.map(lambda x: (tuple(x.shape), str(np.asarray(x).dtype)), params)
  if want != got:
    raise CheckpointError(f"--init-from {path}: the checkpoint's parameters do not match the "
                          "model (different vocabulary or sizes); use the checkpoint's own "
                          "vocab.txt as data.vocab_file")
  shardings = jax.tree.map(lambda x: x.sharding, state.params)
  return state.replace(params=jax.device_put(params, shardings))


def _pipeline_microbatches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """How many micro-batches a pipelined model splits each batch into (1: no pipeline)."""
  stages = mesh.shape["pipe"]
  return 1 if stages == 1 else config.parallel.microbatches or 2 * stages


def _pipelined_builder(spec: models.ModelSpec, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> Any:
  """The model builder, with the layer stack split into `mesh.pipe` stages."""
  stages = mesh.shape["pipe"]
  if stages == 1:
    return spec.build
  if not spec.pipelined:
    pipelined = [name for name in models.known_models() if models.get_spec(name).pipelined]
    raise ConfigError(f"mesh pipe={stages}, but model {spec.name} has no layer stack to split "
                      f"into pipeline stages; use pipe=1 (pipelined models: "
                      f"{', '.join(pipelined)})")
  microbatches = _pipeline_microbatches(config, mesh)
  micro_batch = config.train.batch_size // config.train.grad_accum_steps
  if micro_batch % microbatches:
    raise ConfigError(f"the micro-batch of {micro_batch} examples (train.batch_size / "
                      f"grad_accum_steps) does not split into parallel.microbatches="
                      f"{microbatches} pipeline micro-batches; pick a count that divides "
                      f"{micro_batch}")
  layers = config.model.get("num_layers", stages)
  if layers % stages:
    raise ConfigError(f"model.num_layers={layers} does not split into mesh pipe={stages} "
                      "pipeline stages; use a pipe size that divides the layer count")
  repeats = config.parallel.pipeline_repeats
  if repeats > 1 and layers % (stages * repeats):
    raise ConfigError(f"model.num_layers={layers} does not split into mesh pipe={stages} "
                      f"stages x parallel.pipeline_repeats={repeats}; use repeats that divide "
                      f"{layers // stages}")
  if repeats > 1 and microbatches < stages:
    raise ConfigError(f"a circular pipeline (parallel.pipeline_repeats={repeats}) needs "
                      f"parallel.microbatches >= mesh pipe={stages}, got {microbatches}")

  def build(*args: Any) -> Any:
    return spec.build(*args).clone(num_stages=stages, num_microbatches=microbatches,
                                   num_repeats=repeats)
  return build



def _throughput(flops_per_step: float, step_seconds: float, peak_flops: float,
                data_seconds: float, host_seconds: float) -> dict[str, float]:
  """Per-step FLOP rate, MFU, and where the step's wall time went (milliseconds).

  `device_ms` is what neither the data iterator nor the host-side dispatch took: device
  compute plus any wait for it (dispatch is asynchronous, so it overlaps).
  """
  return {
      "tflops_per_device": flops_per_step / step_seconds / 1e12 if step_seconds else 0.0,
      "mfu": measure.mfu(flops_per_step, step_seconds, peak_flops),
      "step_ms": step_seconds * 1e3,
      "data_wait_ms": data_seconds * 1e3,
      "host_ms": host_seconds * 1e3,
      "device_ms": max(step_seconds - data_seconds - host_seconds, 0.0) * 1e3,
  }
