"""Tests of dsjax.nn: precision-aware layers, plans by layer path, the half-residual remat policy.

References are plain numpy in float64 on the same parameters. Half-precision tolerances
use the unit roundoff u (half the gap between 1 and the next number): bfloat16 keeps 8
significant bits, u = 2^-8 ≈ 3.9e-3; float16 keeps 11, u = 2^-11 ≈ 4.9e-4.
"""

from __future__ import annotations

import contextlib
import functools
import io

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.errors import ConfigError
from dsjax.nn import (
    Conv,
    Dense,
    Embed,
    LayerNorm,
    MultiHeadAttention,
    attend,
    remat,
    save_half_residuals,
)
from dsjax.precision import LayerPrecision, PrecisionPlan

UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}
HALF = [jnp.bfloat16, jnp.float16]
PROMOTE_ROOT = PrecisionPlan().promote("")  # a layer used as the root has path ""


def _f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _init(module, *args, seed=0, **kwargs):
  """Variables with the structure `module.init` gives (boxes included), numpy-filled.

  Filling from numpy rather than running the initialisers keeps this file fast: XLA:CPU
  compiles `jax.random.normal` anew for every shape, in seconds. Biases and scales come
  out nonzero too, so their handling is tested.
  """
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)
  return variables, jax.tree.map(_f64, nn.unbox(variables["params"]))


