"""`resolve(config, devices)`: every check of a run, before data loads or anything compiles.

The loop reads only what `resolve` parsed: the mesh, the axis rules, the pipeline split,
the gradient compression, the precision policy, loss scale and controller switch, the
search space of a search. A config that cannot run fails here with one ConfigError that
names every problem found, not after a tokenizer has trained or a step has compiled.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dsjax import models, precision
from dsjax.config import validate
from dsjax.errors import CheckpointError, ConfigError
from dsjax.nas import space as space_lib
from dsjax.parallel import compression as compression_lib
from dsjax.parallel import mesh as parallel_mesh
from dsjax.parallel import pipeline as pipeline_lib
from dsjax.parallel import sharding

log = logging.getLogger(__name__)

# Config sections that must not change between a run and its resumption: they decide the
# meaning of the checkpointed arrays and of the data position. A search adds its objective
# (`resource`, `search`; `search.steps` may grow to extend it).
_RESUME_INVARIANT = ("seed", "model", "data", "optimizer", "precision")
_SEARCH_RESUME_INVARIANT = _RESUME_INVARIANT + ("resource", "search")
# Keys of those sections that only change how the step compiles, not what the arrays mean
# (BERT workdirs written when the encoder scan looped by default resume unrolled; its
# layers stacked or not are one checkpoint layout, `dsjax.models.layer_stack`), or how
# the batches are read, not which they are (every loader gives the same ones).
_RESUME_COMPILE_ONLY = {"model": ("scan_unroll", "scan_layers"),
                        "data": ("loader", "workers", "prefetch")}


@dataclasses.dataclass(frozen=True)
class PipelineSplit:
  """How the model's layer stack splits over the `pipe` mesh axis.

  Attributes:
    stages: pipeline stages (`mesh.pipe`); 1: no pipeline.
    microbatches: micro-batches per (gradient-accumulation) batch; 1 without a pipeline.
    repeats: circular pipeline repeats (`parallel.pipeline_repeats`); 1 is GPipe.
  """

  stages: int = 1
  microbatches: int = 1
  repeats: int = 1

  @property
  def layout(self) -> pipeline_lib.CircularLayout | None:
    """The parameters' in-memory layout when it is not the scan's (a circular pipeline)."""
    return pipeline_lib.circular_layout(self.stages, self.repeats)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A checked run: what the loop builds from, parsed once.

  Attributes:
    config: the validated config (with `train.init_from`'s model fields applied).
    search: whether this is a DNAS search (`dsjax-search`) rather than training.
    spec: the model's registry entry.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.
    pipeline: the pipeline split of the layer stack.
    compression: the data-parallel gradient compression; None: XLA's dense all-reduce.
    delayed_update: apply each gradient one step late (overlaps its exchange).
    policy: the precision policy.
    loss_scale: the loss scale a fresh state starts from.
    controller: whether the adaptive per-layer precision controller runs.
    steps: the run's step count (`train.steps`, or `search.steps` for a search).
    pretrained: `train.init_from`'s parameters, or None.
    search_space: a search's parsed space; None for training.
    resume_sections: config sections a resumed run must share with its checkpoint.
    resume_ignore: section -> keys of those that may change on resumption.
  """

  config: ml_collections.ConfigDict
  search: bool
  spec: models.ModelSpec
  mesh: jax.sharding.Mesh
  rules: Any
  pipeline: PipelineSplit
  compression: compression_lib.Compression | None
  delayed_update: bool
  policy: precision.Policy
  loss_scale: Any
  controller: bool
  steps: int
  pretrained: Any = None
  search_space: space_lib.SearchSpace | None = None
  resume_sections: tuple[str, ...] = _RESUME_INVARIANT
  resume_ignore: dict[str, Sequence[str]] = dataclasses.field(
      default_factory=lambda: dict(_RESUME_COMPILE_ONLY))

  @property
  def layout(self) -> Any:
    """How the state holds its parameters when that is not the saved scan layout (a
    circular pipeline's stage-major stack, bert's separate layers); None: as saved."""
    if self.pipeline.stages > 1:  # A pipeline holds the stack (stage-major if circular).
      return self.pipeline.layout
    return None if self.spec.param_layout is None else self.spec.param_layout(self.config.model)

  @property
  def micro_batch(self) -> int:
    """Examples per gradient-accumulation micro-batch (the global batch / accumulation)."""
    return self.config.train.batch_size // self.config.train.grad_accum_steps

  def build_model(self, num_classes: int, compute_dtype: Any, plan: Any = None) -> Any:
    """The model under a precision plan, its layer stack split into the pipeline's stages."""
    model = self.spec.build(self.config.model, num_classes, compute_dtype, plan)
    if self.pipeline.stages == 1:
      return model
    return model.clone(num_stages=self.pipeline.stages,
                       num_microbatches=self.pipeline.microbatches,
                       num_repeats=self.pipeline.repeats)


