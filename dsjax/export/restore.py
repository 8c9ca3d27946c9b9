"""A trained run, restored for inference: its config, data, model and weights.

Only the parameters and the model state (BatchNorm statistics) are read from the newest
checkpoint, by a partial orbax restore onto one device: the optimizer state, loss scale
and gradient-exchange residuals are never built, so a run trained on any mesh, with any
optimizer or gradient compression, restores the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dsjax import data, models
from dsjax.config import base_config, with_model_defaults
from dsjax.errors import CheckpointError, ConfigError
from dsjax.train import tasks

log = logging.getLogger(__name__)

# Model config fields that choose an implementation, not the function, and the value that every
# exporter and runtime can express: the Pallas matmul and the fused attention kernels
# compute the same products as XLA's dot and dsjax's explicit attention.
_PORTABLE_FIELDS = {"matmul_impl": "xla", "attention_impl": "explicit"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One named model input; the leading (batch) dimension is dynamic.

  Attributes:
    name: the batch key and the exported input's name (`image`, `input_ids`, ...).
    shape: one example's shape (no batch dimension).
    dtype: numpy dtype name, e.g. "float32".
  """

  name: str
  shape: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A trained run ready for export.

  Attributes:
    workdir: the run's folder.
    step: the restored checkpoint's step.
    config: the run's config (config.json over the current schema's defaults).
    spec: the model's registry entry.
    task: the training task (inputs, scoring).
    dataset: the run's dataset, loaded as the trainer loads it.
    model: the Flax module in inference form (float32 unless asked otherwise).
    variables: `{"params": ..., **model_state}` on one device.
    inputs: the model's named inputs, in call order.
    overrides: model config fields changed for export (e.g. `matmul_impl`), with their
      values.
  """

  workdir: Path
  step: int
  config: ml_collections.ConfigDict
  spec: models.ModelSpec
  task: tasks.Task
  dataset: data.Dataset
  model: nn.Module
  variables: dict[str, Any]
  inputs: tuple[InputSpec, ...]
  overrides: dict[str, str]

  def apply_fn(self) -> Callable[..., jax.Array]:
    """`f(variables, *inputs) -> outputs` in eval mode (no dropout, BatchNorm's running
    statistics), the weights an argument: cheap to jit at several batch sizes."""
    model, task, names = self.model, self.task, [spec.name for spec in self.inputs]

    def apply(variables: Any, *arrays: jax.Array) -> jax.Array:
      args, kwargs = task.model_args(dict(zip(names, arrays, strict=True)))
      return model.apply(variables, *args, train=False, **kwargs)

    return apply

  def inference_fn(self) -> Callable[..., jax.Array]:
    """`f(*inputs) -> outputs`, the weights closed over: what an exported file holds."""
    apply, variables = self.apply_fn(), self.variables
    return lambda *arrays: apply(variables, *arrays)


def latest_step(workdir: Path) -> int:
  """The newest complete checkpoint step of a run folder.

  Raises:
    CheckpointError: the folder does not exist or holds no complete checkpoint.
  """
  if not workdir.is_dir():
    raise CheckpointError(f"--workdir {workdir} does not exist: pass the folder of a "
                          "trained run (the --workdir given to dsjax-train)")
  directory = workdir / "checkpoints"
  # Orbax renames a step folder to its number only once it is complete.
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.name.isdigit() and (p / "state").is_dir()) if directory.is_dir() else []
  if not steps or not (workdir / "config.json").is_file():
    missing = "config.json" if steps else "checkpoints/<step>/state"
    raise CheckpointError(f"--workdir {workdir} holds no checkpoint to export (no {missing}): "
                          f"train it first (dsjax-train --workdir {workdir}), or pass the "
                          "workdir of a trained run")
  return steps[-1]


def _merge(defaults: Any, saved: Any) -> Any:
  """`saved` over `defaults`, recursively: fields added to dsjax since the run keep their
  defaults, and the run's own values win everywhere else."""
  if not (isinstance(defaults, dict) and isinstance(saved, dict)):
    return saved
  merged = dict(defaults)
  for key, value in saved.items():
    merged[key] = _merge(defaults.get(key), value)
  return merged


