"""`dsjax-search`: a DNAS search through the trainer's loop, from config to
`architecture.json`.

The search is a training run whose step is the bilevel one (`step.make_search_step`): the
training split is halved (DARTS), the weights learn on one half and the architecture on
the other, so the architecture is chosen by how well it generalises. It runs on any mesh
and under any precision policy (loss scaling, the per-layer precision controller), with
the state, `arch` included, born sharded, checkpointed and resumed like a training run's.
At the end the logits are derived to a discrete architecture that `dsjax-train` retrains
from scratch (`--config.model.architecture=W/architecture.json`).

Rerunning on the same workdir resumes from the newest checkpoint and continues exactly as
an uninterrupted search would; workdirs of searches from before the search ran in the
trainer restore too.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsjax import measure, nas, plots
from dsjax.data import lazy
from dsjax.data.dataset import BatchIterator, split_train_val
from dsjax.errors import ConfigError
from dsjax.parallel import distributed, sharding
from dsjax.train import loop as loop_lib
from dsjax.train import metrics, optim, step
from dsjax.train.resolve import RunPlan
from dsjax.train.state import create_train_state

log = logging.getLogger(__name__)


def _temperature(search_config: ml_collections.ConfigDict) -> optax.Schedule:
  start, end = search_config.temperature_start, search_config.temperature_end
  return optax.linear_schedule(start, end, max(search_config.steps, 1))


def _logged_losses(path: Path, until: int) -> dict[str, float]:
  """Returns the train/val losses of the last record at or before step `until`.

  Args:
    path: metrics.jsonl.
    until: the last step to consider.

  Returns:
    `{"train_loss": ..., "val_loss": ...}`, or fewer keys if they were not logged.
  """
  losses: dict[str, float] = {}
  if not path.exists():
    return losses
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    step_number = record.get("step") if isinstance(record, dict) else None
    if isinstance(step_number, int) and step_number <= until:
      losses = {k: float(v) for k, v in record.items()
                if k in ("train_loss", "val_loss") and v is not None}
  return losses


def search_architecture(config: ml_collections.ConfigDict, workdir: str | Path, *,
                        stop_after: int | None = None) -> dict[str, Any]:
  """Runs the bilevel search of a DNAS config and writes `workdir/architecture.json`.

  The search resumes from the newest checkpoint in `workdir/checkpoints` if there is one:
  the state (weights, architecture logits, both optimizer states, loss scale, step) and
  both data positions are restored, so the remaining steps see the same batches, the same
  per-step randomness and the same temperature/auxiliary-skip schedules as an
  uninterrupted search. metrics.jsonl keeps the records up to that checkpoint and appends
  the rest. If the checkpoint is already at or past `search.steps`, no step runs and the
  outputs are derived from it.

  Args:
    config: a config whose model is a DNAS supernet (`model.architecture` empty).
    workdir: where checkpoints, architecture.json, probabilities.txt, metrics.jsonl,
      TensorBoard events, config.json and summary.json go.
    stop_after: stop once the search has taken this many steps in total (counting those
      of the checkpoint it resumed from), save a checkpoint there and return without
      deriving an architecture or writing summary.json; rerunning on the workdir goes on
      from there. For pre-emption drills and tests. None (or a value >= search.steps):
      run the whole search.

  Returns:
    The summary: derived architecture's path, FLOPs, params and depth, the search's
    final step count (`steps`), the step this invocation started from (`start_step`),
    the last logged train/val losses, the mesh, and `search_time_s`, the wall time of
    this invocation's steps only. With `stop_after`, `{"stopped_at": step, "start_step":
    ..., "search_time_s": ...}` and no architecture.

  Raises:
    ConfigError: the config is not a searchable one, or `stop_after` < 1.
    CheckpointError: the workdir's checkpoint is corrupt or belongs to a different
      config (another search space, model, data...); nothing in it is changed.
  """
  if stop_after is not None and stop_after < 1:
    raise ConfigError(f"stop_after must be >= 1 (a total step count), got {stop_after}")
  plan, workdir, checkpointer = loop_lib.open_run(config, workdir, search=True)
  try:
    return _search(plan, workdir, checkpointer, stop_after)
  finally:
    checkpointer.close()


def _search(plan: RunPlan, workdir: Path, checkpointer: Any,
            stop_after: int | None) -> dict[str, Any]:
  """The body of `search_architecture`, with the checkpointer open (see there)."""
  config, mesh, rules = plan.config, plan.mesh, plan.rules
  search_config, search_space = config.search, plan.search_space
  dataset, task = loop_lib.load_dataset(plan, workdir)
  train_split = dataset.splits["train"]
  examples = len(next(iter(train_split.values())))
  # A seed apart from the train/val split's, so the halves do not mirror that split.
  arch_idx, weight_idx = split_train_val(examples, examples // 2, [config.data.split_seed, 7])
  # Lazy splits (prepared shards, image folders) stay on disk: each batch reads its rows.
  halves = {"train": lazy.take(train_split, weight_idx), "val": lazy.take(train_split, arch_idx)}
  batch_size = config.train.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  iterators = {"train_data": BatchIterator(halves["train"], batch_size, seed=config.seed),
               "val_data": BatchIterator(halves["val"], batch_size, seed=config.seed + 1)}
  for iterator in iterators.values():  # Each process reads only its own rows.
    iterator.rows = sharding.local_rows(batch_sharding, batch_size)

  def next_batch() -> dict[str, Any]:
    return {half: sharding.global_batch(next(iterators[f"{half}_data"]), batch_sharding,
                                        batch_size) for half in ("train", "val")}

  penalty = nas.make_arch_penalty(
      search_space, dataset.input_shape, dataset.num_classes,
      target_flops=config.resource.target_flops, target_params=config.resource.target_params,
      target_bitops=config.resource.target_bitops,
      target_model_bytes=config.resource.target_model_bytes,
      resource_weight=config.resource.penalty_weight,
      param_free_weight=search_config.param_free_weight)
  aux_skip = (optax.linear_schedule(search_config.aux_skip, 0.0, plan.steps)
              if search_config.aux_skip > 0 else None)

  def make_step(collect_stats: bool, density: float | None) -> Any:
    del density  # Refused by resolve: the search exchanges gradients densely.
    # Temperature, auxiliary skip, warm-up and the per-step key all derive from
    # `state.step` inside the step, so a restored state continues them where it left off.
    return step.make_search_step(
        task, order=search_config.order,
        unroll_lr=search_config.unroll_lr or config.optimizer.learning_rate,
        warmup_steps=search_config.warmup_steps, temperature_fn=_temperature(search_config),
        aux_skip_fn=aux_skip, arch_penalty_fn=penalty, collect_stats=collect_stats,
        half_residuals=config.precision.half_residuals)

  cache = step.StepCache(make_step, functools.partial(plan.build_model, dataset.num_classes),
                         plan.policy.compute_dtype, mesh, rules)
  control = loop_lib.PrecisionControl(plan, cache, task)
  weight_tx, _ = optim.build_optimizer(config.optimizer, plan.steps)
  arch_tx = nas.arch_optimizer(search_config.arch_learning_rate,
                               search_config.arch_weight_decay)
  with cache.context():
    state = create_train_state(cache.model(control.plan), weight_tx,
                               task.example_batch(train_split), config.seed, plan.loss_scale,
                               task=task, mesh=mesh, rules=rules, arch_tx=arch_tx,
                               policy=plan.policy)
  seed_key = jax.random.PRNGKey(config.seed)  # Constant: the step folds in its own counter.
  program = loop_lib.Program(
      make_step=make_step, iterators=iterators, next_batch=next_batch,
      step_rng=lambda state, step_index: seed_key,
      # Searches checkpointed before the search ran in the trainer named the weight
      # optimizer's state `weight_opt_state` and had no loss scale.
      restore_aliases={"opt_state": "weight_opt_state"}, fresh_if_missing=("loss_scale",),
      record=lambda state: nas.flat_probabilities(jax.device_get(state.arch), search_space))
  loop = loop_lib.start_loop(plan, workdir, program, state, cache, control, checkpointer,
                             stop_after=stop_after)
  compile_start = time.perf_counter()
  if loop.start < loop.end:
    loop_lib.compile_first(loop, {half: sharding.global_batch(
        iterators[f"{half}_data"].batch(loop.start), batch_sharding, batch_size)
        for half in ("train", "val")})
  loop.compile_time = time.perf_counter() - compile_start

  peak_flops, _ = measure.device_peak_flops(
      half_precision=jnp.dtype(plan.policy.compute_dtype) != jnp.float32)

  def log_metrics(loop: loop_lib.Loop) -> None:
    # Logged on the regular schedule only (not at `stop_after`), so a stopped and
    # resumed search logs the same steps as an uninterrupted one.
    # Records are the same keys whether or not this invocation resumed: the compile
    # time goes into the summary.
    loop.record = loop_lib.window_record(loop, cache.flops(), peak_flops)
    loop.record.pop("compile_time_s", None)
    loop.writer.write(loop.done, loop.record)

  hooks = [loop_lib.Hook("metrics", log_metrics, (config.train.log_every_steps,)),
           loop_lib.Hook("checkpoint", loop_lib.save_checkpoint,
                         (config.checkpoint.every_steps,), at_stop=True)]
  start = time.perf_counter()
  try:
    loop_lib.run_loop(loop, hooks,
                      progress_bar=config.logging.progress_bar and distributed.is_primary())
  finally:
    loop.writer.close()
  search_time = time.perf_counter() - start
  state, final_step = loop.state, int(loop.state.step)
  if final_step < plan.steps:  # Stopped early by `stop_after`.
    log.info("search stopped at step %d of %d; rerun on %s to resume", final_step, plan.steps,
             workdir)
    return {"stopped_at": final_step, "start_step": loop.start, "search_time_s": search_time}

  record = loop.record
  losses = ({k: float(v) for k, v in record.items() if k in ("train_loss", "val_loss")}
            if record else _logged_losses(loop.writer.path, final_step))
  arch = jax.device_get(state.arch)
  architecture = nas.derive(arch, search_space, input_shape=dataset.input_shape,
                            num_classes=dataset.num_classes)
  summary = {"steps": final_step, "start_step": loop.start, "search_time_s": search_time,
             "compile_time_s": loop.compile_time,
             "flops": architecture["flops"], "params": architecture["params"],
             "depth": architecture["depth"], "mesh": dict(mesh.shape),
             **{k: architecture[k] for k in ("bitops", "model_bytes") if k in architecture},
             "processes": jax.process_count(), "precision": config.precision.policy,
             "skipped_steps": int(state.loss_scale.skipped_steps), **losses}
  if distributed.is_primary():
    summary["architecture"] = nas.save_architecture(str(workdir), architecture)
    table = nas.format_probabilities(arch, search_space)
    (workdir / "probabilities.txt").write_text(table + "\n")
    metrics.write_json(workdir / "summary.json", summary)
    if config.logging.plots:
      plots.write_plots(workdir)
  return summary
