"""Numeric formats as data: their simulated rounding (casts, fake quantization) and costs.

A `NumericFormat` names how a layer's weights and input activations are represented:
a float format ("float32", "bfloat16", "float16") is a cast, and `apply_format` rounds to
it and back, so a bfloat16 layer's rounding is simulated inside a float32 graph; an integer
format ("int8", "int4", "int2") is symmetric signed fake quantization (`fake_quant`):
weights per output channel, activations per tensor (unsigned levels for an activation
without negative values, a ReLU's output, as uint8/uint4 kernels take it). Costs are
plain arithmetic on Python numbers or traced arrays, so a search can take their
expectation under its probabilities (`expected_bits`, `expected_bit_ops`) and
differentiate it in the logits.

AQT (`aqtp` 0.9) is not used: its convolution path (`AqtConvGeneralDilated`) quantizes the
forward pass only, and with jax 0.10 the gradients wrt kernel and input through it are
zero (the straight-through VJP exists only on its dot_general path). It also quantizes
inside the op it replaces, while a format search needs the quantized tensors themselves,
to mix the outputs of candidate formats computed from one set of weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dsjax.errors import ConfigError

FLOAT = "float"
INT = "int"
_MAX_INT_BITS = 16  # Integer levels of more bits are no longer exact in a float32 graph.


@dataclasses.dataclass(frozen=True)
class NumericFormat:
  """One numeric format a layer can compute in.

  Attributes:
    name: the format's name, as configs and `architecture.json` write it ("int8").
    bits: bits per value; the weight and activation bits of the cost formulas.
    kind: "float" (a cast to the dtype named `name`) or "int" (symmetric signed fake
      quantization with `bits` bits).
  """

  name: str
  bits: int
  kind: str

  def __post_init__(self) -> None:
    if self.kind not in (FLOAT, INT):
      raise ConfigError(f"numeric format {self.name!r} has kind {self.kind!r}; use "
                        f"{FLOAT!r} or {INT!r}")
    if self.kind == INT:
      _check_bits(self.bits)


def _check_bits(bits: Any) -> int:
  if not isinstance(bits, int) or not 2 <= bits <= _MAX_INT_BITS:
    raise ConfigError(f"integer quantization needs 2 to {_MAX_INT_BITS} bits (a Python int), "
                      f"got {bits!r}")
  return bits


FORMATS: dict[str, NumericFormat] = {fmt.name: fmt for fmt in (
    NumericFormat("float32", 32, FLOAT),
    NumericFormat("bfloat16", 16, FLOAT),
    NumericFormat("float16", 16, FLOAT),
    NumericFormat("int8", 8, INT),
    NumericFormat("int4", 4, INT),
    NumericFormat("int2", 2, INT),  # Ternary: the levels -1, 0, 1 times the scale.
)}


def get_format(name: str | NumericFormat) -> NumericFormat:
  """Returns the numeric format called `name` (a `NumericFormat` is returned as is).

  Raises:
    ConfigError: the name is not in `FORMATS`; the message lists the known ones.
  """
  if isinstance(name, NumericFormat):
    return name
  if name not in FORMATS:
    raise ConfigError(f"unknown numeric format {name!r}; known formats: {', '.join(FORMATS)}")
  return FORMATS[name]


def _check_floating(x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ConfigError(f"numeric formats apply to floating-point tensors, got {x.dtype}; cast "
                      "the tensor to float32 first")


def _kept_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes or any(not -ndim <= a < ndim for a in axes):
    raise ConfigError(f"quantization axis {axis!r} is out of range for a rank-{ndim} tensor; "
                      f"name channel axes in [-{ndim}, {ndim})")
  return tuple(sorted(a % ndim for a in axes))


def _levels(x: jax.Array, scale: jax.Array, qmax: int) -> jax.Array:
  # jnp.round is round-half-to-even, as integer hardware and numpy round.
  return jnp.clip(jnp.round(x / scale), -qmax, qmax)


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # The transpose of broadcasting `shape` up to t.shape.
  t = t.sum(axis=tuple(range(t.ndim - len(shape))))
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
  return t.sum(axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantize(x: jax.Array, scale: jax.Array, qmax: int) -> jax.Array:
  return _levels(x, scale, qmax) * scale


def _quantize_fwd(x: jax.Array, scale: jax.Array, qmax: int) -> tuple[jax.Array, Any]:
  return _quantize(x, scale, qmax), (x, scale)


def _quantize_bwd(qmax: int, residuals: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, scale = residuals
  v = x / scale
  # Saturated: the value lies more than half a step beyond the largest level, so its error
  # is clipping, not rounding. The half step also keeps the max-abs element inside when
  # float error puts it a hair above qmax.
  inside = jnp.abs(v) <= qmax + 0.5
  levels = _levels(x, scale, qmax)
  # LSQ's d(dequantized)/d(scale): round(v) - v inside, the clipped level outside.
  step = jnp.where(inside, levels - v, levels)
  per_scale = max(x.size // max(scale.size, 1), 1)
  grad_scale = 1.0 / math.sqrt(per_scale * qmax)
  dscale = _sum_to_shape(g * step, scale.shape) * grad_scale
  return jnp.where(inside, g, jnp.zeros_like(g)), dscale.astype(scale.dtype)


_quantize.defvjp(_quantize_fwd, _quantize_bwd)


def fake_quant(x: jax.Array, bits: int, *, axis: int | Sequence[int] | None = None,
               scale: Any = None, unsigned_if_nonnegative: bool = False) -> jax.Array:
  """Symmetric signed integer fake quantization: quantize, then dequantize.

  x -> clip(round_half_even(x / scale), -qmax, qmax) * scale, qmax = 2^(bits-1) - 1; zero
  maps to zero. Computed in float32 (or x's dtype if wider) and returned in x's dtype.

  Gradients. Wrt x, a straight-through estimator: 1 where |x / scale| <= qmax + 1/2 (the
  error is rounding) and 0 where the value saturates. Calibrated scales (scale=None) are
  the max-abs of this call's tensor (per tensor, or per channel along `axis`) and are
  constants (stop_gradient); nothing saturates, so the gradient wrt x is the identity.
  A given scale is learnable with the LSQ step-size gradient (Esser et al. 2019, "Learned
  Step Size Quantization"): round(x/s) - x/s inside, +-qmax where saturated, summed over
  the elements sharing the scale and multiplied by LSQ's gradient scale
  1/sqrt(elements per scale x qmax); wrap it in `jax.lax.stop_gradient` to keep it fixed.

  Args:
    x: a floating-point tensor.
    bits: integer bits, 2 to 16 (a Python int).
    axis: None: one scale for the tensor (activations); an axis or axes: one scale per
      index along them, the max-abs over the other axes (weights: the output channel, -1
      for Dense [in, out] and Conv HWIO kernels).
    scale: None (calibrated max-abs), or positive scales broadcastable to x: a scalar, an
      array of x's rank, or (with `axis`) one of shape [x.shape[a] for a in axis].
    unsigned_if_nonnegative: with a calibrated scale, a tensor without a negative value
      (a ReLU's output) uses the unsigned levels 0 .. 2^bits - 1, as integer kernels take
      post-ReLU activations (uint8, uint4): twice the levels of the signed range, which
      would leave its negative half unused. Decided per call, from the values.

  Returns:
    The dequantized tensor, x's shape and dtype.

  Raises:
    ConfigError: bits outside 2..16, an axis out of range, a non-floating x or a scale
      that does not broadcast to x.
  """
  qmax = 2 ** (_check_bits(bits) - 1) - 1
  x = jnp.asarray(x)
  _check_floating(x)
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xc = x.astype(compute)
  kept = None if axis is None else _kept_axes(axis, x.ndim)
  if scale is None:
    reduce = None if kept is None else tuple(a for a in range(x.ndim) if a not in kept)
    max_abs = jnp.max(jnp.abs(xc), axis=reduce, keepdims=kept is not None)
    levels = qmax
    if unsigned_if_nonnegative:
      # Max-abs scales saturate nothing, so the wider clip of the unsigned range (which a
      # signed tensor never reaches) leaves the signed case exactly as it was.
      levels = jnp.where(jnp.all(xc >= 0), 2 * qmax + 1, qmax).astype(compute)
      qmax = 2 * qmax + 1
    # An all-zero tensor (or channel) gets scale 1: its values quantize to 0, not NaN.
    scale = jax.lax.stop_gradient(jnp.where(max_abs > 0, max_abs / levels, 1.0))
  else:
    scale = jnp.asarray(scale, compute)
    if kept is not None and scale.shape == tuple(x.shape[a] for a in kept) and scale.ndim:
      scale = scale.reshape([x.shape[a] if a in kept else 1 for a in range(x.ndim)])
    try:
      broadcast = jnp.broadcast_shapes(scale.shape, x.shape)
    except ValueError:
      broadcast = None
    if broadcast != x.shape:
      raise ConfigError(f"quantization scale of shape {scale.shape} does not broadcast to "
                        f"the tensor's {x.shape}; give a scalar or one scale per channel")
  return _quantize(xc, scale, qmax).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class FormatMixture:
  """A relaxed format choice: `apply_format` gives sum_f weights[f] * x rounded to f.

  EdMIPS' (Cai and Vasconcelos 2020) composite operands: a layer computing in a mixture
  convolves the mixed inputs with the mixed kernel, one convolution for all formats.

  Attributes:
    weights: float [len(formats)], the relaxed architecture weights (may be traced).
    formats: the candidate formats' names.
  """

  weights: Any
  formats: tuple[str, ...]


def apply_format(x: jax.Array, fmt: str | NumericFormat | FormatMixture, *,
                 channel_axis: Any = None, scale: Any = None) -> jax.Array:
  """Simulates `fmt` on `x`: what a layer in that format computes with, in x's dtype.

  Float formats cast to their dtype and back, so the rounding (and range) of a bfloat16 or
  float16 layer is exact inside a float32 graph; the backward pass rounds the cotangent
  too, as that layer's would be. Integer formats call `fake_quant`. A `FormatMixture` is
  the weighted sum of `x` in each of its formats.

  Args:
    x: a floating-point tensor: a layer's weights or its input activations.
    fmt: a name in `FORMATS` or a `NumericFormat`.
    channel_axis: integer formats only: the channel axis (or axes) of a weight tensor,
      one scale each (-1 for Dense and Conv kernels); None: one scale for the tensor
      (activations). Float formats ignore it.
    scale: integer formats only: a learned or calibrated scale (see `fake_quant`).

  Returns:
    x's shape and dtype.

  Raises:
    ConfigError: an unknown format, or a scale given for a float format or a mixture.
  """
  if isinstance(fmt, FormatMixture):
    if scale is not None:
      raise ConfigError("a format mixture takes no quantization scale; drop the scale")
    return sum(fmt.weights[i] * apply_format(x, name, channel_axis=channel_axis)
               for i, name in enumerate(fmt.formats)).astype(jnp.asarray(x).dtype)
  fmt = get_format(fmt)
  x = jnp.asarray(x)
  _check_floating(x)
  if fmt.kind == INT:
    # Activations (one scale per tensor) of a ReLU are non-negative: unsigned levels.
    return fake_quant(x, fmt.bits, axis=channel_axis, scale=scale,
                      unsigned_if_nonnegative=channel_axis is None and scale is None)
  if scale is not None:
    raise ConfigError(f"{fmt.name} is a float format and takes no quantization scale; "
                      "drop the scale or use an integer format")
  dtype = jnp.dtype(fmt.name)
  return x if x.dtype == dtype else x.astype(dtype).astype(x.dtype)


def bit_ops(macs: Any, weight_bits: Any, activation_bits: Any) -> Any:
  """Returns a layer's bit-operations: MACs x weight bits x activation bits.

  The "BitOPs" of Wu et al. 2018 (mixed-precision DNAS) and EdMIPS (Cai and Vasconcelos
  2020): a float32 layer costs 32 x 32 = 1024 per multiply-accumulate, an int8 x int4 one
  32. The activation bits are those of the layer's own inputs.

  Args:
    macs: multiply-accumulates (half the FLOPs of `dsjax.nas.ops` formulas), a number or
      a traced expectation.
    weight_bits: bits per weight (or their expectation).
    activation_bits: bits per input activation (or their expectation).
  """
  return macs * weight_bits * activation_bits


def model_bytes(params: Any, weight_bits: Any) -> Any:
  """Returns the bytes of `params` values stored in `weight_bits` bits: params x bits / 8."""
  return params * weight_bits / 8


def _format_bits(formats: Sequence[str | NumericFormat], probs: jax.Array) -> jax.Array:
  bits = [get_format(fmt).bits for fmt in formats]
  if probs.shape[-1:] != (len(bits),):
    raise ConfigError(f"{probs.shape[-1:] or 'a scalar'} probabilities for {len(bits)} "
                      "formats; give one probability per candidate format")
  return jnp.asarray(bits, jnp.float32)


def expected_bits(probs: Any, formats: Sequence[str | NumericFormat]) -> jax.Array:
  """Returns the expected bit width, sum_i probs[i] x bits(formats[i]).

  When weights and activations choose their formats independently, the expected bit-ops
  are `bit_ops(macs, expected_bits(p_w, f_w), expected_bits(p_a, f_a))` exactly; when one
  choice sets both, use `expected_bit_ops` (E[bits^2] is not E[bits]^2).

  Args:
    probs: [..., len(formats)] probabilities (the softmax of the format logits).
    formats: the candidate formats, names or `NumericFormat`s, in the logits' order.

  Returns:
    float32 [...]: differentiable in probs.
  """
  probs = jnp.asarray(probs, jnp.float32)
  return probs @ _format_bits(formats, probs)


def expected_bit_ops(macs: Any, probs: Any, formats: Sequence[str | NumericFormat]) -> jax.Array:
  """Returns E[bit-ops] of a layer whose one format choice sets weights and activations.

  sum_i probs[i] x bit_ops(macs, bits_i, bits_i); linear in `macs`, so an expected MAC
  count (over independent op and width choices) may be passed.

  Args:
    macs: multiply-accumulates, a number or a traced expectation.
    probs: [..., len(formats)] probabilities.
    formats: the candidate formats, in the logits' order.
  """
  probs = jnp.asarray(probs, jnp.float32)
  bits = _format_bits(formats, probs)
  return bit_ops(macs, probs @ (bits * bits), 1.0)
