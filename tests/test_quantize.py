"""Tests of dsjax.precision.quantize: numeric formats, fake quantization and their costs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.errors import ConfigError
from dsjax.nas import ops as ops_lib
from dsjax.precision import (
    FORMATS,
    NumericFormat,
    apply_format,
    bit_ops,
    expected_bit_ops,
    expected_bits,
    fake_quant,
    get_format,
    model_bytes,
    quantize,
)


def _rand(shape, seed=0):
  return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


def _reference(x, bits, axis=None, scale=None):
  """fake_quant in float64 numpy: np.round is round-half-to-even too."""
  x = np.asarray(x, np.float64)
  qmax = 2 ** (bits - 1) - 1
  if scale is None:
    reduce = None if axis is None else tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    max_abs = np.max(np.abs(x), axis=reduce, keepdims=axis is not None)
    scale = np.where(max_abs > 0, max_abs / qmax, 1.0)
  return np.clip(np.round(x / scale), -qmax, qmax) * scale


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", [None, -1, 0])
def test_fake_quant_matches_the_numpy_reference(bits, axis):
  x = _rand((3, 3, 4, 6), seed=bits) * np.linspace(0.1, 3.0, 6, dtype=np.float32)
  out = fake_quant(jnp.asarray(x), bits, axis=axis)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, _reference(x, bits, axis), rtol=1e-6, atol=1e-7)
  # At most 2 qmax + 1 levels per scale.
  one_scale = np.asarray(out) if axis is None else np.take(np.asarray(out), 0, axis=axis)
  levels = np.unique(one_scale)
  assert len(levels) <= 2 ** bits - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_half_steps_round_to_even_and_signs_are_symmetric(bits):
  qmax = 2 ** (bits - 1) - 1
  # max|x| = qmax / 2 makes the calibrated scale exactly 0.5, so x / scale is exact:
  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4 (half to even), mirrored for negatives.
  x = np.array([0.0, 0.25, 0.75, 1.25, 1.75, -0.25, -0.75, -1.25, -1.75, qmax / 2, -0.1],
               np.float32)
  out = np.asarray(fake_quant(jnp.asarray(x), bits))
  expected = np.array([0, 0, 2, 2, 4, 0, -2, -2, -4, qmax, 0], np.float64) * 0.5
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(out, _reference(x, bits))
  np.testing.assert_array_equal(fake_quant(jnp.asarray(-x), bits), -out)


def test_all_zero_tensors_and_channels_stay_zero():
  zeros = jnp.zeros((4, 5))
  for axis in (None, -1):
    out = fake_quant(zeros, 8, axis=axis)
    assert not jnp.any(jnp.isnan(out)) and not jnp.any(out)
    grad = jax.grad(lambda x, axis=axis: fake_quant(x, 8, axis=axis).sum())(zeros)
    np.testing.assert_array_equal(grad, np.ones((4, 5)))
  # One zero output channel among live ones: its scale is guarded, the others unaffected.
  w = np.asarray(_rand((4, 3)))
  w[:, 1] = 0.0
  out = fake_quant(jnp.asarray(w), 4, axis=-1)
  np.testing.assert_array_equal(out[:, 1], np.zeros(4))
  np.testing.assert_allclose(out, _reference(w, 4, axis=-1), rtol=1e-6)


def test_a_given_scale_clips_and_broadcasts_per_channel():
  x = np.array([[-3.0, 0.2], [0.4, 9.0], [1.1, -0.6]], np.float32)
  # int4 with scale 0.25: the levels reach 7 x 0.25 = 1.75, so -3 and 9 clip; the rest round.
  out = fake_quant(jnp.asarray(x), 4, scale=0.25)
  np.testing.assert_allclose(out, _reference(x, 4, scale=0.25))
  assert out[0, 0] == -1.75 and out[1, 1] == 1.75
  # Per channel: a [channels] vector is laid along `axis`.
  scales = np.array([0.5, 0.05], np.float32)
  out = fake_quant(jnp.asarray(x), 4, axis=-1, scale=jnp.asarray(scales))
  np.testing.assert_allclose(out, _reference(x, 4, scale=scales[None, :]), rtol=1e-6)
  with pytest.raises(ConfigError, match="does not broadcast"):
    fake_quant(jnp.asarray(x), 4, scale=jnp.ones(3))


def test_straight_through_gradient():
  x = jnp.asarray(_rand((5, 7), seed=1))
  w = jnp.asarray(_rand((5, 7), seed=2))

  def loss(x, **kw):
    return jnp.sum(fake_quant(x, 8, **kw) * w)

  # Calibrated max-abs scales: nothing saturates, so the gradient is w itself.
  np.testing.assert_array_equal(jax.grad(loss)(x), w)
  np.testing.assert_array_equal(jax.grad(lambda x: loss(x, axis=-1))(x), w)
  # A fixed scale that clips: 0 where |x| / scale > qmax + 1/2, w elsewhere.
  scale = 0.5 / 127
  grad = jax.grad(lambda x: loss(x, scale=jax.lax.stop_gradient(scale)))(x)
  inside = np.abs(np.asarray(x, np.float64)) / scale <= 127.5
  assert 0 < inside.sum() < inside.size
  np.testing.assert_array_equal(grad, np.where(inside, w, 0.0))


def test_learned_scale_has_the_lsq_gradient():
  x = jnp.asarray(_rand((6, 4), seed=3))
  scale = jnp.float32(0.02)
  _, grad = jax.grad(lambda x, s: jnp.sum(fake_quant(x, 4, scale=s)), argnums=(0, 1))(x, scale)
  v = np.asarray(x, np.float64) / 0.02
  levels = np.clip(np.round(v), -7, 7)
  step = np.where(np.abs(v) <= 7.5, levels - v, levels)  # Esser et al. 2019, eq. 3.
  np.testing.assert_allclose(grad, step.sum() / np.sqrt(x.size * 7), rtol=1e-5)


def test_float_formats_are_round_trip_casts():
  x = jnp.asarray(_rand((4, 8), seed=4) * 100 + 1e-3)
  for name, dtype in (("bfloat16", jnp.bfloat16), ("float16", jnp.float16)):
    out = apply_format(x, name)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, x.astype(dtype).astype(jnp.float32))
    assert jnp.any(out != x)  # It did round.
  assert apply_format(x, "float32") is x
  assert apply_format(x.astype(jnp.bfloat16), "float32").dtype == jnp.bfloat16
  with pytest.raises(ConfigError, match="takes no quantization scale"):
    apply_format(x, "bfloat16", scale=1.0)


def test_non_negative_activations_take_the_unsigned_levels():
  """A ReLU's output (per tensor, calibrated) uses 0 .. 2^bits - 1: the numpy reference
  with qmax 15 for int4; a tensor with a negative value, and weights, stay signed."""
  relu = jnp.maximum(jnp.asarray(_rand((4, 8), seed=6)), 0.0)
  step = float(jnp.max(relu)) / 15
  want = np.clip(np.round(np.asarray(relu) / step), 0, 15) * step
  np.testing.assert_allclose(apply_format(relu, "int4"), want, rtol=1e-6, atol=1e-7)
  assert len(np.unique(np.asarray(apply_format(relu, "int4")))) > 8  # More than signed's.
  signed = jnp.asarray(_rand((4, 8), seed=6))
  np.testing.assert_allclose(apply_format(signed, "int4"), _reference(np.asarray(signed), 4),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(apply_format(relu, "int4", channel_axis=-1),
                             _reference(np.asarray(relu), 4, axis=-1), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(fake_quant(relu, 4), _reference(np.asarray(relu), 4), rtol=1e-6,
                             atol=1e-7)


def test_a_format_mixture_is_the_weighted_sum_of_the_formats():
  """FormatMixture (format_mixing="operands"): sum_f w_f * x in f, per channel for weights,
  against the numpy reference and casts; its gradient in w_f is x in f."""
  x = jnp.asarray(_rand((4, 8), seed=5) * 3)
  weights = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  names = ("float32", "bfloat16", "int8", "int4")
  mixture = quantize.FormatMixture(weights, names)
  want = (0.1 * np.asarray(x) + 0.2 * np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))
          + 0.3 * _reference(np.asarray(x), 8, axis=-1)
          + 0.4 * _reference(np.asarray(x), 4, axis=-1))
  np.testing.assert_allclose(apply_format(x, mixture, channel_axis=-1), want, rtol=1e-6,
                             atol=1e-6)
  grad = jax.grad(lambda w: jnp.sum(apply_format(
      x, quantize.FormatMixture(w, names), channel_axis=-1)))(weights)
  np.testing.assert_allclose(grad[3], _reference(np.asarray(x), 4, axis=-1).sum(), rtol=1e-5)
  with pytest.raises(ConfigError, match="mixture takes no quantization scale"):
    apply_format(x, mixture, scale=1.0)


def test_integer_formats_quantize_weights_per_channel_and_activations_per_tensor():
  kernel = jnp.asarray(_rand((3, 3, 2, 5), seed=5) * np.arange(1, 6, dtype=np.float32))
  activations = jnp.asarray(_rand((2, 4, 4, 2), seed=6))
  np.testing.assert_allclose(apply_format(kernel, "int4", channel_axis=-1),
                             _reference(kernel, 4, axis=-1), rtol=1e-6)
  np.testing.assert_allclose(apply_format(activations, FORMATS["int8"]),
                             _reference(activations, 8), rtol=1e-6)
  half = apply_format(kernel.astype(jnp.bfloat16), "int8", channel_axis=-1)
  assert half.dtype == jnp.bfloat16
  jitted = jax.jit(apply_format, static_argnames=("fmt", "channel_axis"))
  np.testing.assert_array_equal(jitted(kernel, fmt="int4", channel_axis=-1),
                                apply_format(kernel, "int4", channel_axis=-1))


def test_formats_and_their_errors():
  assert [(f.name, f.bits, f.kind) for f in FORMATS.values()] == [
      ("float32", 32, "float"), ("bfloat16", 16, "float"), ("float16", 16, "float"),
      ("int8", 8, "int"), ("int4", 4, "int"), ("int2", 2, "int")]
  assert get_format("int4") is FORMATS["int4"] and get_format(FORMATS["int8"]).bits == 8
  with pytest.raises(ConfigError, match="known formats: float32, bfloat16, float16, int8"):
    get_format("int3")
  with pytest.raises(ConfigError, match="unknown numeric format 'fp8'"):
    apply_format(jnp.ones(3), "fp8")
  with pytest.raises(ConfigError, match="2 to 16 bits"):
    fake_quant(jnp.ones(3), 1)
  with pytest.raises(ConfigError, match="kind"):
    NumericFormat("int3", 3, "fixed")
  with pytest.raises(ConfigError, match="out of range"):
    fake_quant(jnp.ones((2, 3)), 8, axis=2)
  with pytest.raises(ConfigError, match="floating-point"):
    fake_quant(jnp.ones(3, jnp.int32), 8)


def test_bit_ops_and_bytes_of_a_two_layer_net():
  # conv 3x3, 1 -> 8 channels, SAME on 8x8: 8*8 positions x 8 outputs x 3*3*1 = 4,608 MACs,
  #   3*3*1*8 + 8 = 80 params.
  # dense 512 (= 8*8*8) -> 10: 512 x 10 = 5,120 MACs, 5,130 params.
  conv_macs, conv_params, dense_macs, dense_params = 4608, 80, 5120, 5130
  conv = ops_lib.get_op("conv")  # The search's own formulas agree (FLOPs = 2 x MACs).
  assert conv.flops(3, 1, 8, 8 * 8) == 2 * conv_macs
  assert conv.params(3, 1, 8, False) == conv_params
  # float32 everywhere: 9,728 MACs x 32 x 32 = 9,961,472 bit-ops; 5,210 x 4 = 20,840 bytes.
  assert bit_ops(conv_macs, 32, 32) + bit_ops(dense_macs, 32, 32) == 9_961_472
  assert model_bytes(conv_params, 32) + model_bytes(dense_params, 32) == 20_840
  # conv int8 weights x int4 inputs: 4,608 x 8 x 4 = 147,456; dense int4 x int4:
  # 5,120 x 16 = 81,920; total 229,376 (43.4x fewer). Bytes: 80 + 5,130 / 2 = 2,645.
  assert bit_ops(conv_macs, 8, 4) == 147_456 and bit_ops(dense_macs, 4, 4) == 81_920
  assert model_bytes(conv_params, 8) + model_bytes(dense_params, 4) == 2_645
  # The same from format names, and traced: the costs are plain arithmetic.
  fmt = get_format
  traced = jax.jit(lambda m: bit_ops(m, fmt("int8").bits, fmt("int4").bits))(conv_macs)
  assert float(traced) == 147_456


def test_expected_bits_and_bit_ops_are_expectations_differentiable_in_logits():
  formats = ("float32", "bfloat16", "int8", "int4")
  probs = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  # 0.1*32 + 0.2*16 + 0.3*8 + 0.4*4 = 10.4.
  np.testing.assert_allclose(expected_bits(probs, formats), 10.4, rtol=1e-6)
  # One choice for weights and activations: E[bits^2] = 0.1*1024 + 0.2*256 + 0.3*64
  # + 0.4*16 = 179.2 per MAC, not 10.4^2 = 108.16.
  np.testing.assert_allclose(expected_bit_ops(5120, probs, formats), 5120 * 179.2, rtol=1e-6)
  one_hot = jnp.asarray([0.0, 0.0, 1.0, 0.0])
  assert float(expected_bit_ops(5120, one_hot, formats)) == bit_ops(5120, 8, 8)
  assert float(model_bytes(5130, expected_bits(one_hot, formats))) == 5130
  grad = jax.grad(lambda logits: expected_bits(jax.nn.softmax(logits), formats))(jnp.zeros(4))
  # d/dlogit_i of sum_j softmax_j bits_j at uniform = (bits_i - mean) / 4.
  np.testing.assert_allclose(grad, (np.array([32, 16, 8, 4]) - 15.0) / 4, rtol=1e-6)
  with pytest.raises(ConfigError, match="one probability per candidate format"):
    expected_bits(probs[:3], formats)
