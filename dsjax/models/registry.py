"""Models chosen by name: `dsjax-train --model NAME` and `config.model.name`.

Each entry says how to build the Flax module, which fields its config section has (the
schema `dsjax.config.validate` checks), which dataset and config file it defaults to, and
which model-specific values are impossible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from dsjax.errors import ConfigError

_REGISTRY: dict[str, ModelSpec] = {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build and configure one registered model.

  Attributes:
    name: the registry name, e.g. `cnn-digits`.
    build: `(model_config, num_classes, compute_dtype, plan=None) -> flax.linen.Module`;
      layers compute in `compute_dtype` unless the precision plan promotes them.
    defaults: the model's config fields and their defaults (the schema of `config.model`).
    dataset: the dataset it trains on by default (`config.data.name`).
    config_file: its experiment file in `configs/`, used when no `--config` is given, with
      the file's argument where it trains several models (`bert_tiny.py:model=bert-mini`).
    check: `(model_config) -> list of problems` for values the types cannot rule out.
    searchable: a DNAS supernet: `dsjax-search` searches it; `dsjax-train` trains only
      the discrete network of a searched `model.architecture`.
    task: what the model is trained for, naming a `dsjax.train.tasks` entry:
      "classification" (images -> class logits), "mlm" (masked-language modelling),
      "ctr" (binary click prediction), "detection" (images -> CenterNet heatmaps, sizes
      and offsets).
    pipelined: its layer stack can run as pipeline stages over the `pipe` mesh axis: the
      module has `num_stages` and `num_microbatches` attributes.
    flops_per_example: `(model_config, num_classes, example) -> forward matmul FLOPs` of
      one example (`example`: one row of each input array); the MFU numerator where
      XLA's cost analysis cannot see every matmul (GPU library calls). None: XLA's count.
    load_pretrained: `(path) -> (model fields, params, vocab file or None)` reads a
      pretrained checkpoint for `--init-from`; None: the model has no pretrained format.
    param_layout: `(model_config) -> layout or None`: how the configured model holds its
      parameters when that is not the saved (scan) layout, e.g. bert's separate layers
      (`dsjax.models.layer_stack.UnstackedLayout`); checkpoints and `--init-from` weights
      are converted through it. None: always the saved layout.
  """

  name: str
  build: Callable[..., Any]
  defaults: dict[str, Any]
  dataset: str
  config_file: str
  check: Callable[[Any], Iterable[str]] = lambda model_config: ()
  searchable: bool = False
  task: str = "classification"
  pipelined: bool = False
  flops_per_example: Callable[..., float] | None = None
  load_pretrained: Callable[[str], tuple[dict[str, Any], Any, str | None]] | None = None
  param_layout: Callable[[Any], Any] | None = None


def check_shared_fields(model_config: Any) -> list[str]:
  """Problems with the fields several models share, where a model has them:
  `matmul_impl` (one of `dsjax.nn.MATMUL_IMPLS`) and `dropout_rate` (in [0, 1))."""
  from dsjax.nn import MATMUL_IMPLS  # noqa: PLC0415 - imports jax; the registry does not.

  problems = []
  impl = model_config.get("matmul_impl")
  if impl is not None and impl not in MATMUL_IMPLS:
    problems.append(f"matmul_impl must be one of {', '.join(MATMUL_IMPLS)}, got {impl!r}")
  rate = model_config.get("dropout_rate")
  if rate is not None and not 0 <= rate < 1:
    problems.append(f"dropout_rate must be in [0, 1), got {rate}")
  return problems


def register(spec: ModelSpec) -> ModelSpec:
  """Adds a model to the registry; names are unique."""
  if spec.name in _REGISTRY:
    raise ValueError(f"model {spec.name!r} is registered twice")
  _REGISTRY[spec.name] = spec
  return spec


def known_models() -> list[str]:
  """Returns the registered model names, sorted."""
  return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  """Returns the spec of a registered model.

  Raises:
    ConfigError: the name is not registered; the message lists the known ones.
  """
  if name not in _REGISTRY:
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
  return _REGISTRY[name]