def _apply(module, variables, *args, **kwargs):
  """`module.apply` under jit: one XLA:CPU compile rather than one per eager op."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _assert_half_close(out, ref, magnitude, dtype, roundings):
  """|out - ref| <= roundings * u * magnitude, elementwise.

  `magnitude` is the sum of |terms| behind each output (e.g. |x| @ |w| + |b|): each of
  the `roundings` roundings to `dtype` on the path contributes at most u relative to it;
  float32 accumulation (u = 2^-24) is negligible next to that.
  """
  bound = roundings * UNIT_ROUNDOFF[dtype] * magnitude + 1e-6
  np.testing.assert_array_less(np.abs(_f64(out) - ref), bound)


def _rand(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, shape), jnp.float32)


# ---------------------------------------------------------------- Dense


def test_dense_params_are_logically_partitioned_and_apply_plainly():
  layer = Dense(6, kernel_axes=("embed", "mlp"))
  variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
  kernel = variables["params"]["kernel"]
  assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "mlp")
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert specs["bias"] == jax.sharding.PartitionSpec("mlp")
  boxed = layer.apply(variables, jnp.ones((2, 4)))  # no mesh, boxes as returned by init
  plain = layer.apply(nn.unbox(variables), jnp.ones((2, 4)))
  np.testing.assert_array_equal(boxed, plain)
  with pytest.raises(ValueError, match="kernel_axes"):
    Dense((2, 3)).init(jax.random.key(0), jnp.ones((2, 4)))


@pytest.mark.parametrize("features", [5, (2, 3)])
def test_dense_float32_matches_numpy(features):
  x = _rand((3, 7, 4))
  layer = Dense(features, kernel_axes=(None,) * (2 if isinstance(features, int) else 3))
  variables, p = _init(layer, x)
  out = layer.apply(variables, x)
  ref = np.tensordot(_f64(x), p["kernel"], axes=1) + p["bias"]
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_dense_half_matches_numpy(dtype):
  x = _rand((8, 32))
  layer = Dense(16, precision=LayerPrecision(dtype))
  variables, p = _init(layer, x)
  out = layer.apply(variables, x)
  assert out.dtype == dtype and variables["params"]["kernel"].value.dtype == jnp.float32
  ref = _f64(x) @ p["kernel"] + p["bias"]
  # x and kernel rounded once each, the output once: three roundings.
  _assert_half_close(out, ref, np.abs(_f64(x)) @ np.abs(p["kernel"]) + np.abs(p["bias"]),
                     dtype, roundings=3)
  promoted = Dense(16, precision=LayerPrecision(dtype, PROMOTE_ROOT)).apply(variables, x)
  assert promoted.dtype == jnp.float32
  np.testing.assert_allclose(promoted, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Conv


def _np_conv(x, w, stride, padding, groups):
  """Direct NHWC/HWIO convolution in float64, "SAME" padding as XLA defines it."""
  n, h, wd, _ = x.shape
  kh, kw, cin_g, cout = w.shape
  pads = []
  for size, k in ((h, kh), (wd, kw)):
    if padding == "SAME":
      total = max((-(-size // stride) - 1) * stride + k - size, 0)
      pads.append((total // 2, total - total // 2))
    else:
      pads.append((0, 0))
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((n, oh, ow, cout))
  cout_g = cout // groups
  for g in range(groups):
    xs = xp[..., g * cin_g:(g + 1) * cin_g]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
        out[..., g * cout_g:(g + 1) * cout_g] += patch @ w[i, j, :, g * cout_g:(g + 1) * cout_g]
  return out


CONV_CASES = [  # (features, kernel, stride, padding, groups)
    (6, (3, 3), 1, "SAME", 1),
    (6, (3, 3), 2, "SAME", 1),
    (5, (2, 3), 2, "VALID", 1),
    (8, (3, 3), 1, "SAME", 4),  # depthwise, channel multiplier 2
    (4, (3, 3), 2, "SAME", 4),  # depthwise, strided
]


@pytest.mark.parametrize("dtype", [jnp.float32, *HALF])
@pytest.mark.parametrize("features,kernel,stride,padding,groups", CONV_CASES)
def test_conv_matches_numpy(dtype, features, kernel, stride, padding, groups):
  x = _rand((2, 7, 8, 4))
  layer = Conv(features, kernel, strides=stride, padding=padding, feature_group_count=groups,
               precision=LayerPrecision(dtype))
  variables, p = _init(layer, x)
  out = layer.apply(variables, x)
  ref = _np_conv(_f64(x), p["kernel"], stride, padding, groups) + p["bias"]
  assert out.dtype == dtype and out.shape == ref.shape
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  else:
    magnitude = _np_conv(np.abs(_f64(x)), np.abs(p["kernel"]), stride, padding,
                         groups) + np.abs(p["bias"])
    _assert_half_close(out, ref, magnitude, dtype, roundings=3)


# ---------------------------------------------------------------- Embed


@pytest.mark.parametrize("dtype", [jnp.float32, *HALF])
def test_embed_lookup_and_attend(dtype):
  ids = jnp.array([[0, 3, 9], [2, 2, 5]])
  layer = Embed(10, 6, precision=LayerPrecision(dtype))
  variables, p = _init(layer, ids)
  table = p["embedding"]
  out = layer.apply(variables, ids)
  assert out.dtype == dtype
  # A lookup is one rounding of the stored value, i.e. exactly the rounded table row.
  np.testing.assert_array_equal(out, jnp.asarray(table[np.asarray(ids)], dtype))
  query = _rand((2, 3, 6), seed=1)
  logits = layer.apply(variables, query, method=Embed.attend)
  ref = _f64(query) @ table.T
  assert logits.dtype == dtype and logits.shape == (2, 3, 10)
  if dtype == jnp.float32:
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  else:
    _assert_half_close(logits, ref, np.abs(_f64(query)) @ np.abs(table).T, dtype, roundings=3)


# ---------------------------------------------------------------- LayerNorm


def _np_layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _layer_norm_variables(features, seed=2):
  rng = np.random.default_rng(seed)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
                     "bias": jnp.asarray(rng.normal(0.0, 1.0, features), jnp.float32)}}


@pytest.mark.parametrize("dtype", [jnp.float32, *HALF])
def test_layer_norm_matches_numpy(dtype):
  x = _rand((4, 5, 16), scale=3.0) + 1.0
  variables = _layer_norm_variables(16)
  out = LayerNorm(precision=LayerPrecision(dtype)).apply(variables, x)
  ref = _np_layer_norm(_f64(x), _f64(variables["params"]["scale"]),
                       _f64(variables["params"]["bias"]))
  assert out.dtype == dtype
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  else:
    # The input is float32 and the statistics are float32: only the output is rounded.
    _assert_half_close(out, ref, np.abs(ref), dtype, roundings=1)


def test_layer_norm_statistics_are_float32_even_when_fp16_would_overflow():
  signs = np.where(np.arange(64) % 2 == 0, 1.0, -1.0)
  x = jnp.asarray(300.0 * signs + np.random.default_rng(0).normal(0, 5, (3, 64)), jnp.float16)
  # Proof the input is hostile: a float16 variance overflows (300² = 9e4 > 65504).
  centered = x - jnp.mean(x, -1, keepdims=True)
  assert not np.isfinite(np.asarray(jnp.mean(centered * centered, -1))).all()
  variables = _layer_norm_variables(64)
  ref = _np_layer_norm(_f64(x), _f64(variables["params"]["scale"]),
                       _f64(variables["params"]["bias"]))
  out = LayerNorm(precision=LayerPrecision(jnp.float16)).apply(variables, x)
  assert out.dtype == jnp.float16 and np.isfinite(np.asarray(out, np.float32)).all()
  _assert_half_close(out, ref, np.abs(ref), jnp.float16, roundings=1)
  # Promoted, the output stays float32 as well: float32-tight.
  out32 = LayerNorm(precision=LayerPrecision(jnp.float16, PROMOTE_ROOT)).apply(variables, x)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- MultiHeadAttention


def _np_softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_mha(p, xq, xkv, mask, head_dim):
  def project(name, x):
    return np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) + p[name]["bias"]

  q, k, v = project("query", xq), project("key", xkv), project("value", xkv)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  if mask is not None:
    mask = np.asarray(mask)
    logits = np.where(mask, logits, -np.inf) if mask.dtype == bool else logits + mask
  context = np.einsum("bhqk,bkhd->bqhd", _np_softmax(logits), v)
  return context.reshape(*context.shape[:2], -1) @ p["out"]["kernel"] + p["out"]["bias"]


def _mha_inputs(kind):
  xq = _rand((2, 5, 8), seed=1)
  if kind == "cross":
    return xq, _rand((2, 7, 8), seed=2), None
  if kind == "causal_bool":
    return xq, None, jnp.tril(jnp.ones((5, 5), bool))[None, None].repeat(2, 0)
  additive = jnp.asarray(np.random.default_rng(3).normal(0, 2, (2, 2, 5, 5)), jnp.float32)
  return xq, None, additive  # [batch, heads, q, k]


@pytest.mark.parametrize("impl", ["explicit", "jax"])
@pytest.mark.parametrize("dtype", [jnp.float32, *HALF])
@pytest.mark.parametrize("kind", ["cross", "causal_bool", "additive"])
def test_attention_matches_numpy(dtype, kind, impl):
  xq, xkv, mask = _mha_inputs(kind)
  layer = MultiHeadAttention(num_heads=2, head_dim=4, precision=LayerPrecision(dtype), impl=impl)
  if impl == "jax" and dtype == jnp.float16 and jax.default_backend() == "cpu":
    with pytest.raises(ConfigError, match="cannot compute float16 on CPU"):
      _init(layer, xq, xkv, mask)
    return
  variables, p = _init(layer, xq, xkv, mask)
  out = _apply(layer, variables, xq, xkv, mask)
  ref = _np_mha(p, _f64(xq), _f64(xq if xkv is None else xkv), mask, head_dim=4)
  assert out.dtype == dtype and out.shape == ref.shape
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  else:
    # About ten roundings lie on the path (inputs, three projections, logits, weights,
    # context, out projection), each at most u relative to values of the output's scale,
    # and they partly cancel (about 1.4u observed): 8u of the output scale bounds it with
    # room while an O(1) bug would not fit.
    scale = np.abs(ref).max()
    np.testing.assert_array_less(np.abs(_f64(out) - ref), 8 * UNIT_ROUNDOFF[dtype] * scale)


def _walk_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          yield from _walk_eqns(sub)


def test_attention_softmax_runs_in_float32():
  # 70000 keys with equal logits: a float16 softmax's normaliser (70000) overflows
  # float16's 65504, so every weight would be 0. The key kernel is zero and its bias
  # large, so the logits are large (hundreds) and equal whatever the key.
  num_keys = 70000
  xq, xkv = _rand((1, 2, 8), seed=1), _rand((1, num_keys, 8), seed=2)
  layer = MultiHeadAttention(num_heads=1, head_dim=8, precision=LayerPrecision(jnp.float16))
  variables, p = _init(layer, xq, xkv)
  params = nn.unbox(variables["params"])
  params["key"] = {"kernel": jnp.zeros_like(params["key"]["kernel"]),
                   "bias": jnp.full_like(params["key"]["bias"], 30.0)}
  p["key"] = jax.tree.map(_f64, params["key"])
  logits = jnp.full((num_keys,), 500.0, jnp.float16)
  assert not np.asarray(jax.nn.softmax(logits)).any()  # the failure being guarded against
  out = _apply(layer, {"params": params}, xq, xkv)
  ref = _np_mha(p, _f64(xq), _f64(xkv), None, head_dim=8)
  assert np.isfinite(np.asarray(out, np.float32)).all()
  # Weights 1/70000 are float16 subnormals, spaced 2^-24: 0.2% relative error, plus the
  # usual float16 roundings; 1% of the output scale bounds it.
  np.testing.assert_array_less(np.abs(_f64(out) - ref), 1e-2 * np.abs(ref).max())
  # And structurally: every exp in the program takes float32.
  jaxpr = jax.make_jaxpr(lambda v: _apply(layer, v, xq, xkv))({"params": params})
  exps = [e for e in _walk_eqns(jaxpr.jaxpr) if e.primitive.name == "exp"]
  assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)


def _identity_attention_params(embed):
  eye = jnp.eye(embed, dtype=jnp.float32)
  proj = {"kernel": eye.reshape(embed, 1, embed), "bias": jnp.zeros((1, embed))}
  return {"query": proj, "key": proj, "value": proj,
          "out": {"kernel": eye, "bias": jnp.zeros((embed,))}}


def test_promoted_attention_keeps_logits_float32():
  # Identity projections and inputs near 200: logits = 4 * 200² / sqrt(4) = 8e4 > 65504,
  # infinite in float16. Integer inputs keep every projection exact in float16.
  x = jnp.asarray(200.0 + np.random.default_rng(0).integers(-2, 3, (1, 3, 4)), jnp.float16)
  params = _identity_attention_params(4)
  half = MultiHeadAttention(num_heads=1, head_dim=4, precision=LayerPrecision(jnp.float16))
  out, stats = _apply(half, {"params": params}, x, mutable=["precision_stats"])
  assert not np.isfinite(np.asarray(out, np.float32)).all()
  assert stats["precision_stats"]["nonfinite"][0] > 0
  promoted = half.clone(precision=half.precision.replace(plan=PROMOTE_ROOT))
  out = _apply(promoted, {"params": params}, x)
  assert out.dtype == jnp.float16  # the "out" projection is still half
  ref = _np_mha(jax.tree.map(_f64, params), _f64(x), _f64(x), None, head_dim=4)
  _assert_half_close(out, ref, np.abs(ref), jnp.float16, roundings=3)


def _padding_bias(batch, keys, seed=4):
  """BERT's additive padding bias [batch, 1, 1, keys]: 0 or float32's most negative value,
  with each row's last keys padded (at least one kept)."""
  kept = np.random.default_rng(seed).integers(1, keys + 1, batch)
  bias = np.where(np.arange(keys)[None] < kept[:, None], 0.0, np.finfo(np.float32).min)
  return jnp.asarray(bias[:, None, None, :], jnp.float32)


