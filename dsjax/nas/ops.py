"""The DNAS search-space ops, each declared once: its module, cost and derived form.

An `OpSpec` says everything the search needs of one op family: how its flax module
computes (`build`), its FLOPs and parameter counts (`flops`, `params`: the cost model's
formulas, shared by the expected cost the search optimises and the exact cost `derive`
reports), whether it is offered once per kernel size ("conv_3x3", "conv_5x5") or once
("identity"), whether strided blocks may use it, and whether it is parameter-free (the
collapse guard's ops). `register_op` adds it to the registry that `dsjax.nas.space`
(candidates), `dsjax.nas.cost` (formulas), `dsjax.nas.derivation` (derived form) and the
supernet (`dsjax.models.supernet`, through `Op`) all read. An op without a cost formula
cannot be declared, so a resource penalty never meets an op it counts as free by mistake.

The derived form of a candidate is its family and kernel size, as `architecture.json`
stores them: "sep_conv_5x5" is ("sep_conv", 5), "identity" is ("identity", None).

Numeric formats. An op with `formats=True` computes in a numeric format given at call
time (`Op.__call__(..., numeric_format="int8")`): its build takes a `numeric_format`
keyword and hands it to its `dsjax.nn.Conv` layers, which quantize (or cast) their kernel
and inputs. A call-time argument, not an attribute, so the format search can call one op
(one set of weights) under every candidate format, and the derived block runs the very
same code with its one format. Its `biases` formula counts the parameters kept at 32 bits
(biases, BatchNorm scale and bias) for the model-bytes cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import nn as dsnn
from dsjax.errors import ConfigError
from dsjax.precision import LayerPrecision, quantize

# `build(op, x, kernel_size, train) -> y`: runs inside `Op.__call__`, so the layers it
# creates are `op`'s submodules (named as the op's parameters are: "conv", "bn", ...).
# With `formats=True` it also takes a `numeric_format=` keyword.
Build = Callable[..., jax.Array]
# `flops(kernel_size, c_in, c_out, out_hw)` and `params(kernel_size, c_in, c_out,
# batch_norm)`: plain arithmetic, so they take Python numbers and traced expectations alike.
Flops = Callable[[int | None, Any, Any, int], Any]
Params = Callable[[int | None, Any, Any, bool], Any]


def _no_params(k: int | None, c_in: Any, c_out: Any, batch_norm: bool) -> Any:
  return 0 * c_out  # Keeps a traced width's type: the formulas take expectations too.


_REGISTRY: dict[str, OpSpec] = {}


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One op family of the search space.

  Attributes:
    name: the family name ("conv"); candidates are "conv_3x3"... when `sized`.
    build: the module body (see `Build`); convolutions end with `normalise_and_activate`.
    flops: FLOPs (2 x multiply-accumulates of convolutions and dense layers; bias adds
      and activations are not counted) of one example's op at output size `out_hw`.
    params: parameter count, biases and BatchNorm scale and bias included.
    sized: one candidate per kernel size of the space; False: one candidate, `name`.
    strided: may sit in a block with stride > 1 (identity may not).
    param_free: has no parameters (identity, zero), what DARTS-style searches drift to.
    formats: the build takes a `numeric_format` keyword (see the module docstring), so
      spaces with `precision_choices` may offer the op; param-free ops need none.
    biases: of `params`, those stored in 32 bits whatever the format (biases, BatchNorm
      scale and bias); the rest are weights in the block's format. Needed with `formats`.
  """

  name: str
  build: Build
  flops: Flops | None = None
  params: Params | None = None
  sized: bool = True
  strided: bool = True
  param_free: bool = False
  formats: bool = False
  biases: Params = _no_params

  def __post_init__(self) -> None:
    for formula in ("flops", "params"):
      if not callable(getattr(self, formula)):
        raise ValueError(f"op {self.name!r} declares no {formula} formula; every op needs "
                         "flops and params (a formula returning 0 for a free op), or the "
                         "resource penalty would count it as free")
    if "_" in self.name and self.name[-1].isdigit():
      raise ValueError(f"op name {self.name!r} must not end in a digit after '_' (candidate "
                       "names append _KxK)")

  def candidates(self, kernel_sizes: Sequence[int], stride: int) -> tuple[str, ...]:
    """The candidate names this op offers a block of `stride` in a space of `kernel_sizes`."""
    if stride > 1 and not self.strided:
      return ()
    if not self.sized:
      return (self.name,)
    return tuple(candidate_name(self.name, k) for k in kernel_sizes)


def register_op(spec: OpSpec) -> OpSpec:
  """Adds an op family to the registry; names are unique."""
  if spec.name in _REGISTRY:
    raise ValueError(f"op {spec.name!r} is registered twice")
  _REGISTRY[spec.name] = spec
  return spec


def known_ops() -> tuple[str, ...]:
  """The registered op families, in registration order (the arch logits' order)."""
  return tuple(_REGISTRY)


def get_op(family: str) -> OpSpec:
  """The declaration of an op family.

  Raises:
    ConfigError: the family is not registered; the message lists the known ones.
  """
  if family not in _REGISTRY:
    raise ConfigError(f"unknown DNAS op {family!r}; known ops: {', '.join(known_ops())}")
  return _REGISTRY[family]


def op_family(candidate: str) -> str:
  """Returns the op family of a candidate name: "conv_3x3" -> "conv"."""
  return candidate.rsplit("_", 1)[0] if candidate.endswith(tuple("0123456789")) else candidate


def op_kernel(candidate: str) -> int | None:
  """Returns the kernel size of a candidate name ("conv_3x3" -> 3), None for unsized ops."""
  if not get_op(op_family(candidate)).sized:
    return None
  return int(candidate.rsplit("x", 1)[1])


