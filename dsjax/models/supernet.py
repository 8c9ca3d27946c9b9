"""The DNAS supernet: a chain of searchable blocks, and its discrete (derived) form.

During search each block computes every candidate op at the widest width and mixes them
with relaxed architecture weights; an FBNetV2-style channel mask (a relaxed mixture of
"first c channels" masks) then selects the width, and optional blocks blend with their
input through a keep/skip gate. The architecture logits live in the `arch` collection,
never in `params`, so the weight optimizer cannot see them:

  variables = model.init(rng, images)          # {"params": ..., "arch": ...}
  logits = model.apply(variables, images, train=True, temperature=t,
                       rngs={"gumbel": key})   # Gumbel relaxations need the key

Given an `architecture` (one `BlockChoice` per block, see
`dsjax.nas.derivation.choices_from_dict`), the same class builds only the chosen ops at
the chosen widths and has no `arch` collection, so a retrained network holds exactly the
derived parameters. Blocks are named `block_{i}` and ops (`dsjax.nas.ops.Op`, each
declared there with its cost) by candidate (`block_0/conv_3x3/conv/kernel`) in both forms.
With `batch_norm`, the supernet's BatchNorms are affine-free (no scale or bias, DARTS'
`affine=False`) and the derived network's learn a scale and bias.

Numeric formats. With `space.precision_choices` each search block also holds
`format_logits` and mixes, as it mixes ops, the outputs of each op computed under every
candidate format with the same weights (Wu et al. 2018's DNAS): sum_f w_f op_f(x), where
op_f rounds the op's kernels (per output channel) and inputs (per tensor) to format f
(`dsjax.nn.Conv`'s `numeric_format`). That costs formats x conv ops convolutions per block
(param-free ops run once: they have no arithmetic to round). It is the default
(`space.format_mixing="outputs"`) because it is exactly the expectation the joint format
choice stands for (the one the bit-ops cost, E[bits^2] per MAC, counts) and the derived
block computes one of its terms. `format_mixing="operands"` is EdMIPS' composite
conv(sum_f w_f Q_f(x), sum_f w_f Q_f(w)): one convolution per op whatever the number of
formats, at the price of cross terms (weights of one format against inputs of another)
in the relaxation. A derived block computes in its
`BlockChoice.format` through the same `numeric_format` path: integer formats train
quantization-aware (fake quantization, straight-through gradient) and float formats cast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import nn as dsnn
from dsjax.errors import ConfigError
from dsjax.models import registry
from dsjax.nas import ops as ops_lib
from dsjax.nas import relaxation as relax_lib
from dsjax.nas import space as space_lib
from dsjax.nas.derivation import choices_from_dict, load_architecture
from dsjax.nas.ops import Op, fit_channels
from dsjax.nas.space import BlockChoice, SearchSpace
from dsjax.precision import LayerPrecision, PrecisionPlan, quantize

ARCH = "arch"
GUMBEL_RNG = "gumbel"


class SearchBlock(nn.Module):
  """A searchable block: relaxed op mixture, channel mask and (if optional) skip gate.

  Its ops' BatchNorms (`space.batch_norm`) are affine-free, as in DARTS' search.

  Attributes:
    space: the search space.
    index: this block's position.
    relaxation: one of `dsjax.nas.relaxation.RELAXATIONS`.
    precision: compute dtype and per-layer plan (`dsjax.precision.LayerPrecision`),
      handed to every op; parameters stay float32.
  """

  space: SearchSpace
  index: int
  relaxation: str = "softmax"
  precision: LayerPrecision = LayerPrecision()

  def _weights(self, name: str, size: int, train: bool, temperature: Any) -> jax.Array:
    logits = self.variable(ARCH, name, jnp.zeros, (size,), jnp.float32).value
    sample = train and self.relaxation != "softmax"
    rng = self.make_rng(GUMBEL_RNG) if sample else None
    return relax_lib.relax(logits, self.relaxation, temperature, rng)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, temperature: Any = 1.0,
               aux_skip: Any = 0.0) -> jax.Array:
    space, stride = self.space, self.space.stride(self.index)
    width, candidates, channels = space.max_channels, space.candidates(self.index), space.channels
    op_weights = self._weights("op_logits", len(candidates), train, temperature)
    channel_weights = self._weights("channel_logits", len(channels), train, temperature)
    formats = space.precision_choices
    if formats:
      format_weights = self._weights("format_logits", len(formats), train, temperature)
    y = jnp.zeros((), jnp.float32)
    for i, candidate in enumerate(candidates):
      op = Op(candidate, width, stride, space.activation, self.precision, space.batch_norm,
              affine=False, name=candidate)
      if formats and not ops_lib.get_op(ops_lib.op_family(candidate)).param_free:
        if space.format_mixing == "operands":
          out = op(x, train, numeric_format=quantize.FormatMixture(format_weights, formats))
          out = out.astype(jnp.float32)
        else:
          # One op, one set of weights, called under every format: the weights are shared.
          out = sum(format_weights[f] * op(x, train, numeric_format=fmt).astype(jnp.float32)
                    for f, fmt in enumerate(formats))
      else:
        out = op(x, train).astype(jnp.float32)
      y = y + op_weights[i] * out
    if stride == 1:
      # DARTS- auxiliary skip: a decaying identity path outside the mixture, so skip ops
      # need not win the mixture just to carry gradient through deep chains.
      y = y + aux_skip * fit_channels(x, width).astype(jnp.float32)
    masks = jnp.asarray(np.arange(width)[None, :] < np.asarray(channels)[:, None], jnp.float32)
    y = y * (channel_weights @ masks)
    if space.optional(self.index):
      keep = self._weights("depth_logits", 2, train, temperature)[1]
      y = keep * y + (1.0 - keep) * fit_channels(x, width).astype(jnp.float32)
    return y.astype(self.precision.dtype(self))


class DiscreteBlock(nn.Module):
  """A derived block: one op at one width (named like its supernet counterpart).

  Unlike the search, its BatchNorm (`batch_norm`) learns a scale and bias. Its op computes
  in `choice.format` (None: the run's precision).
  """

  choice: BlockChoice
  stride: int = 1
  activation: str = "relu"
  precision: LayerPrecision = LayerPrecision()
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return Op(self.choice.op, self.choice.channels, self.stride, self.activation,
              self.precision, self.batch_norm, name=self.choice.op)(
                  x, train, numeric_format=self.choice.format)


class Supernet(nn.Module):
  """Stem, searchable (or derived) blocks, then a dense classifier head.

  Attributes:
    space: the search space.
    num_classes: number of output logits.
    relaxation: "softmax" (DARTS), "gumbel" (FBNet) or "hard_gumbel" (GDAS).
    architecture: None for the supernet; one BlockChoice per block for the derived net.
      With `space.batch_norm` the supernet's BatchNorms (stem and ops) are affine-free, as
      in DARTS' search; the derived net's learn a per-channel scale and bias.
    precision: compute dtype and per-layer plan (`dsjax.precision.LayerPrecision`), handed
      to every layer; parameters are created float32 (master weights).
  """

  space: SearchSpace
  num_classes: int
  relaxation: str = "softmax"
  architecture: tuple[BlockChoice, ...] | None = None
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               temperature: Any = 1.0, aux_skip: Any = 0.0) -> jax.Array:
    """Returns float32 logits [batch, num_classes] (head "none": the last feature map).

    Args:
      images: NHWC float images.
      train: sample Gumbel noise (rng stream "gumbel") for the Gumbel relaxations, and
        normalise with batch statistics (updating "batch_stats") when the space has
        batch_norm.
      temperature: relaxation temperature; may be traced (a schedule's value).
      aux_skip: weight of the DARTS- auxiliary skip path in stride-1 search blocks.
    """
    if self.relaxation not in relax_lib.RELAXATIONS:
      raise ValueError(f"relaxation must be one of {relax_lib.RELAXATIONS}, "
                       f"got {self.relaxation!r}")
    space, precision = self.space, self.precision
    x = backbone_features(images, space, self.architecture, self.relaxation, precision,
                          train=train, temperature=temperature, aux_skip=aux_skip)
    if space.head == "none":
      return x.astype(jnp.float32)
    if space.head == "pool":
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    else:
      x = x.reshape(x.shape[0], -1)
    logits = dsnn.Dense(self.num_classes, name="head", precision=precision)(x)
    return logits.astype(jnp.float32)


def backbone_features(images: jax.Array, space: SearchSpace,
                      architecture: tuple[BlockChoice, ...] | None, relaxation: str,
                      precision: LayerPrecision, *, train: bool, temperature: Any = 1.0,
                      aux_skip: Any = 0.0) -> jax.Array:
  """The stem and the searchable (or derived) blocks: the feature map before any head.

  Call it inside a compact method: its layers (`stem`, `stem_bn`, `block_{i}`) become
  children of the calling module, so the classifier (`Supernet`) and the detector
  (`dsjax.models.centernet`) hold the same parameter and `arch` paths for the same space.

  Args:
    images: NHWC float images.
    space: the search space.
    architecture: None for the supernet; one BlockChoice per block for the derived net.
    relaxation: one of `dsjax.nas.relaxation.RELAXATIONS`.
    precision: compute dtype and per-layer plan, handed to every layer.
    train: batch statistics and Gumbel sampling (see `Supernet.__call__`).
    temperature: relaxation temperature; may be traced.
    aux_skip: weight of the DARTS- auxiliary skip path in stride-1 search blocks.

  Returns:
    The last block's feature map, in the compute dtype.
  """
  x = images
  if space.stem_channels:
    x = dsnn.Conv(space.stem_channels, (3, 3), use_bias=not space.batch_norm, name="stem",
                  precision=precision)(x)
    if space.batch_norm:
      affine = architecture is not None  # Affine-free in the search, as DARTS.
      x = dsnn.BatchNorm(use_scale=affine, use_bias=affine, param_axis="conv_out",
                         name="stem_bn", precision=precision)(x, use_running_average=not train)
    x = getattr(nn, space.activation)(x)
  if architecture is not None and len(architecture) != space.num_blocks:
    raise ValueError(f"architecture has {len(architecture)} blocks, the search space "
                     f"{space.num_blocks}")
  for index in range(space.num_blocks):
    if architecture is None:
      x = SearchBlock(space, index, relaxation, name=f"block_{index}", precision=precision)(
          x, train=train, temperature=temperature, aux_skip=aux_skip)
    elif architecture[index].kept:
      x = DiscreteBlock(architecture[index], space.stride(index), space.activation,
                        batch_norm=space.batch_norm, name=f"block_{index}", precision=precision)(
                            x, train)
  return x


# The `model` config section of a DNAS model (`ModelSpec.defaults`). Gumbel by default:
# with a plain softmax mixture the weights can rescale to undo any mixing weight, so a
# resource penalty moves probability to cheap ops (zero) without changing the fit.
DEFAULTS = {"backbone": {"type": "DNAS", **dataclasses.asdict(SearchSpace())},
            "relaxation": "gumbel", "architecture": ""}


def build_supernet(model_config: Any, num_classes: int, compute_dtype: Any,
                   plan: PrecisionPlan | None = None) -> Supernet:
  """The registry `build` function (`ModelSpec.build`) for DNAS models.

  Args:
    model_config: the `model` section (see `DEFAULTS`): `backbone` (the search space,
      `dsjax.nas.space.from_config`), `relaxation`, and `architecture` (path to an
      architecture.json; empty builds the supernet for search).
    num_classes: number of output logits.
    compute_dtype: compute dtype.
    plan: per-layer precision plan, or None.

  Returns:
    The supernet, or the derived discrete network when an architecture file is given.

  Raises:
    ConfigError: an invalid search space or architecture file.
  """
  space = space_lib.from_config(model_config["backbone"])
  path = model_config.get("architecture") or ""
  architecture = choices_from_dict(load_architecture(path, space)) if path else None
  return Supernet(space=space, num_classes=num_classes,
                  relaxation=model_config.get("relaxation", DEFAULTS["relaxation"]),
                  architecture=architecture, precision=LayerPrecision(compute_dtype, plan))


def check_config(model_config: Any) -> list[str]:
  """The registry `check` function: problems of the backbone, relaxation and architecture."""
  problems = []
  if model_config.get("relaxation") not in relax_lib.RELAXATIONS:
    problems.append(f"relaxation must be one of {relax_lib.RELAXATIONS}, "
                    f"got {model_config.get('relaxation')!r}")
  try:
    space = space_lib.from_config(model_config["backbone"])
    if model_config.get("architecture"):
      load_architecture(model_config["architecture"], space)
  except ConfigError as error:
    problems.append(str(error))
  return problems


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
  """Splits `model.init` output into (params, arch, other collections)."""
  rest = {k: v for k, v in variables.items() if k not in ("params", ARCH)}
  return variables["params"], variables.get(ARCH, {}), rest


def count_params(params: Any) -> int:
  """Returns the number of scalars in a parameter tree."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def block_names(space: SearchSpace) -> Sequence[str]:
  """Returns the module names of the blocks, which key the `arch` collection."""
  return [f"block_{index}" for index in range(space.num_blocks)]


registry.register(registry.ModelSpec(
    name="dnas-digits", build=build_supernet, defaults=DEFAULTS, dataset="digits",
    config_file="digits_dnas.py", check=check_config, searchable=True))
registry.register(registry.ModelSpec(
    name="dnas-cifar10", build=build_supernet, defaults=DEFAULTS, dataset="cifar10",
    config_file="cifar10_dnas.py", check=check_config, searchable=True))