class _Core(nn.Module):
  """`attend` on given q, k, v, as a layer (for its statistics)."""
  dtype: object = jnp.float32
  impl: str = "explicit"
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, q, k, v, mask, deterministic=True):
    return attend(self, q, k, v, mask, dtype=self.dtype, dropout_rate=self.dropout_rate,
                  deterministic=deterministic, impl=self.impl)


def _qkv(batch=2, q_len=6, k_len=6, heads=2, head_dim=8):
  return tuple(_rand((batch, length, heads, head_dim), seed=i)
               for i, length in enumerate((q_len, k_len, k_len)))


def test_fused_attention_gradients_and_statistics_match_the_explicit_path():
  """`jax.nn.dot_product_attention` (XLA here) under a padding bias at float32's most
  negative value, which the fused path clips to -2^15: output, gradients with respect to
  q, k and v (float32: rtol 1e-5 is a few roundings of O(1) values) and the statistics a
  controller reads (the matmul FLOPs it governs are the same)."""
  q, k, v = _qkv()
  mask = _padding_bias(2, 6)

  def run(impl):
    core = _Core(impl=impl)
    loss = lambda q, k, v: jnp.sum(core.apply({}, q, k, v, mask) ** 2)
    out, stats = jax.jit(functools.partial(core.apply, mutable=["precision_stats"]))(
        {}, q, k, v, mask)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v), stats["precision_stats"]

  (out, grads, stats), (ref, ref_grads, ref_stats) = run("jax"), run("explicit")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for grad, ref_grad in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  # The fused path sows its output's statistics: the logits are never materialised.
  np.testing.assert_allclose(stats["max_abs"][0], jnp.max(jnp.abs(out)), rtol=1e-6)
  assert stats["matmul_flops"][0] == ref_stats["matmul_flops"][0] == 4.0 * 2 * 2 * 6 * 6 * 8


