"""`dsjax-search`: the DNAS search loop, from config to `architecture.json`.

The training split is halved (DARTS): weights learn on one half, the architecture on
the other, so the architecture is chosen by how well it generalises. At the end the
logits are derived to a discrete architecture that `dsjax-train` retrains from scratch
(`--config.model.architecture=W/architecture.json`).

The search checkpoints like the trainer (`dsjax.train.checkpoint`, in `W/checkpoints`):
the search state and both data positions every `checkpoint.every_steps` steps and at
the last step. Rerunning on the same workdir resumes from the newest checkpoint and
continues exactly as an uninterrupted search would.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
import tqdm

from dsjax import data, models, plots, precision
from dsjax.config import base_config, validate, with_model_defaults
from dsjax.data.dataset import split_train_val
from dsjax.errors import CheckpointError, ConfigError
from dsjax.nas import cost, derivation, search, space
from dsjax.train import checkpoint, precision_plan
from dsjax.train import metrics as metrics_lib
from dsjax.train.optim import build_optimizer
from dsjax.train.workdir import prepare_workdir

log = logging.getLogger(__name__)

# Config sections that must not change between a search and its resumption: they decide
# the meaning of the checkpointed arrays, of the data positions and of the objective.
# `search` is compared without `steps`, which may grow to extend a search.
_RESUME_INVARIANT = ("seed", "model", "data", "optimizer", "precision", "resource", "search")


def _temperature(search_config: ml_collections.ConfigDict) -> optax.Schedule:
  start, end = search_config.temperature_start, search_config.temperature_end
  return optax.linear_schedule(start, end, max(search_config.steps, 1))


def _check_resumable(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a search workdir whose saved config differs in an invariant section.

  Args:
    workdir: the search's folder, holding the `config.json` of the run that checkpointed.
    config: the config of this invocation.

  Raises:
    CheckpointError: config.json is unreadable, or a resume-invariant section changed.
  """
  saved = checkpoint.check_resumable(
      workdir, config, _RESUME_INVARIANT, ignore={"search": ["steps"]},
      defaults=with_model_defaults(base_config(), config.model.name))
  saved_steps = (saved or {}).get("search", {}).get("steps")
  if saved_steps is not None and saved_steps != config.search.steps:
    log.warning("search.steps changed from %s to %d: the temperature, auxiliary-skip and "
                "learning-rate schedules follow search.steps, so from here the search differs "
                "from a fresh %d-step one", saved_steps, config.search.steps,
                config.search.steps)


def _restore(checkpointer: checkpoint.Checkpointer, step: int, state: search.SearchState,
             iterators: dict[str, data.BatchIterator]) -> search.SearchState:
  """Restores the search state at `step` and moves the data iterators to its position.

  Args:
    checkpointer: the search's checkpointer.
    step: the checkpoint to restore.
    state: a fresh search state: the structure, shapes and dtypes the checkpoint must match.
    iterators: host-state key -> iterator, each set to its saved position.

  Returns:
    The restored state.

  Raises:
    CheckpointError: the checkpoint is corrupt, of another model or search space, or was
      not written by dsjax-search.
  """
  state, host_state = checkpointer.restore(step, state)
  missing = [key for key in iterators if not isinstance(host_state.get(key), dict)]
  if missing:
    raise CheckpointError(
        f"checkpoint {checkpointer.directory / str(step)} has no {', '.join(missing)} "
        "position: it was not written by dsjax-search. Use a fresh --workdir")
  for key, iterator in iterators.items():
    iterator.set_state(host_state[key])
  return state


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
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, int) and step <= until:
      losses = {k: float(v) for k, v in record.items()
                if k in ("train_loss", "val_loss") and v is not None}
  return losses