def resolve(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None, *,
            search: bool = False) -> RunPlan:
  """Parses and checks everything a run needs before its data loads.

  Args:
    config: the run's config (validated here).
    devices: the devices of the mesh; None: every device of every process.
    search: resolve a DNAS search (`dsjax-search`) instead of a training run.

  Returns:
    The run plan.

  Raises:
    ConfigError: one error naming every problem (schema, mesh, batch split, pipeline,
      compression, precision, search settings).
    CheckpointError: `train.init_from` cannot be read.
  """
  validate(config)
  problems: list[str] = []
  spec = models.get_spec(config.model.name)
  if search:
    _check_searchable(config, spec, problems)
  elif spec.searchable and not config.model.architecture:
    problems.append(f"model {config.model.name} is a DNAS supernet: run dsjax-search first, "
                    "then retrain its result with --architecture W/architecture.json")
  config, pretrained = _apply_init_from(config)
  rules = _parse(problems, "", lambda: sharding.config_rules(config.parallel))
  compressed = _parse(problems, "parallel.grad_compression: ",
                      lambda: compression_lib.parse_compression(config.parallel.grad_compression))
  mesh = _parse(problems, "", lambda: parallel_mesh.make_mesh(config.mesh, devices))
  pipeline = PipelineSplit()
  if mesh is not None:
    _parse(problems, "", lambda: sharding.check_batch(
        mesh, config.train.batch_size // config.train.grad_accum_steps,
        "train.batch_size / train.grad_accum_steps (the micro-batch)",
        "set the batch size (or the micro-batch count)"))
    pipeline = _pipeline_split(config, spec, mesh, problems)
    if compressed is not None and compressed.mode != "none":
      others = {axis: mesh.shape[axis] for axis in ("pipe", "fsdp", "model")
                if mesh.shape[axis] > 1}
      if others:
        problems.append(
            f"parallel.grad_compression={config.parallel.grad_compression} compresses the "
            "data-parallel exchange only, but the mesh also has "
            f"{', '.join(f'{k}={v}' for k, v in others.items())}; use a data-only mesh "
            "(e.g. --mesh data=-1)")
  search_space = None
  if search:
    search_space = _parse(problems, "model.backbone: ",
                          lambda: space_lib.from_config(config.model.backbone))
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))
  policy = precision.get_policy(config.precision.policy)
  return RunPlan(
      config=config, search=search, spec=spec, mesh=mesh, rules=rules, pipeline=pipeline,
      compression=None if compressed.mode == "none" else compressed,
      delayed_update=bool(config.parallel.delayed_update), policy=policy,
      loss_scale=precision.loss_scale_for(policy, **config.precision.loss_scale.to_dict()),
      controller=precision.controller_enabled(config.precision),
      steps=config.search.steps if search else config.train.steps, pretrained=pretrained,
      search_space=search_space,
      resume_sections=_SEARCH_RESUME_INVARIANT if search else _RESUME_INVARIANT,
      resume_ignore={**_RESUME_COMPILE_ONLY, **({"search": ("steps",)} if search else {})})