def test_fused_attention_refuses_dropout_cpu_cudnn_and_unknown_names():
  q, k, v = _qkv()
  with pytest.raises(ConfigError, match="attention_dropout_rate to 0"):
    _Core(impl="jax", dropout_rate=0.1).apply({}, q, k, v, None, deterministic=False,
                                              rngs={"dropout": jax.random.key(0)})
  # Without dropout active (evaluation) the same layer runs.
  assert _Core(impl="jax", dropout_rate=0.1).apply({}, q, k, v, None).shape == q.shape
  if jax.default_backend() != "gpu":
    with pytest.raises(ConfigError, match="NVIDIA GPUs only"):
      _Core(jnp.float16, impl="cudnn").apply({}, q, k, v, None)
  # A float32 layer (e.g. promoted by the plan) computes explicitly, wherever it runs.
  np.testing.assert_array_equal(_Core(impl="cudnn").apply({}, q, k, v, None),
                                _Core().apply({}, q, k, v, None))
  with pytest.raises(ConfigError, match="attention_impl must be one of"):
    _Core(impl="flash").apply({}, q, k, v, None)


def test_fused_attention_turns_kernel_refusals_into_config_errors(monkeypatch):
  """What the fused kernel refuses (cuDNN: an odd sequence length with a bias, a head
  width it lacks, ...) is one ConfigError naming the shapes and the way out."""
  def refuse(*args, **kwargs):
    raise NotImplementedError("Q must be fp16/bf16, got float64")

  monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
  with pytest.raises(ConfigError, match=r"attention_impl='jax' cannot compute this attention "
                     r"\(q \(2, 6, 2, 8\), .*Q must be fp16/bf16.*use 'explicit'"):
    _Core(impl="jax").apply({}, *_qkv(), None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_cudnn_attention_matches_float64(dtype):
  """cuDNN's fused kernel against float64 numpy, under a padding bias: output and the
  gradient with respect to q. Inputs, weights and output are each rounded once to the
  half dtype (the kernel accumulates in float32): 4u of the output's scale bounds it."""
  q, k, v = (x.astype(dtype) for x in _qkv(batch=4, q_len=128, k_len=128, heads=4,
                                             head_dim=64))
  q = q * jnp.asarray(64**-0.5, dtype)
  mask = _padding_bias(4, 128)
  out = jax.jit(lambda *a: _Core(dtype, impl="cudnn").apply({}, *a))(q, k, v, mask)
  logits = np.einsum("bqhd,bkhd->bhqk", _f64(q), _f64(k)) + _f64(mask)
  ref = np.einsum("bhqk,bkhd->bqhd", _np_softmax(logits), _f64(v))
  assert out.dtype == dtype
  np.testing.assert_array_less(np.abs(_f64(out) - ref), 4 * UNIT_ROUNDOFF[dtype] * np.abs(
      ref).max())
  grad = jax.jit(jax.grad(lambda q: jnp.sum(
      _Core(dtype, impl="cudnn").apply({}, q, k, v, mask).astype(jnp.float32) ** 2)))(q)
  ref_grad = jax.jit(jax.grad(lambda q: jnp.sum(
      _Core(jnp.float32).apply({}, q, k, v, mask) ** 2)))(q.astype(jnp.float32))
  np.testing.assert_allclose(_f64(grad), _f64(ref_grad), atol=16 * UNIT_ROUNDOFF[dtype] * float(
      jnp.abs(ref_grad).max()))
  # Under vmap (as the pipeline runs its stages) with a batched mask: each slice as alone.
  stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v, mask)]
  out_vmapped = jax.jit(jax.vmap(lambda *a: _Core(dtype, impl="cudnn").apply({}, *a)))(*stacked)
  np.testing.assert_allclose(_f64(out_vmapped[0]), _f64(out),
                             atol=2 * UNIT_ROUNDOFF[dtype] * np.abs(ref).max())