def search_architecture(config: ml_collections.ConfigDict, workdir: str | Path, *,
                        stop_after: int | None = None) -> dict[str, Any]:
  """Runs the bilevel search of a DNAS config and writes `workdir/architecture.json`.

  The search resumes from the newest checkpoint in `workdir/checkpoints` if there is one:
  the search state (weights, architecture logits, both optimizer states, step counter)
  and both data positions are restored, so the remaining steps see the same batches, the
  same per-step randomness and the same temperature/auxiliary-skip schedules as an
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
    the last logged train/val losses, and `search_time_s`, the wall time of this
    invocation's steps only (not of steps before a resumed checkpoint). With
    `stop_after`, `{"stopped_at": step, "start_step": ..., "search_time_s": ...}` and no
    architecture.

  Raises:
    ConfigError: the config is not a searchable one, or `stop_after` < 1.
    CheckpointError: the workdir's checkpoint is corrupt or belongs to a different
      config (another search space, model, data...); nothing in it is changed.
  """
  validate(config)
  spec = models.get_spec(config.model.name)
  if not spec.searchable:
    raise ConfigError(f"model {config.model.name!r} has no architecture to search; "
                      "dsjax-search needs a DNAS model such as dnas-digits")
  if config.model.architecture:
    raise ConfigError("model.architecture is set: that config retrains a searched network "
                      "(dsjax-train); for dsjax-search leave it empty")
  if stop_after is not None and stop_after < 1:
    raise ConfigError(f"stop_after must be >= 1 (a total step count), got {stop_after}")
  _check_search_settings(config)
  workdir = prepare_workdir(workdir)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints",
                                         max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
  try:
    return _search(config, spec, workdir, checkpointer, stop_after)
  finally:
    checkpointer.close()


def _check_search_settings(config: ml_collections.ConfigDict) -> None:
  """Refuses settings the search loop cannot honour: it runs on one device, in one
  compute dtype, without loss scaling, the per-layer controller or a gradient exchange.

  Raises:
    ConfigError: naming the setting and what to do instead.
  """
  fix = "search in fp32 or bf16 on one device, then retrain the architecture with dsjax-train"
  policy = precision.get_policy(config.precision.policy)
  if precision.needs_loss_scaling(policy) or precision_plan.controller_enabled(
      config.precision):
    raise ConfigError(f"precision.policy={config.precision.policy!r} needs loss scaling or "
                      f"the per-layer precision controller, which the search loop lacks: {fix}")
  mesh = config.mesh
  if (mesh.pipe, mesh.fsdp, mesh.model) != (1, 1, 1) or mesh.data not in (-1, 1):
    raise ConfigError(f"mesh pipe={mesh.pipe}, data={mesh.data}, fsdp={mesh.fsdp}, "
                      f"model={mesh.model}: the search loop runs on one device: {fix}")
  if config.parallel.grad_compression != "none" or config.distributed.coordinator:
    raise ConfigError("parallel.grad_compression and distributed.* act in dsjax-train only: "
                      f"the search loop runs in one process on one device: {fix}")