def load_config(workdir: Path) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The run's config.json, completed with the current schema's defaults, and as saved.

  Raises:
    CheckpointError: config.json is not valid JSON.
    ConfigError: it names a model this dsjax does not know.
  """
  path = workdir / "config.json"
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path} is not valid JSON ({error}); it is needed to rebuild the "
                          "model: restore it from the run, or retrain") from error
  name = saved.get("model", {}).get("name")
  if name not in models.known_models():
    raise ConfigError(f"{path} names model {name!r}, which this dsjax does not know; known "
                      f"models: {', '.join(models.known_models())}")
  defaults = json.loads(with_model_defaults(base_config(), name).to_json())
  return ml_collections.ConfigDict(_merge(defaults, saved)), saved


def _resolve_architecture(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Points a DNAS run's `model.architecture` at an existing file: as saved (absolute,
  or relative to where training ran), else relative to the workdir."""
  path = config.model.get("architecture") or ""
  if path and not Path(path).expanduser().exists() and (workdir / path).exists():
    config.model.architecture = str(workdir / path)


def _input_specs(run_task: tasks.Task, config: ml_collections.ConfigDict,
                 saved: dict[str, Any], dataset: data.Dataset) -> tuple[InputSpec, ...]:
  """The model's inputs, as the task prepares the test split's arrays (the train split's
  if none): a detector's uint8 canvases are exported as the float32 images it sees.

  A BERT's sequence length is the run's own `data.seq_len` as saved, never a default:
  the exported graph is built for exactly that length.
  """
  split = dataset.splits.get("test") or dataset.splits["train"]
  example = {key: np.asarray(value[:1]) for key, value in split.items()}
  example[tasks.EXAMPLE_INDEX] = np.zeros(1, np.int32)
  prepared = jax.eval_shape(functools.partial(run_task.prepare, train=False), example,
                            jax.random.PRNGKey(0))
  specs = tuple(InputSpec(key, tuple(prepared[key].shape[1:]), np.dtype(prepared[key].dtype).name)
                for key in run_task.input_keys)
  if run_task.name == "mlm":
    seq_len = int(saved.get("data", {}).get("seq_len") or 0)
    if seq_len < 1:
      raise ConfigError("exporting a BERT model needs its sequence length, and the run's "
                        "config.json has no data.seq_len: add it (the length the model was "
                        "trained on) to the workdir's config.json")
    max_position = int(config.model.max_position)
    if seq_len > max_position:
      raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_position={max_position} in "
                        "the run's config.json: set data.seq_len to the trained length")
    specs = tuple(dataclasses.replace(spec, shape=(seq_len,)) for spec in specs)
  return specs


def restore(workdir: str | Path, dtype: Any = jnp.float32) -> RestoredRun:
  """Restores the newest checkpoint of a trained run for inference.

  Args:
    workdir: the run's folder (`dsjax-train --workdir`).
    dtype: compute dtype of the inference model (the master weights are float32).

  Returns:
    The restored run.

  Raises:
    CheckpointError: no checkpoint, an unreadable config.json, or a checkpoint whose
      arrays do not match the model the config describes.
    ConfigError: a DNAS search workdir (nothing trained to export), or a config that
      lacks what the export needs.
  """
  workdir = Path(workdir).expanduser().absolute()
  step = latest_step(workdir)
  config, saved = load_config(workdir)
  spec = models.get_spec(config.model.name)
  if spec.searchable and not config.model.get("architecture"):
    raise ConfigError(f"{workdir} is a DNAS search of {spec.name}, not a trained network: "
                      f"retrain its result (dsjax-train --config ... --architecture "
                      f"{workdir}/architecture.json --workdir NEW) and export NEW")
  _resolve_architecture(config, workdir)
  data_config = config.data
  data_config.cache_dir = data_config.get("cache_dir") or str(workdir)
  dataset = data.get_dataset(data_config)
  run_task = tasks.make_task(spec.task, config.data, dataset.metadata)
  inputs = _input_specs(run_task, config, saved, dataset)
  overrides = {field: value for field, value in _PORTABLE_FIELDS.items()
               if config.model.get(field, value) != value}
  if overrides:
    log.info("export: %s (the same function, in ops every runtime has)",
             ", ".join(f"{k}={v}" for k, v in overrides.items()))
  model_config = config.model.copy_and_resolve_references()
  model_config.update(overrides)
  model = spec.build(model_config, dataset.num_classes, dtype)
  example = [jnp.zeros((1, *s.shape), s.dtype) for s in inputs]
  layout = spec.param_layout(model_config) if spec.param_layout is not None else None
  variables = _restore_variables(workdir, step, model, run_task, inputs, example, layout)
  return RestoredRun(workdir=workdir, step=step, config=config, spec=spec, task=run_task,
                     dataset=dataset, model=model, variables=variables, inputs=inputs,
                     overrides=overrides)