def test_attention_dropout():
  x = _rand((2, 5, 8))
  layer = MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
  variables, _ = _init(layer, x)
  rngs = {"dropout": jax.random.key(1)}
  det = _apply(layer, variables, x, deterministic=True, rngs=rngs)
  np.testing.assert_array_equal(det, _apply(layer, variables, x))
  dropped = _apply(layer, variables, x, deterministic=False, rngs=rngs)
  assert np.isfinite(np.asarray(dropped)).all() and not np.allclose(dropped, det)


# ---------------------------------------------------------------- plans, paths, stats


class _Block(nn.Module):
  compute_dtype: object = jnp.bfloat16
  plan: PrecisionPlan | None = None

  @nn.compact
  def __call__(self, ids, image):
    kw = {"precision": LayerPrecision(self.compute_dtype, self.plan)}
    out = {"embed": Embed(11, 8, name="embed", **kw)(ids)}
    out["ln"] = LayerNorm(name="ln", **kw)(out["embed"])
    out["attn"] = MultiHeadAttention(2, 4, name="attn", **kw)(out["ln"])
    out["fc"] = Dense(8, name="fc", **kw)(out["attn"])
    out["conv"] = Conv(3, (3, 3), name="conv", **kw)(image)
    return out


class _Model(nn.Module):
  plan: PrecisionPlan | None = None

  @nn.compact
  def __call__(self, ids, image):
    return _Block(plan=self.plan, name="block")(ids, image)