def _search(config: ml_collections.ConfigDict, spec: models.ModelSpec, workdir: Path,
            checkpointer: checkpoint.Checkpointer, stop_after: int | None) -> dict[str, Any]:
  """The body of `search_architecture`, with the checkpointer open (see there)."""
  latest = checkpointer.latest_step()
  if latest is not None:  # Before any work: a mismatched config fails fast.
    _check_resumable(workdir, config)
  search_config, steps = config.search, config.search.steps
  dataset = data.get_dataset(config.data)
  train_split = dataset.splits["train"]
  # A seed apart from the train/val split's, so the halves do not mirror that split.
  arch_idx, weight_idx = split_train_val(len(train_split["label"]),
                                         len(train_split["label"]) // 2,
                                         [config.data.split_seed, 7])
  train_half = {k: v[weight_idx] for k, v in train_split.items()}
  val_half = {k: v[arch_idx] for k, v in train_split.items()}
  batch_size = config.train.batch_size
  train_iter = data.BatchIterator(train_half, batch_size, seed=config.seed)
  val_iter = data.BatchIterator(val_half, batch_size, seed=config.seed + 1)

  policy = precision.get_policy(config.precision.policy)
  model = spec.build(config.model, dataset.num_classes, policy.compute_dtype)
  search_space = space.from_config(config.model.backbone)
  weight_tx, _ = build_optimizer(config.optimizer, steps)
  arch_tx = search.arch_optimizer(search_config.arch_learning_rate,
                                  search_config.arch_weight_decay)
  state = search.create_search_state(model, weight_tx, arch_tx, dataset.input_shape,
                                     config.seed)
  # Committed to its device, as a restored state is: then a fresh and a resumed search
  # lower to one and the same program (and share the compilation cache).
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))
  iterators = {"train_data": train_iter, "val_data": val_iter}
  if latest is not None:
    state = _restore(checkpointer, latest, state, iterators)
    log.info("resuming the search from step %d", latest)
  start_step = int(state.step)
  end_step = steps if stop_after is None else min(stop_after, steps)

  resource = config.resource
  penalty = cost.make_arch_penalty(
      search_space, dataset.input_shape, dataset.num_classes,
      target_flops=resource.target_flops, target_params=resource.target_params,
      resource_weight=resource.penalty_weight, param_free_weight=search_config.param_free_weight)
  aux_skip = (optax.linear_schedule(search_config.aux_skip, 0.0, steps)
              if search_config.aux_skip > 0 else None)
  unroll_lr = search_config.unroll_lr or config.optimizer.learning_rate
  # Temperature, auxiliary skip, warm-up and the per-step key all derive from `state.step`
  # inside the step, so a restored state continues them where the checkpoint left off.
  step_fn = jax.jit(search.make_search_step(
      order=search_config.order, unroll_lr=unroll_lr,
      warmup_steps=search_config.warmup_steps, temperature_fn=_temperature(search_config),
      aux_skip_fn=aux_skip, arch_penalty_fn=penalty), donate_argnums=(0,))

  metrics_lib.write_json(workdir / "config.json", json.loads(config.to_json()))
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.logging.tensorboard,
                                    resume_step=start_step)
  rng = jax.random.PRNGKey(config.seed)  # Constant: the step folds in its own counter.
  start = time.perf_counter()
  record: dict[str, Any] = {}
  progress = tqdm.tqdm(total=steps, initial=min(start_step, steps), unit="step",
                       disable=None if config.logging.progress_bar else True)
  try:
    for step_index in range(start_step, end_step):
      state, step_metrics = step_fn(state, next(train_iter), next(val_iter), rng)
      done = step_index + 1
      progress.update(1)
      # Logged on the regular schedule only (not at `stop_after`), so a stopped and
      # resumed search logs the same steps as an uninterrupted one.
      if done % config.train.log_every_steps == 0 or done == steps:
        record = {**jax.device_get(step_metrics),
                  **derivation.flat_probabilities(jax.device_get(state.arch), search_space)}
        writer.write(done, record)
      if done % config.checkpoint.every_steps == 0 or done in (steps, end_step):
        checkpointer.save(done, state, {key: it.get_state() for key, it in iterators.items()})
    checkpointer.wait()
  finally:
    progress.close()
    writer.close()
  search_time = time.perf_counter() - start
  final_step = int(state.step)
  if final_step < steps:  # Stopped early by `stop_after`.
    log.info("search stopped at step %d of %d; rerun on %s to resume", final_step, steps,
             workdir)
    return {"stopped_at": final_step, "start_step": start_step, "search_time_s": search_time}

  losses = ({k: float(v) for k, v in record.items() if k in ("train_loss", "val_loss")}
            if record else _logged_losses(writer.path, final_step))
  arch = jax.device_get(state.arch)
  architecture = derivation.derive(arch, search_space, input_shape=dataset.input_shape,
                                   num_classes=dataset.num_classes)
  path = derivation.save_architecture(str(workdir), architecture)
  table = derivation.format_probabilities(arch, search_space)
  (workdir / "probabilities.txt").write_text(table + "\n")
  summary = {"steps": final_step, "start_step": start_step, "search_time_s": search_time,
             "architecture": path, "flops": architecture["flops"],
             "params": architecture["params"], "depth": architecture["depth"], **losses}
  metrics_lib.write_json(workdir / "summary.json", summary)
  if config.logging.plots and jax.process_index() == 0:
    plots.write_plots(workdir)
  return summary