def _restore_variables(workdir: Path, step: int, model: nn.Module, run_task: tasks.Task,
                       inputs: tuple[InputSpec, ...], example: list[jax.Array],
                       layout: Any = None) -> dict[str, Any]:
  """Reads `params` and the model state from checkpoint `step` (a partial restore).
  `layout` (the spec's `param_layout`): the model's when not the saved scan layout."""
  names = [spec.name for spec in inputs]

  def init() -> Any:
    args, kwargs = run_task.model_args(dict(zip(names, example, strict=True)))
    rng = jax.random.PRNGKey(0)
    return model.init({"params": rng, "dropout": rng}, *args, train=False, **kwargs)

  abstract = nn.meta.unbox(jax.eval_shape(init))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        {"params": abstract["params"],
                         "model_state": {k: v for k, v in abstract.items() if k != "params"}})
  if not target["model_state"]:
    del target["model_state"]  # An empty subtree has nothing to match on disk.
  if layout is not None:  # Checkpoints hold the scan layout (dsjax.models.layer_stack).
    target = layout.scan_abstract(target)
  folder = workdir / "checkpoints" / str(step) / "state"
  _check_saved_shapes(folder, target, workdir)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), restored)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), target)
    if got != want:
      raise ValueError("restored arrays differ in shape or dtype from the model's")
  except Exception as error:  # noqa: BLE001 - orbax fails in many ways on a mismatch.
    first = (str(error).strip().splitlines() or [""])[0][:200]
    raise CheckpointError(
        f"checkpoint {folder.parent} cannot be restored into the model that {workdir}/"
        f"config.json describes ({type(error).__name__}: {first}); the config was edited "
        "after training or the checkpoint is damaged: restore the run's own config.json, "
        "or retrain") from error
  if layout is not None:
    restored = layout.from_scan(restored)
  return {"params": restored["params"], **restored.get("model_state", {})}


def _path(keys: Any) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in keys)


def _check_saved_shapes(folder: Path, target: Any, workdir: Path) -> None:
  """Refuses, from the checkpoint's metadata and before reading any array, a checkpoint
  whose arrays are not the model's (a restore that fails part-way leaves reads pending).
  Unreadable metadata is left to the restore to report."""
  absl_log = logging.getLogger("absl")  # Orbax warns that the step's metadata file is
  level = absl_log.level                 # not in the item's folder (it is one level up).
  absl_log.setLevel(logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(folder)
    metadata = getattr(metadata, "item_metadata", metadata)
    tree = getattr(metadata, "tree", metadata)
    saved = {_path(keys): tuple(leaf.shape) for keys, leaf in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape"))}
  except Exception:  # noqa: BLE001 - no usable metadata: the restore decides.
    return
  finally:
    absl_log.setLevel(level)
  for keys, leaf in jax.tree_util.tree_leaves_with_path(target):
    name = _path(keys)
    if saved.get(name) != tuple(leaf.shape):
      found = f"shape {saved[name]}" if name in saved else "no such array"
      raise CheckpointError(
          f"checkpoint {folder.parent} cannot be restored into the model that "
          f"{workdir}/config.json describes: {name} is {tuple(leaf.shape)} in the model, "
          f"{found} in the checkpoint; the config was edited after training: restore the "
          "run's own config.json, or retrain")