LAYER_NAMES = ("embed", "ln", "attn", "fc", "conv")
IDS = jnp.array([[1, 2, 3], [4, 5, 10]])
IMAGE = _rand((2, 6, 6, 2))


def test_output_dtypes_follow_the_plan_by_path():
  variables, _ = _init(_Model(), IDS, IMAGE)
  assert set(variables) == {"params"}  # init does not sow statistics

  def dtypes(plan):  # abstract evaluation: dtypes without compiling anything
    outs = jax.eval_shape(_Model(plan).apply, variables, IDS, IMAGE)
    return {k: v.dtype for k, v in outs.items()}

  for plan in (None, PrecisionPlan()):
    assert dtypes(plan) == dict.fromkeys(LAYER_NAMES, jnp.bfloat16)
  for name in LAYER_NAMES:
    # The attention's output is its "out" projection's; promote both for float32.
    paths = [f"block/{name}", f"block/{name}/out"] if name == "attn" else [f"block/{name}"]
    expected = {k: jnp.float32 if k == name else jnp.bfloat16 for k in LAYER_NAMES}
    assert dtypes(PrecisionPlan(tuple((path, "fp32") for path in paths))) == expected, name
  # Paths are absolute: "fc" is not "block/fc".
  assert dtypes(PrecisionPlan().promote("fc"))["fc"] == jnp.bfloat16
  # Promoting the attention alone keeps its output (the "out" projection's) half.
  assert dtypes(PrecisionPlan().promote("block/attn"))["attn"] == jnp.bfloat16


def test_precision_stats_only_when_mutable():
  variables, _ = _init(_Model(), IDS, IMAGE)
  outs = jax.eval_shape(_Model().apply, variables, IDS, IMAGE)  # immutable: sow is a no-op
  assert isinstance(outs, dict) and set(outs) == set(LAYER_NAMES)
  _, state = jax.eval_shape(functools.partial(_Model().apply, mutable=["intermediates"]),
                            variables, IDS, IMAGE)
  assert "precision_stats" not in state
  outs, state = _apply(_Model(), variables, IDS, IMAGE, mutable=["precision_stats"])
  stats = state["precision_stats"]["block"]
  assert set(stats) == set(LAYER_NAMES)
  assert set(stats["attn"]) == {"query", "key", "value", "out", "max_abs", "nonfinite",
                                "input_nonfinite", "matmul_flops"}
  for name in LAYER_NAMES:
    (max_abs,), (nonfinite,) = stats[name]["max_abs"], stats[name]["nonfinite"]
    assert max_abs.dtype == jnp.float32 and nonfinite == 0
    if name != "attn":  # The attention's own entry reports its logits, not its output.
      assert max_abs == jnp.max(jnp.abs(outs[name].astype(jnp.float32)))
  # Matmul FLOPs of a Dense: 2 * rows * in * out.
  (flops,) = stats["attn"]["out"]["matmul_flops"]
  kernel = variables["params"]["block"]["attn"]["out"]["kernel"]
  kernel = getattr(kernel, "value", kernel)
  rows = outs["attn"].size // outs["attn"].shape[-1]
  assert flops == 2.0 * rows * kernel.size


