"""`dsjax-search`: the DNAS search loop, from config to `architecture.json`.

The training split is halved (DARTS): weights learn on one half, the architecture on
the other, so the architecture is chosen by how well it generalises. At the end the
logits are derived to a discrete architecture that `dsjax-train` retrains from scratch
(`--config.model.architecture=W/architecture.json`).
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

from dsjax import data, models, precision
from dsjax.config import validate
from dsjax.data.pipeline import split_train_val
from dsjax.errors import ConfigError
from dsjax.nas import cost, derivation, search, space
from dsjax.train import metrics as metrics_lib
from dsjax.train.optim import build_optimizer

log = logging.getLogger(__name__)


def _temperature(search_config: ml_collections.ConfigDict) -> optax.Schedule:
  start, end = search_config.temperature_start, search_config.temperature_end
  return optax.linear_schedule(start, end, max(search_config.steps, 1))


def search_architecture(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs the bilevel search of a DNAS config and writes `workdir/architecture.json`.

  Args:
    config: a config whose model is a DNAS supernet (`model.architecture` empty).
    workdir: where architecture.json, metrics.jsonl, TensorBoard events, config.json and
      summary.json go.

  Returns:
    The summary: derived architecture's FLOPs and params, final search losses, time.
  """
  validate(config)
  spec = models.get_spec(config.model.name)
  if not spec.searchable:
    raise ConfigError(f"model {config.model.name!r} has no architecture to search; "
                      "dsjax-search needs a DNAS model such as dnas-digits")
  if config.model.architecture:
    raise ConfigError("model.architecture is set: that config retrains a searched network "
                      "(dsjax-train); for dsjax-search leave it empty")
  search_config, steps = config.search, config.search.steps
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
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
  resource = config.resource
  penalty = cost.make_arch_penalty(
      search_space, dataset.input_shape, dataset.num_classes,
      target_flops=resource.target_flops, target_params=resource.target_params,
      resource_weight=resource.penalty_weight, param_free_weight=search_config.param_free_weight)
  aux_skip = (optax.linear_schedule(search_config.aux_skip, 0.0, steps)
              if search_config.aux_skip > 0 else None)
  unroll_lr = search_config.unroll_lr or config.optimizer.learning_rate
  step_fn = jax.jit(search.make_search_step(
      order=search_config.order, unroll_lr=unroll_lr,
      warmup_steps=search_config.warmup_steps, temperature_fn=_temperature(search_config),
      aux_skip_fn=aux_skip, arch_penalty_fn=penalty), donate_argnums=(0,))

  metrics_lib.write_json(workdir / "config.json", json.loads(config.to_json()))
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.logging.tensorboard)
  rng = jax.random.PRNGKey(config.seed)
  start = time.perf_counter()
  record: dict[str, Any] = {}
  for step_index in tqdm.trange(steps, unit="step",
                                disable=None if config.logging.progress_bar else True):
    state, step_metrics = step_fn(state, next(train_iter), next(val_iter), rng)
    done = step_index + 1
    if done % config.train.log_every_steps == 0 or done == steps:
      record = {**jax.device_get(step_metrics),
                **derivation.flat_probabilities(jax.device_get(state.arch), search_space)}
      writer.write(done, record)
  search_time = time.perf_counter() - start
  writer.close()

  arch = jax.device_get(state.arch)
  architecture = derivation.derive(arch, search_space, input_shape=dataset.input_shape,
                               num_classes=dataset.num_classes)
  path = derivation.save_architecture(str(workdir), architecture)
  table = derivation.format_probabilities(arch, search_space)
  (workdir / "probabilities.txt").write_text(table + "\n")
  summary = {"steps": steps, "search_time_s": search_time, "architecture": path,
             "flops": architecture["flops"], "params": architecture["params"],
             "depth": architecture["depth"],
             **{k: float(v) for k, v in record.items() if k in ("train_loss", "val_loss")}}
  metrics_lib.write_json(workdir / "summary.json", summary)
  return summary