def candidate_name(family: str, kernel_size: int | None) -> str:
  """Returns the candidate name of an op family and kernel: ("conv", 3) -> "conv_3x3"."""
  return f"{family}_{kernel_size}x{kernel_size}" if get_op(family).sized else family


def fit_channels(x: jax.Array, width: int) -> jax.Array:
  """Zero-pads or truncates the channel (last) axis of `x` to `width`."""
  have = x.shape[-1]
  if have >= width:
    return x[..., :width]
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - have)])


class Op(nn.Module):
  """One candidate op producing `features` channels, as its `OpSpec` builds it.

  Attributes:
    candidate: candidate name, e.g. "sep_conv_3x3" (see `op_family`, `op_kernel`).
    features: output channels.
    stride: spatial stride (identity requires 1).
    activation: "relu", "silu" or "gelu", applied after convolutions.
    precision: compute dtype and per-layer plan (`dsjax.precision.LayerPrecision`), handed
      to every sub-layer; parameters stay float32.
    batch_norm: BatchNorm between the convolution and the activation; the convolution
      then has no bias (BatchNorm's own bias would cancel it).
    affine: the BatchNorm learns a per-channel scale and bias (the derived network);
      False normalises only, as DARTS' search ops do (`affine=False`).
  """

  candidate: str
  features: int
  stride: int = 1
  activation: str = "relu"
  precision: LayerPrecision = LayerPrecision()
  batch_norm: bool = False
  affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               numeric_format: str | quantize.FormatMixture | None = None) -> jax.Array:
    """Applies the op; `numeric_format` (a `dsjax.precision.FORMATS` name, or a
    `quantize.FormatMixture`) sets the format its convolutions compute in (None: the run's
    precision). Param-free ops ignore it."""
    spec = get_op(op_family(self.candidate))
    if numeric_format is None or spec.param_free:
      return spec.build(self, x, op_kernel(self.candidate), train)
    if not spec.formats:
      raise ConfigError(f"op {spec.name!r} cannot compute in numeric format "
                        f"{numeric_format!r} (its OpSpec has formats=False)")
    return spec.build(self, x, op_kernel(self.candidate), train, numeric_format=numeric_format)


def normalise_and_activate(op: Op, y: jax.Array, train: bool) -> jax.Array:
  """The end of every convolution op: BatchNorm (if the space has it), then the activation."""
  if op.batch_norm:
    y = dsnn.BatchNorm(use_scale=op.affine, use_bias=op.affine, param_axis="conv_out",
                       name="bn", precision=op.precision)(y, use_running_average=not train)
  return getattr(nn, op.activation)(y)


def _bias(c_out: Any, batch_norm: bool) -> Any:
  # A convolution's bias, or (batch_norm) BatchNorm's scale and bias in its place.
  return 2 * c_out if batch_norm else c_out


def _conv(op: Op, x: jax.Array, k: int | None, train: bool,
          numeric_format: str | quantize.FormatMixture | None = None) -> jax.Array:
  y = dsnn.Conv(op.features, (k, k), strides=op.stride, use_bias=not op.batch_norm,
                name="conv", precision=op.precision)(x, numeric_format=numeric_format)
  return normalise_and_activate(op, y, train)


def _sep_conv(op: Op, x: jax.Array, k: int | None, train: bool,
              numeric_format: str | quantize.FormatMixture | None = None) -> jax.Array:
  # Depthwise k x k (no bias), then pointwise 1 x 1; both in the block's format.
  y = dsnn.Conv(x.shape[-1], (k, k), strides=op.stride, use_bias=False,
                feature_group_count=x.shape[-1], name="depthwise", precision=op.precision)(
                    x, numeric_format=numeric_format)
  y = dsnn.Conv(op.features, (1, 1), use_bias=not op.batch_norm, name="pointwise",
                precision=op.precision)(y, numeric_format=numeric_format)
  return normalise_and_activate(op, y, train)


def _identity(op: Op, x: jax.Array, k: int | None, train: bool) -> jax.Array:
  # Other widths zero-pad or drop trailing channels: what the supernet's channel masks do.
  return fit_channels(x, op.features).astype(op.precision.dtype(op))


def _zero(op: Op, x: jax.Array, k: int | None, train: bool) -> jax.Array:
  height, width = (-(-d // op.stride) for d in x.shape[1:3])
  return jnp.zeros((x.shape[0], height, width, op.features),
                   op.precision.dtype(op))


register_op(OpSpec(
    "conv", _conv,
    flops=lambda k, c_in, c_out, out_hw: 2 * out_hw * k * k * c_in * c_out,
    params=lambda k, c_in, c_out, batch_norm: k * k * c_in * c_out + _bias(c_out, batch_norm),
    formats=True, biases=lambda k, c_in, c_out, batch_norm: _bias(c_out, batch_norm)))
register_op(OpSpec(
    "sep_conv", _sep_conv,
    flops=lambda k, c_in, c_out, out_hw: 2 * out_hw * (k * k * c_in + c_in * c_out),
    params=lambda k, c_in, c_out, batch_norm: (k * k * c_in + c_in * c_out
                                               + _bias(c_out, batch_norm)),
    formats=True, biases=lambda k, c_in, c_out, batch_norm: _bias(c_out, batch_norm)))
register_op(OpSpec(
    "identity", _identity, flops=lambda k, c_in, c_out, out_hw: 0 * c_out,
    params=_no_params, sized=False, strided=False, param_free=True))
register_op(OpSpec(
    "zero", _zero, flops=lambda k, c_in, c_out, out_hw: 0 * c_out,
    params=_no_params, sized=False, param_free=True))