# ---------------------------------------------------------------- remat


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(Dense(32, precision=LayerPrecision(jnp.bfloat16), name="fc1")(x))
    h = LayerNorm(precision=LayerPrecision(jnp.bfloat16), name="ln")(h)
    return Dense(8, precision=LayerPrecision(jnp.bfloat16), name="fc2")(h)


class _Net(nn.Module):
  use_remat: bool

  @nn.compact
  def __call__(self, x):
    return (remat(_MLP) if self.use_remat else _MLP)(name="mlp")(x)


def _saved_residual_dtypes(fn, *args):
  """(dtype, description) of what the backward pass keeps, per print_saved_residuals."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  return [(line.split("[")[0], line) for line in buffer.getvalue().splitlines()]


def test_remat_saves_only_half_residuals_and_keeps_gradients():
  x = _rand((4, 16))
  variables, _ = _init(_Net(False), x)
  loss = {r: (lambda v, x, r=r: _Net(r).apply(v, x).astype(jnp.float32).sum())
          for r in (False, True)}
  plain, rematted = (jax.jit(jax.grad(loss[r]))(variables, x) for r in (False, True))
  # Not bitwise: XLA:CPU emulates bfloat16 arithmetic in float32 and skips roundings
  # inside a fusion, and the remat program fuses differently. They agree to about one
  # bfloat16 rounding of the gradient's scale; a remat bug would be O(1) off.
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted), strict=True):
    np.testing.assert_array_less(np.abs(_f64(a) - _f64(b)),
                                 2 * UNIT_ROUNDOFF[jnp.bfloat16] * np.abs(_f64(a)).max())
  without = _saved_residual_dtypes(loss[False], variables, x)
  assert any(dtype == "f32" and "output of" in line for dtype, line in without)
  # Arguments (parameters, inputs) and constants are available to the backward pass
  # anyway; every value the forward pass computed and the remat kept must be half.
  computed = [(d, line) for d, line in _saved_residual_dtypes(loss[True], variables, x)
              if "output of" in line]
  assert computed and all(d in ("bf16", "f16") for d, _ in computed), computed


def test_policy_decides_by_output_dtype():
  def mixed(x, key):
    h = jax.lax.dot_general(x, x.T, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)  # half in, f32 out
    keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, h.shape)  # keys, bools
    return jnp.where(keep, h.astype(jnp.bfloat16) * 2, 0).astype(jnp.float32).sum()

  jaxpr = jax.make_jaxpr(mixed)(jnp.ones((4, 4), jnp.bfloat16), jax.random.key(0))
  decisions = {}
  for eqn in _walk_eqns(jaxpr.jaxpr):
    saved = save_half_residuals(eqn.primitive, *(v.aval for v in eqn.invars), **eqn.params)
    half = all(getattr(v.aval, "dtype", None) in (jnp.bfloat16, jnp.float16)
               for v in eqn.outvars)
    assert saved == half, eqn
    decisions[saved] = decisions.get(saved, 0) + 1
  assert decisions[True] and decisions[False]  # both kinds were seen


def _grad_dot_operand_dtypes(fn, *args) -> set[tuple[str, ...]]:
  """The operand dtypes of every product in the jaxpr of fn's gradient."""
  jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args)
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["dot", "einsum", "conv"])
def test_half_backward_products_stay_half_and_match_float64(dtype, kind):
  """`dsjax.nn.matmul`: the forward equals lax with a float32 result bit for bit; every
  backward product takes half operands (plain lax feeds them a float32 cotangent, which
  XLA computes in float32); gradients, in the operand dtype, match float64 within one
  rounding of each product plus the rounding of the half cotangent."""
  from dsjax.nn import matmul

  rng = np.random.default_rng(3)
  if kind == "conv":
    a, b = rng.standard_normal((2, 6, 6, 4)), rng.standard_normal((3, 3, 4, 5))
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                             padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = functools.partial(matmul.conv_general_dilated, window_strides=(1, 1),
                             padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    lax_fn = functools.partial(conv, preferred_element_type=jnp.float32)
  elif kind == "einsum":
    a, b = rng.standard_normal((2, 5, 3, 8)), rng.standard_normal((2, 7, 3, 8))
    ours = functools.partial(matmul.einsum, "bqhd,bkhd->bhqk")
    lax_fn = functools.partial(jnp.einsum, "bqhd,bkhd->bhqk", preferred_element_type=jnp.float32)
  else:
    a, b = rng.standard_normal((3, 4, 24)), rng.standard_normal((24, 2, 5))
    dims = (((2,), (0,)), ((), ()))
    ours = functools.partial(matmul.dot_general, dimension_numbers=dims)
    lax_fn = functools.partial(jax.lax.dot_general, dimension_numbers=dims,
                               preferred_element_type=jnp.float32)
  a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  np.testing.assert_array_equal(ours(a, b), lax_fn(a, b))
  weights = jnp.asarray(rng.standard_normal(ours(a, b).shape), jnp.float32)

  def loss(fn):
    # As in a layer: round the product to the operand dtype before the rest of the net.
    return lambda x, y: jnp.sum(fn(x, y).astype(dtype).astype(jnp.float32) * weights)

  assert _grad_dot_operand_dtypes(loss(ours), a, b) == {(str(jnp.dtype(dtype)),) * 2}
  # What the wrapper fixes: plain lax runs a backward product on a float32 operand.
  assert any("float32" in ops for ops in _grad_dot_operand_dtypes(loss(lax_fn), a, b))
  got = jax.grad(loss(ours), (0, 1))(a, b)
  assert [g.dtype for g in got] == [jnp.dtype(dtype)] * 2
  # float64 reference: the same bilinear map on float64 values, through jax's own vjp.
  with jax.enable_x64(True):
    def ref_fn(x, y):
      return jnp.sum(lax_fn(x, y, preferred_element_type=jnp.float64)
                     * weights.astype(jnp.float64))
    want = jax.grad(ref_fn, (0, 1))(_f64(a), _f64(b))
    # Bound per element: the half cotangent (weights rounded, u) and the gradient's own
    # rounding (u), on the sum of |terms| (float32 accumulation adds far less).
    abs_w = jnp.abs(weights.astype(jnp.float64))
    sums = jax.grad(lambda x, y: jnp.sum(lax_fn(x, y, preferred_element_type=jnp.float64)
                                         * abs_w), (0, 1))(jnp.abs(_f64(a)), jnp.abs(_f64(b)))
  u = UNIT_ROUNDOFF[dtype]
  for g, w, s in zip(got, want, sums, strict=True):
    err = np.abs(_f64(g) - np.asarray(w))
    assert np.all(err <= 2.5 * u * np.asarray(s) + 1e-6)
  # Forward mode works too (second-order DNAS takes jvp of grad): the directional
  # derivative equals the bilinear map of the tangents, within the same rounding.
  ta, tb = jnp.ones_like(a), jnp.ones_like(b)
  _, tangent = jax.jvp(ours, (a, b), (ta, tb))
  assert tangent.dtype == jnp.float32
  np.testing.assert_allclose(tangent, lax_fn(ta, b) + lax_fn(a, tb),
                             atol=4 * u * float(jnp.max(jnp.abs(lax_fn(ta, b) + lax_fn(a, tb)))))
  jax.jvp(jax.grad(loss(ours)), (a, b), (ta, tb))  # A Hessian-vector product runs.


def test_half_backward_float32_is_plain_lax_and_mixed_dtypes_are_refused():
  from dsjax.nn import matmul

  rng = np.random.default_rng(4)
  a, b = jnp.asarray(rng.standard_normal((4, 6))), jnp.asarray(rng.standard_normal((6, 3)))
  dims = (((1,), (0,)), ((), ()))
  got = jax.grad(lambda x, y: matmul.dot_general(x, y, dims).sum(), (0, 1))(a, b)
  want = jax.grad(lambda x, y: jax.lax.dot_general(x, y, dims).sum(), (0, 1))(a, b)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)
  with pytest.raises(TypeError, match="share one dtype"):
    matmul.dot_general(a.astype(jnp.float16), b, dims)
