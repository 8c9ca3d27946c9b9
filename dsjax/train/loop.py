"""The one loop every run goes through: `run_loop` steps a program and runs its hooks.

`train_and_evaluate(config, workdir)` trains; `dsjax.train.search.search_architecture`
searches an architecture. Both resolve the config first (`dsjax.train.resolve`: every
check before data loads), build a state (born sharded on the mesh) and a `Program` (a step
builder and the batches it reads), and hand them to `run_loop`, which owns what every run
shares: the step cache (one compiled step per precision plan), resume from the newest
checkpoint, the progress bar, the profiler trace, and the hooks that run every N steps
(metrics and evaluation, the precision controller, checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from dsjax import data, measure, nas, plots
from dsjax.config import base_config, with_model_defaults
from dsjax.models import layer_stack
from dsjax.parallel import compression as compression_lib
from dsjax.parallel import distributed, sharding
from dsjax.parallel import mesh as parallel_mesh
from dsjax.precision import adaptive
from dsjax.train import checkpoint, evaluation, metrics, optim, step, tasks
from dsjax.train.resolve import RunPlan, check_pretrained, resolve
from dsjax.train.state import TrainState, create_train_state
from dsjax.train.workdir import prepare_workdir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Hook:
  """Periodic work of the loop: `fn(loop)` after every step a multiple of `every`.

  Attributes:
    name: what it does (for errors and logs).
    fn: `fn(loop)`; it reads and may replace `loop.state`.
    every: step intervals; the hook is due after step s when any divides s.
    at_end: also due after the run's last step.
    at_stop: also due after the last step of this invocation (`stop_after`).
    reads_norms: reads the step's parameter norms (`grad_norm`, ...): the steps after
      which it is due compute them, the others skip that work.
  """

  name: str
  fn: Callable[[Loop], None]
  every: tuple[int, ...]
  at_end: bool = True
  at_stop: bool = False
  reads_norms: bool = False

  def due(self, done: int, steps: int, end: int) -> bool:
    return (any(done % every == 0 for every in self.every) or (self.at_end and done == steps)
            or (self.at_stop and done == end))


@dataclasses.dataclass
class Program:
  """What the loop steps: a step builder and the batches it reads.

  Attributes:
    make_step: `make_step(collect_stats, density) -> step(state, batch, rng)`.
    iterators: host-state key -> batch iterator; their positions go into checkpoints.
    next_batch: the next step's global batch (advances the iterators).
    step_rng: `step_rng(state, step_index)`: the key step `step_index` gets.
    density_at: `step -> density` of compressed exchange during its warm-up; None: none.
    restore_aliases: checkpoint field aliases of older workdirs (`Checkpointer.restore`).
    fresh_if_missing: state fields older checkpoints lack that start fresh.
    record: extra fields for each metrics record, from the state.
  """

  make_step: Callable[[bool, float | None], Callable[..., Any]]
  iterators: dict[str, Any]
  next_batch: Callable[[], Any]
  step_rng: Callable[[TrainState, int], jax.Array]
  density_at: Callable[[int], float | None] | None = None
  restore_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  fresh_if_missing: Sequence[str] = ()
  record: Callable[[TrainState], dict[str, Any]] = lambda state: {}


class PrecisionControl:
  """Drives the adaptive precision controller (`dsjax.precision.adaptive`) from the loop.

  Decides which steps return the layers' statistics (every `check_every_steps`-th, and
  the first), feeds them (and, every `error_check_every_steps`, a float32 error probe) to
  the controller, and rebinds the state to the controller's new plan.

  Args:
    plan: the run plan.
    cache: the step cache (models per plan).
    task: the task, for the error probe's inputs.
  """

  def __init__(self, plan: RunPlan, cache: step.StepCache, task: tasks.Task):
    self.compute_dtype = plan.policy.compute_dtype
    self.controller = None
    self._cache, self._task, self._mesh = cache, task, plan.mesh
    if plan.controller:
      knobs = plan.config.precision.controller
      self.controller = adaptive.PrecisionController(
          self.compute_dtype, overflow_fraction=knobs.overflow_fraction,
          error_tolerance=knobs.error_tolerance, demote_fraction=knobs.demote_fraction,
          stable_checks=knobs.stable_checks)
      self.check_every = knobs.check_every_steps
      self.error_check_every = knobs.error_check_every_steps
    self._matmul_flops: dict[str, float] | None = None
    self._probes: dict[Any, Any] = {}
    self._fp32_model = None

  @property
  def plan(self) -> Any:
    return self.controller.plan if self.controller else None

  def collects(self, step_index: int) -> bool:
    """Whether step `step_index` (0-based) returns layer statistics for the controller."""
    if self.controller is None:
      return False
    return self._matmul_flops is None or (step_index + 1) % self.check_every == 0

  def collects_every_step(self) -> bool:
    """Whether every step returns statistics (then the plain step is never compiled)."""
    return self.controller is not None and self.check_every == 1

  def observe(self, loop: Loop) -> None:
    """The controller's hook: feeds a check step's statistics, rebinds on a new plan."""
    stats = loop.step_metrics.pop("precision_stats", None)
    if self.controller is None or stats is None:
      return
    done = loop.done
    if done % self.check_every and self._matmul_flops is not None:
      return
    stats = jax.device_get(stats)
    self._matmul_flops = {path: float(record["matmul_flops"]) for path, record in stats.items()}
    errors = None
    if done % self.error_check_every == 0:
      with self._cache.context():
        errors = jax.device_get(self._probe()(loop.state, loop.probe_batch()))
    events_before = len(self.controller.events)
    if self.controller.observe(done, stats, errors):
      for event in self.controller.events[events_before:]:
        log.info("precision plan: %s", event)
      loop.state = self._cache.bind(loop.state, self.plan)

  def _probe(self) -> Any:
    if self.plan not in self._probes:
      if self._fp32_model is None:
        self._fp32_model = self._cache.build_fp32()
      self._probes[self.plan] = step.make_error_probe(
          self._task, self._cache.model(self.plan), self._fp32_model, self._mesh)
    return self._probes[self.plan]

  def log_fields(self) -> dict[str, Any]:
    """Plan metrics for metrics.jsonl: half-precision share of matmul FLOPs, promotions."""
    if jnp.dtype(self.compute_dtype) == jnp.float32:
      fraction = 0.0
    elif self.plan is None or not self._matmul_flops:
      fraction = 1.0
    else:
      fraction = adaptive.half_matmul_fraction(self.plan, self._matmul_flops, self.compute_dtype)
    return {"fp16_matmul_flops_fraction": fraction,
            "promoted_layers": len(self.plan.promoted()) if self.plan else 0}

  def state_dict(self) -> dict[str, Any] | None:
    return self.controller.state_dict() if self.controller else None

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    if self.controller and state:
      self.controller.load_state_dict(state)


@dataclasses.dataclass
class Loop:
  """The loop's state, as hooks see it.

  Attributes:
    plan: the run plan.
    program: what is stepped.
    cache: the compiled steps.
    precision: the precision controller's driver.
    checkpointer: the run's checkpointer.
    writer: metrics.jsonl / TensorBoard.
    state: the train state after the latest step.
    done: steps taken (the latest step's number).
    step_metrics: the latest step's metrics (device arrays).
    batch: the latest step's global batch.
    steps: the run's step count.
    end: the last step of this invocation.
    start: the step this invocation started from.
    compile_time: seconds spent compiling before the first step.
    window_start, window_steps, data_time, host_time: the current logging window.
    train_time: seconds of training steps logged so far.
    record: the latest metrics record.
  """

  plan: RunPlan
  program: Program
  cache: step.StepCache
  precision: PrecisionControl
  checkpointer: checkpoint.Checkpointer
  writer: metrics.MetricWriter
  state: TrainState
  steps: int
  end: int
  start: int
  done: int = 0
  step_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  batch: Any = None
  compile_time: float = 0.0
  window_start: float = 0.0
  window_steps: int = 0
  data_time: float = 0.0
  host_time: float = 0.0
  train_time: float = 0.0
  record: dict[str, Any] = dataclasses.field(default_factory=dict)

  def probe_batch(self) -> Any:
    """The batch the precision probe measures on (a search's training half)."""
    return self.batch["train"] if self.plan.search else self.batch

  def host_state(self) -> dict[str, Any]:
    return {**{key: it.get_state() for key, it in self.program.iterators.items()},
            "precision": self.precision.state_dict()}


def save_checkpoint(loop: Loop) -> None:
  """The checkpoint hook: saves the state and the host state (data positions, plan)."""
  save_start = time.perf_counter()
  loop.checkpointer.save(loop.done, loop.state, loop.host_state())
  loop.window_start += time.perf_counter() - save_start  # Saving is not training time.


def window_record(loop: Loop, flops_per_step: float, peak_flops: float) -> dict[str, Any]:
  """The metrics record of the logging window that ends now (and resets the window)."""
  record = {**jax.device_get(loop.step_metrics), **loop.precision.log_fields(),
            **loop.program.record(loop.state)}
  elapsed = time.perf_counter() - loop.window_start
  loop.train_time += elapsed
  steps = loop.window_steps
  record["examples_per_sec"] = steps * loop.plan.config.train.batch_size / elapsed
  record["steps_per_sec"] = steps / elapsed
  record.update(_throughput(flops_per_step, elapsed / steps, peak_flops,
                            loop.data_time / steps, loop.host_time / steps))
  if loop.done == steps + loop.start:
    record["compile_time_s"] = loop.compile_time
  loop.window_start, loop.window_steps = time.perf_counter(), 0
  loop.data_time = loop.host_time = 0.0
  return record


def run_loop(loop: Loop, hooks: Sequence[Hook], *, progress_bar: bool) -> None:
  """Takes steps `loop.start` .. `loop.end` and runs each hook when due.

  A profiler trace (`logging.trace_dir`) covers training steps from
  `logging.trace_after_steps` on, not the hooks' evaluation after the last step.
  """
  config = loop.plan.config
  progress = tqdm.tqdm(total=loop.steps, initial=min(loop.start, loop.steps), unit="step",
                       disable=None if progress_bar else True)
  trace_start = (min(loop.start + config.logging.trace_after_steps, loop.steps - 1)
                 if config.logging.trace_dir else None)
  density_at = loop.program.density_at or (lambda step_index: None)
  tracing = False
  loop.window_start = time.perf_counter()
  try:
    for step_index in range(loop.start, loop.end):
      if step_index == trace_start:
        jax.block_until_ready(loop.state)
        jax.profiler.start_trace(config.logging.trace_dir)
        tracing = True
      data_start = time.perf_counter()
      batch = loop.program.next_batch()
      host_start = time.perf_counter()
      with_norms = any(hook.reads_norms and hook.due(step_index + 1, loop.steps, loop.end)
                       for hook in hooks)
      loop.state, loop.step_metrics = loop.cache.run(
          loop.state, batch, loop.program.step_rng(loop.state, step_index),
          plan=loop.precision.plan, collect_stats=loop.precision.collects(step_index),
          density=density_at(step_index), with_norms=with_norms)
      loop.batch, loop.done = batch, step_index + 1
      loop.precision.observe(loop)
      if tracing and loop.done == loop.steps:  # Training steps only, not the evaluation.
        jax.block_until_ready(loop.state)
        jax.profiler.stop_trace()
        tracing = False
      loop.data_time += host_start - data_start
      loop.host_time += time.perf_counter() - host_start
      loop.window_steps += 1
      progress.update(1)
      for hook in hooks:
        if hook.due(loop.done, loop.steps, loop.end):
          hook.fn(loop)
      if loop.record:
        progress.set_postfix({key: f"{loop.record[key]:.4f}" for key in ("loss", "val_loss")
                              if key in loop.record})
    loop.checkpointer.wait()
  finally:
    if tracing:
      jax.profiler.stop_trace()
    progress.close()


def start_loop(plan: RunPlan, workdir: Path, program: Program, state: TrainState,
               cache: step.StepCache, precision_control: PrecisionControl,
               checkpointer: checkpoint.Checkpointer, *, stop_after: int | None = None
               ) -> Loop:
  """Resumes `state` from the newest checkpoint (if any) and compiles the first step.

  Returns:
    The loop, ready for `run_loop`.
  """
  latest = checkpointer.latest_step()
  if latest is not None:
    state, host_state = checkpointer.restore(latest, state, aliases=program.restore_aliases,
                                             fresh_if_missing=program.fresh_if_missing)
    for key, iterator in program.iterators.items():
      iterator.set_state(host_state[key])
    precision_state = host_state.get("precision")
    if precision_state and plan.spec.param_layout is not None and plan.pipeline.stages == 1:
      # A plan saved with the layers stacked names `layers`, one saved with them apart
      # `layers_{i}`: this run's layout decides (the setting may change on resume).
      precision_state = layer_stack.precision_state_for(
          precision_state, plan.config.model.num_layers, stacked=plan.layout is None)
    precision_control.load_state_dict(precision_state)
    state = cache.bind(state, precision_control.plan)
    log.info("resuming the search from step %d" if plan.search else "resuming from step %d",
             latest)
  start = int(state.step)
  end = plan.steps if stop_after is None else min(stop_after, plan.steps)
  if distributed.is_primary():
    metrics.write_json(workdir / "config.json", json.loads(plan.config.to_json()))
  writer = metrics.MetricWriter(workdir, tensorboard=plan.config.logging.tensorboard,
                                resume_step=start)
  return Loop(plan=plan, program=program, cache=cache, precision=precision_control,
              checkpointer=checkpointer, writer=writer, state=state, steps=plan.steps,
              end=end, start=start)


def compile_first(loop: Loop, first_batch: Any) -> Any:
  """Compiles the steps the run will take first (the controller's statistics variant and
  the plain one), so the loop's timings exclude compilation.

  Returns:
    The compiled plain step (the one memory is reported for).
  """
  state, cache, control = loop.state, loop.cache, loop.precision
  rng = jax.device_put(loop.program.step_rng(state, loop.start),
                       sharding.replicated(loop.plan.mesh))
  density = (loop.program.density_at or (lambda step_index: None))(loop.start)
  compiled = None
  if control.collects(loop.start):
    compiled = cache.compile(state, first_batch, rng, plan=control.plan, collect_stats=True,
                             density=density)
  if not control.collects_every_step():
    compiled = cache.compile(state, first_batch, rng, plan=control.plan, density=density)
  return compiled


def check_resumable(plan: RunPlan, workdir: Path) -> None:
  """Refuses to resume a workdir whose saved config differs in a resume-invariant section
  (before any data loads); warns when a changed step count changes the schedule."""
  config = plan.config
  saved = checkpoint.check_resumable(
      workdir, config, plan.resume_sections, ignore=plan.resume_ignore,
      defaults=with_model_defaults(base_config(), config.model.name))
  if saved is None:
    return
  section = "search" if plan.search else "train"
  saved_steps = saved.get(section, {}).get("steps")
  if saved_steps is None or saved_steps == plan.steps:
    return
  if plan.search:
    log.warning("search.steps changed from %s to %d: the temperature, auxiliary-skip and "
                "learning-rate schedules follow search.steps, so from here the search differs "
                "from a fresh %d-step one", saved_steps, plan.steps, plan.steps)
  elif config.optimizer.schedule == "cosine" and not config.optimizer.decay_steps:
    log.warning("train.steps changed from %s to %d and the cosine schedule follows "
                "train.steps: from here the learning rate differs from a fresh %d-step run "
                "(set optimizer.decay_steps to keep one schedule across extensions)",
                saved_steps, plan.steps, plan.steps)


def open_run(config: ml_collections.ConfigDict, workdir: str | Path, *, search: bool = False
             ) -> tuple[RunPlan, Path, checkpoint.Checkpointer]:
  """Joins the job, resolves the config and opens the workdir and its checkpoints, all
  before any data loads: a config that cannot run, or cannot resume this workdir, fails
  here.

  Returns:
    `(plan, workdir, checkpointer)`; the caller closes the checkpointer.
  """
  # Joining a multi-process job must precede anything that starts the backend (even
  # resolving: the `mixed` preset asks which platform it runs on).
  distributed.initialize(config.distributed)
  plan = resolve(config, search=search)
  workdir = prepare_workdir(workdir)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints",
                                         max_to_keep=plan.config.checkpoint.max_to_keep,
                                         async_save=plan.config.checkpoint.async_save,
                                         layout=plan.layout)
  try:
    if checkpointer.latest_step() is not None:
      check_resumable(plan, workdir)
  except BaseException:
    checkpointer.close()
    raise
  return plan, workdir, checkpointer


def load_dataset(plan: RunPlan, workdir: Path) -> tuple[data.Dataset, tasks.Task]:
  """The run's dataset and task (the task checked against what the dataset provides)."""
  data_config = plan.config.data.copy_and_resolve_references()
  data_config.cache_dir = data_config.cache_dir or str(workdir)
  dataset = data.get_dataset(data_config)
  task = tasks.make_task(plan.spec.task, plan.config.data, dataset.metadata)
  tasks.check_dataset(task, dataset.splits, plan.config.model.name, dataset.name)
  return dataset, task


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its last checkpoint if there is one.

  Args:
    config: the run's config (resolved and checked here, before any data loads).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events, config.json and
      summary.json go.

  Returns:
    The summary: final validation and test metrics, steps, throughput.
  """
  plan, workdir, checkpointer = open_run(config, workdir)
  try:
    return _train(plan, workdir, checkpointer)
  finally:
    checkpointer.close()


def _train(plan: RunPlan, workdir: Path, checkpointer: checkpoint.Checkpointer
           ) -> dict[str, Any]:
  config, mesh, rules = plan.config, plan.mesh, plan.rules
  train_cfg = config.train
  dataset, task = load_dataset(plan, workdir)
  tx, learning_rate_fn = optim.build_optimizer(config.optimizer, plan.steps)
  compressed, delayed = plan.compression, plan.delayed_update

  def make_step(collect_stats: bool, density: float | None) -> Callable[..., Any]:
    return step.make_train_step(
        task, train_cfg.grad_accum_steps, learning_rate_fn, collect_stats=collect_stats,
        half_residuals=config.precision.half_residuals, grad_compression=compressed,
        density=density, delayed_update=delayed, dropout_rng=train_cfg.dropout_rng)

  cache = step.StepCache(make_step, functools.partial(plan.build_model, dataset.num_classes),
                         plan.policy.compute_dtype, mesh, rules)
  control = PrecisionControl(plan, cache, task)
  with cache.context():
    state = create_train_state(cache.model(control.plan), tx,
                               task.example_batch(dataset.splits["train"]), config.seed,
                               plan.loss_scale, task=task, mesh=mesh, rules=rules,
                               grad_compression=compressed, delayed_update=delayed,
                               policy=plan.policy)
  layout = plan.layout
  if plan.pretrained is not None:
    # A circular pipeline keeps the layer stack stage-major, and bert's unscanned layers
    # apart; pretrained weights are in the scan layout.
    pretrained = plan.pretrained if layout is None else layout.from_scan(plan.pretrained)
    pretrained = plan.policy.cast_to_param(pretrained)  # Kept in the param dtype.
    check_pretrained(pretrained, state.params, train_cfg.init_from)
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    state = state.replace(params=jax.device_put(pretrained, shardings))
  train_iter = data.train_iterator(dataset, config.data, train_cfg.batch_size, seed=config.seed)
  batch_sharding = sharding.batch_sharding(mesh)
  # Each process reads only its own rows of every global batch.
  train_iter.rows = sharding.local_rows(batch_sharding, train_cfg.batch_size)
  program = Program(
      make_step=make_step, iterators={"data": train_iter},
      next_batch=lambda: sharding.global_batch(next(train_iter), batch_sharding,
                                               train_cfg.batch_size),
      step_rng=lambda state, step_index: jax.random.fold_in(state.rng, step_index),
      density_at=(functools.partial(compression_lib.density_at, compressed)
                  if compressed else None))
  loop = start_loop(plan, workdir, program, state, cache, control, checkpointer)
  log.info("mesh %s", parallel_mesh.describe(mesh))

  memory, collectives, dense_bytes = {}, {}, 0
  compile_start = time.perf_counter()
  if loop.start < plan.steps:
    compiled = compile_first(loop, sharding.global_batch(train_iter.batch(loop.start),
                                                         batch_sharding, train_cfg.batch_size))
    memory = measure.memory_report(compiled, loop.state.params, loop.state.opt_state)
    collectives = measure.collective_bytes(compiled)
    if compressed is not None:
      dense_bytes = step.dense_exchange_bytes(loop.state.params, mesh)
  loop.compile_time = time.perf_counter() - compile_start
  flops_per_step, flops_source = _flops_per_step(plan, dataset, cache)
  peak_flops, peak_source = measure.device_peak_flops(
      half_precision=jnp.dtype(plan.policy.compute_dtype) != jnp.float32)
  if memory:
    mib = 2.0**20
    log.info("per device on mesh %s: params %.1f MiB, optimizer %.1f MiB, activations and "
             "temporaries %.1f MiB, peak %.1f MiB; %.3g FLOPs per step (%s), compiled in %.1f s",
             parallel_mesh.describe(mesh), memory["params_bytes"] / mib,
             memory["opt_state_bytes"] / mib, memory["temp_bytes"] / mib,
             memory["peak_bytes"] / mib, flops_per_step(), flops_source, loop.compile_time)

  eval_fn = jax.jit(step.make_eval_step(task), out_shardings=sharding.replicated(mesh))
  has_val = bool(dataset.splits.get("val")) and data.num_examples(dataset.splits["val"]) > 0

  def log_metrics(loop: Loop) -> None:
    record = window_record(loop, flops_per_step(), peak_flops)
    record["comm_bytes"] = cache.comm_bytes()
    record["comm_bytes_dense"] = dense_bytes or record["comm_bytes"]
    is_eval = loop.done % train_cfg.eval_every_steps == 0 or loop.done == loop.steps
    if is_eval and has_val:
      val = evaluation.evaluate_split(loop.state, eval_fn, dataset, "val",
                                      train_cfg.eval_batch_size, workdir, mesh, rules,
                                      plan.pipeline.microbatches,
                                      max_examples=train_cfg.eval_examples)
      record.update({f"eval_{key}": value for key, value in val.items()})
    loop.writer.write(loop.done, record)
    loop.record = record

  hooks = [Hook("metrics", log_metrics, (train_cfg.log_every_steps, train_cfg.eval_every_steps),
                reads_norms=True),
           Hook("checkpoint", save_checkpoint, (config.checkpoint.every_steps,))]
  try:
    run_loop(loop, hooks, progress_bar=config.logging.progress_bar and distributed.is_primary())
  finally:
    loop.writer.close()
  state = loop.state

  summary: dict[str, Any] = {"steps": int(state.step), "compile_time_s": loop.compile_time,
                             "mesh": dict(mesh.shape), "processes": jax.process_count(),
                             "flops_per_step": flops_per_step(),
                             "flops_per_step_xla": cache.flops(),
                             "flops_source": flops_source,
                             "peak_flops": peak_flops, "peak_flops_source": peak_source}
  if memory:
    summary["memory"], summary["collective_bytes"] = memory, collectives
    summary["comm_bytes"] = cache.comm_bytes() or int(collectives["total"])  # Last step's.
    summary["comm_bytes_dense"] = int(dense_bytes or summary["comm_bytes"])
  if loop.train_time > 0:
    summary["train_time_s"] = loop.train_time
  summary.update(nas.derived_precision_cost(config.model))  # A searched format network's.
  evaluated = [split for split in ("val", "test")
               if dataset.splits.get(split) and data.num_examples(dataset.splits[split])]
  for split in evaluated:
    # The last split evaluated (test where there is one) is the one predictions.png draws.
    result = evaluation.evaluate_split(state, eval_fn, dataset, split,
                                       train_cfg.eval_batch_size, workdir, mesh, rules,
                                       plan.pipeline.microbatches, draw=split == evaluated[-1],
                                       max_examples=train_cfg.eval_examples)
    prefix = "eval" if split == "val" else split
    summary.update({f"{prefix}_{key}": value for key, value in result.items()})
  log.info("final: %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                  if isinstance(v, int | float)))
  if distributed.is_primary():
    metrics.write_json(workdir / "summary.json", summary)
    if config.logging.plots:
      plots.write_plots(workdir)
  return summary


def _flops_per_step(plan: RunPlan, dataset: data.Dataset, cache: step.StepCache
                    ) -> tuple[Callable[[], float], str]:
  """`flops_per_step()` per device (3x the forward matmul FLOPs), and its source.

  XLA's count misses matmuls that run as library calls (cuBLAS on GPU): the analytic count
  is preferred where the model has one (MaxText's MFU definition).
  """
  spec, config = plan.spec, plan.config
  if spec.flops_per_example is None:
    return cache.flops, "xla"
  example = {key: value[:1] for key, value in dataset.splits["train"].items()}
  analytic = (3 * spec.flops_per_example(config.model, dataset.num_classes, example)
              * config.train.batch_size / plan.mesh.size)
  if not analytic:
    return cache.flops, "xla"
  return (lambda: analytic), "analytic"


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