def _parse(problems: list[str], prefix: str, parse: Any) -> Any:
  """`parse()`, or None with its ConfigError's message added to `problems`."""
  try:
    return parse()
  except ConfigError as error:
    problems.append(f"{prefix}{error}")
    return None


def _check_searchable(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                      problems: list[str]) -> None:
  """What a search needs beyond a training run's checks."""
  if not spec.searchable:
    problems.append(f"model {config.model.name!r} has no architecture to search; "
                    "dsjax-search needs a DNAS model such as dnas-digits")
  if config.model.get("architecture"):
    problems.append("model.architecture is set: that config retrains a searched network "
                    "(dsjax-train); for dsjax-search leave it empty")
  fix = "they act in dsjax-train; retrain the searched architecture with them"
  if config.parallel.grad_compression != "none":
    problems.append(f"parallel.grad_compression={config.parallel.grad_compression!r}: the "
                    f"search step exchanges its two gradients densely; {fix}")
  if config.parallel.delayed_update:
    problems.append(f"parallel.delayed_update=1: the search's architecture step needs the "
                    f"weights' current gradient; {fix}")
  if config.train.grad_accum_steps != 1:
    problems.append(f"train.grad_accum_steps={config.train.grad_accum_steps}: the search "
                    f"takes whole batches (set train.batch_size instead); {fix}")


def _pipeline_split(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                    mesh: jax.sharding.Mesh, problems: list[str]) -> PipelineSplit:
  """The layer stack's split into `mesh.pipe` stages, checked."""
  stages = mesh.shape["pipe"]
  if stages == 1:
    return PipelineSplit()
  if not spec.pipelined:
    pipelined = [name for name in models.known_models() if models.get_spec(name).pipelined]
    problems.append(f"mesh pipe={stages}, but model {spec.name} has no layer stack to split "
                    f"into pipeline stages; use pipe=1 (pipelined models: "
                    f"{', '.join(pipelined)})")
    return PipelineSplit()
  microbatches = config.parallel.microbatches or 2 * stages
  micro_batch = config.train.batch_size // config.train.grad_accum_steps
  if micro_batch % microbatches:
    problems.append(f"the micro-batch of {micro_batch} examples (train.batch_size / "
                    f"grad_accum_steps) does not split into parallel.microbatches="
                    f"{microbatches} pipeline micro-batches; pick a count that divides "
                    f"{micro_batch}")
  layers = config.model.get("num_layers", stages)
  repeats = config.parallel.pipeline_repeats
  if layers % stages:
    problems.append(f"model.num_layers={layers} does not split into mesh pipe={stages} "
                    "pipeline stages; use a pipe size that divides the layer count")
  elif repeats > 1 and layers % (stages * repeats):
    problems.append(f"model.num_layers={layers} does not split into mesh pipe={stages} "
                    f"stages x parallel.pipeline_repeats={repeats}; use repeats that divide "
                    f"{layers // stages}")
  if repeats > 1 and microbatches < stages:
    problems.append(f"a circular pipeline (parallel.pipeline_repeats={repeats}) needs "
                    f"parallel.microbatches >= mesh pipe={stages}, got {microbatches}")
  return PipelineSplit(stages, microbatches, repeats)


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


def check_pretrained(params: Any, state_params: Any, path: str) -> None:
  """Raises CheckpointError when pretrained params do not fit the model's."""
  want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), state_params)
  got = jax.tree.map(lambda x: (tuple(x.shape), str(np.asarray(x).dtype)), params)
  if want != got:
    raise CheckpointError(f"--init-from {path}: the checkpoint's parameters do not match the "
                          "model (different vocabulary or sizes); use the checkpoint's own "
                          "vocab.txt as data.vocab_file")
