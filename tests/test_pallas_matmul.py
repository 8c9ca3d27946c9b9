"""Tests for pallas_kernels.matmul (interpret mode on CPU) and pallas_kernels.tuning.

Error bound (`_bound`): inputs are compared against float64 numpy on the same
half-precision values, so only the kernel's own rounding counts.
* A product of two float16 (11-bit significand) or bfloat16 (8-bit) numbers has at most
  22 significant bits, so it is exact in float32 (24); a float32 product rounds once.
* Summing K such terms in float32, in any order (the K loop, the blocked dot), errs by
  at most about K·u32·Σ|a_i·b_i| (Higham's γ_K bound, first order), u32 = 2^-24; the bias
  add is one more rounding, so we use (K + 2)·u32·(|A|@|B| + |bias|).
* The activation multiplies that by at most its largest slope (1 for relu, < 1.13 for
  tanh-gelu and < 1.1 for silu: 1.2 covers all) and adds a few u32·|z| of its own.
* The single cast to out_dtype rounds by u_out·|y| (u = 2^-11 float16, 2^-8 bfloat16).
FP16 accumulation instead rounds every partial sum to 2^-11 relative, about sqrt(K)·u16
times the partial sums: far above this bound when out_dtype is float32, which
`test_fp32_accumulation_is_distinguishable_from_fp16` checks.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels
from pallas_kernels import tuning
from pallas_kernels._kernels import tpu_style_call
from pallas_kernels.matmul import _Config, _matmul_2d, resolve_blocks

U32 = 2.0**-24
SLOPE = 1.2
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
SMALL = dict(block_m=16, block_n=16, block_k=32)


def _unit(dtype) -> float:
  return float(jnp.finfo(dtype).eps) / 2


def _inputs(shape_a, shape_b, dtype, seed=0):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.standard_normal(shape_a), dtype)
  b = jnp.asarray(rng.standard_normal(shape_b), dtype)
  bias = jnp.asarray(rng.standard_normal(shape_b[-1]), jnp.float32)
  return a, b, bias


def _act64(z, activation):
  if activation == "relu":
    return np.maximum(z, 0)
  if activation == "gelu":
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  if activation == "silu":
    return z / (1 + np.exp(-z))
  return z


def _f64(x):
  return np.asarray(x, np.float64)


def _reference(a, b, bias, activation):
  """float64 numpy: (y, z, |A|@|B| + |bias|)."""
  a64, b64 = _f64(a).reshape(math.prod(a.shape[:-1]), a.shape[-1]), _f64(b)
  z = a64 @ b64
  absdot = np.abs(a64) @ np.abs(b64)
  if bias is not None:
    z, absdot = z + _f64(bias), absdot + np.abs(_f64(bias))
  return _act64(z, activation), z, absdot


def _bound(y, z, absdot, k, out_dtype):
  """The elementwise error bound derived in the module docstring."""
  return (_unit(out_dtype) * np.abs(y) + SLOPE * (k + 2) * U32 * absdot
          + 8 * U32 * (np.abs(z) + 1) + float(jnp.finfo(out_dtype).smallest_subnormal))


def _check(out, a, b, bias=None, activation=None, out_dtype=None):
  out_dtype = out_dtype or a.dtype
  assert out.dtype == out_dtype
  y, z, absdot = _reference(a, b, bias, activation)
  err = np.abs(_f64(out).reshape(y.shape) - y)
  bound = _bound(y, z, absdot, a.shape[-1], out_dtype)
  assert np.all(np.isfinite(_f64(out)))
  assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (100, 300, 77), (1, 1, 1), (16, 32, 16),
                                   (33, 65, 17), (4, 0, 6)])
def test_shapes_against_float64(m, k, n):
  a, b, bias = _inputs((m, k), (k, n), jnp.float16)
  _check(pallas_kernels.matmul(a, b, bias=bias, **SMALL), a, b, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
def test_dtypes_and_epilogues(dtype, activation):
  a, b, bias = _inputs((37, 50), (50, 29), dtype, seed=1)
  out = pallas_kernels.matmul(a, b, bias=bias, activation=activation, **SMALL)
  _check(out, a, b, bias, activation)


def test_no_bias_and_out_dtype():
  a, b, _ = _inputs((20, 40), (40, 24), jnp.bfloat16, seed=2)
  out = pallas_kernels.matmul(a, b, activation="silu", out_dtype=jnp.float32, **SMALL)
  _check(out, a, b, None, "silu", jnp.float32)


def test_batched_leading_dims():
  a, b, bias = _inputs((2, 3, 5, 7), (7, 9), jnp.float16, seed=3)
  out = pallas_kernels.matmul(a, b, bias=bias, activation="relu", **SMALL)
  assert out.shape == (2, 3, 5, 9)
  _check(out, a, b, bias, "relu")


def test_default_blocks_any_shape():
  a, b, bias = _inputs((19, 45), (45, 13), jnp.float16, seed=4)
  _check(pallas_kernels.matmul(a, b, bias=bias, activation="gelu"), a, b, bias, "gelu")


def test_fp32_accumulation_is_distinguishable_from_fp16():
  # 2048 products of 1.0 then 2048 of 0.25: exact sum 2560. In float16 the running sum
  # reaches 2048, where the spacing is 2, and every later 0.25 rounds away.
  k = 4096
  a = jnp.concatenate([jnp.ones((4, k // 2)), jnp.full((4, k // 2), 0.5)], 1).astype(jnp.float16)
  b = jnp.concatenate([jnp.ones((k // 2, 16)), jnp.full((k // 2, 16), 0.5)]).astype(jnp.float16)
  out = pallas_kernels.matmul(a, b, out_dtype=jnp.float32, block_m=16, block_n=16, block_k=512)
  np.testing.assert_array_equal(np.asarray(out), 2560.0)
  naive = np.float16(0)
  for prod in (_f64(a[0]) * _f64(b[:, 0])).astype(np.float16):
    naive = np.float16(naive + prod)
  assert float(naive) == 2048.0

  # Random data: the kernel meets the FP32 bound, a float16 running sum breaks it.
  a, b, _ = _inputs((40, 300), (300, 24), jnp.float16, seed=5)
  out = pallas_kernels.matmul(a, b, out_dtype=jnp.float32, **SMALL)
  y, z, absdot = _reference(a, b, None, None)
  bound = _bound(y, z, absdot, 300, jnp.float32)
  assert np.all(np.abs(_f64(out) - y) <= bound)
  acc = np.zeros(y.shape, np.float16)
  for i in range(300):
    acc = (acc + np.outer(_f64(a[:, i]), _f64(b[i])).astype(np.float16)).astype(np.float16)
  assert np.max(np.abs(acc - y) / bound) > 10


def test_jaxpr_contains_pallas_call():
  a, b, bias = _inputs((8, 16), (16, 8), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda x, y, c: pallas_kernels.matmul(x, y, bias=c, activation="gelu"))
  assert "pallas_call" in str(jaxpr(a, b, bias))


def _ref_fn(a, b, bias, activation, out_dtype):
  # HIGHEST: float32 operands stay float32 (the GPU default rounds them to TF32; the
  # kernel does not).
  z = jnp.dot(a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    z = z + bias.astype(jnp.float32)
  act = {None: lambda t: t, "relu": jax.nn.relu, "silu": jax.nn.silu,
         "gelu": lambda t: jax.nn.gelu(t, approximate=True)}[activation]
  return act(z).astype(out_dtype)


@pytest.mark.parametrize("dtype,activation,with_bias", [
    (jnp.float16, None, True), (jnp.float16, "relu", True), (jnp.float16, "gelu", True),
    (jnp.float16, "silu", False), (jnp.bfloat16, "gelu", True), (jnp.float32, None, True)])
def test_grad_matches_xla_reference(dtype, activation, with_bias):
  a, b, bias = _inputs((24, 40), (40, 20), dtype, seed=6)
  bias = bias if with_bias else None
  w = jnp.asarray(np.random.default_rng(7).standard_normal((24, 20)), jnp.float32)

  def loss(fn):
    return lambda x, y, c: jnp.sum(fn(x, y, c).astype(jnp.float32) * w)

  ours = loss(lambda x, y, c: pallas_kernels.matmul(x, y, bias=c, activation=activation,
                                                    **SMALL))
  ref = loss(lambda x, y, c: _ref_fn(x, y, c, activation, dtype))
  argnums = (0, 1, 2) if with_bias else (0, 1)
  got = jax.grad(ours, argnums)(a, b, bias)
  want = jax.grad(ref, argnums)(a, b, bias)
  # Both round their gradient once (u·|ref| each); ours also rounds dZ to the operand
  # dtype before the two matmuls (u_in·|dZ|@|B|ᵀ), plus float32 accumulation as above.
  u = _unit(dtype)
  dz = SLOPE * np.abs(_f64(w.astype(dtype)))
  abs_a, abs_b = np.abs(_f64(a)), np.abs(_f64(b))
  sums = [dz @ abs_b.T, abs_a.T @ dz, dz.sum(0)]
  lengths = [b.shape[1], a.shape[0], a.shape[0]]
  for g, r, s, n in zip(got, want, sums, lengths, strict=False):
    assert g.dtype == r.dtype
    bound = 2 * _unit(g.dtype) * np.abs(_f64(r)) + (u + (n + 2) * U32) * s + 1e-30
    err = np.abs(_f64(g) - _f64(r))
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(b=np.ones(8, np.float16)), ValueError, "b must be 2-D"),
    (dict(a=np.ones(8, np.float16)), ValueError, "at least 2-D"),
    (dict(b=np.ones((9, 4), np.float16)), ValueError, "inner dimensions differ"),
    (dict(a=np.ones((4, 8), np.int32)), TypeError, "a has dtype int32"),
    (dict(b=np.ones((8, 4), np.float32)), TypeError, "cast both to one dtype"),
    (dict(activation="tanh"), ValueError, "unknown activation 'tanh'"),
    (dict(bias=np.ones(5)), ValueError, r"bias must have shape \(4,\)"),
    (dict(out_dtype=jnp.int8), TypeError, "out_dtype has dtype int8"),
    (dict(block_m=0), ValueError, "block_m must be a positive int"),
    (dict(interpret=False), ValueError, "only in interpret mode"),
], ids=["rank1_b", "rank1_a", "inner_mismatch", "int_dtype", "mixed_dtypes", "activation",
        "bias_shape", "int_out_dtype", "zero_block", "cpu_not_interpret"])
def test_invalid_inputs(kwargs, error, match):
  if "interpret" in kwargs and jax.default_backend() != "cpu":
    pytest.skip("compiled kernels are refused only on CPU")
  args = dict(a=np.ones((4, 8), jnp.float16), b=np.ones((8, 4), jnp.float16))
  args.update(kwargs)
  with pytest.raises(error, match=match):
    pallas_kernels.matmul(args.pop("a"), args.pop("b"), **args)


def test_block_rules_per_platform():
  gpu = _Config((48, None, None), (0, 0, 0), "gpu", False)
  with pytest.raises(ValueError, match="powers of 2"):
    resolve_blocks(256, 256, 256, jnp.float16, gpu)
  tpu = _Config((None, 64, None), (0, 0, 0), "tpu", False)
  with pytest.raises(ValueError, match="multiples of"):
    resolve_blocks(256, 256, 256, jnp.bfloat16, tpu)
  # Table blocks shrink to small problems, keeping each backend's minimum tile.
  assert resolve_blocks(5, 7, 3, jnp.float16, gpu._replace(user_blocks=(None,) * 3)) == \
      (16, 16, 16)


def test_tpu_kernel_shape_in_interpret_mode():
  # The TPU kernel (K as a grid axis, float32 scratch accumulator) run by the interpreter.
  a, b, bias = _inputs((40, 300), (300, 100), jnp.bfloat16, seed=8)
  pad = lambda x, r, c: jnp.pad(x, ((0, r - x.shape[0]), (0, c - x.shape[1])))
  y, z = tpu_style_call(pad(a, 48, 384), pad(b, 384, 128), pad(bias[None], 1, 128),
                        blocks=(16, 128, 128), activation="silu", out_dtype=jnp.bfloat16,
                        save_preact=True, interpret=True)
  _check(y[:40, :100], a, b, bias, "silu")
  _check(z[:40, :100], a, b, bias, None, jnp.float32)


@pytest.mark.parametrize("platform,dtype,target", [
    ("gpu", jnp.float16, "__gpu$xla.gpu.triton"), ("tpu", jnp.bfloat16, "tpu_custom_call")])
def test_lowers_for_accelerators(platform, dtype, target):
  # Runs each backend's Pallas lowering (Triton / Mosaic TPU) from this CPU machine: it
  # catches unsupported ops and block shapes, not compiler or runtime failures.
  blocks = (128, 256, 64) if platform == "gpu" else (256, 512, 512)
  cfg = _Config(blocks, blocks, platform, False)
  a = jax.ShapeDtypeStruct((1000, 3000), dtype)
  b = jax.ShapeDtypeStruct((3000, 770), dtype)
  bias = jax.ShapeDtypeStruct((770,), jnp.float32)

  def train(x, y, c):
    f = lambda x, y, c: _matmul_2d(x, y, c, activation="gelu", out_dtype=jnp.dtype(dtype),
                                   cfg=cfg).astype(jnp.float32).sum()
    return jax.grad(f, (0, 1, 2))(x, y, c)

  checks = [export.DisabledSafetyCheck.custom_call(target)]
  try:
    exported = export.export(jax.jit(train), platforms=["cuda" if platform == "gpu" else "tpu"],
                             disabled_checks=checks)(a, b, bias)
  except ImportError as err:
    pytest.skip(f"this jaxlib cannot lower for {platform}: {err}")
  assert exported.mlir_module().count(target) >= 3  # forward, dA, dB


def test_autotune_writes_and_rereads_cache(tmp_path, monkeypatch):
  path = tmp_path / "tuning.json"
  monkeypatch.setenv(tuning.CACHE_ENV, str(path))
  assert tuning.default_cache_path() == path
  assert tuning.lookup((32, 32, 32), jnp.float16) == (tuning.default_blocks(32, 32, 32), False)
  best = tuning.autotune((32, 32, 32), jnp.float16, candidates=[(16, 16, 16), (32, 32, 32)],
                         repeats=1)
  assert best in [(16, 16, 16), (32, 32, 32)]
  entries = json.loads(path.read_text())["entries"]
  key = tuning.cache_key((32, 32, 32), jnp.float16)
  assert key.endswith("/32x32x32/float16") and jax.devices()[0].device_kind in key
  assert set(entries[key]["timings_s"]) == {"16x16x16", "32x32x32"}
  assert tuning.lookup((32, 32, 32), jnp.float16) == (best, True)
  # A second call is served from the cache without timing anything.
  monkeypatch.setattr(tuning, "_time", lambda *a: pytest.fail("re-timed a cached shape"))
  assert tuning.autotune((32, 32, 32), jnp.float16) == best
  cfg = _Config((None, None, None), (0, 0, 0), "cpu", True)
  assert resolve_blocks(32, 32, 32, jnp.float16, cfg) == best


def test_shape_classes():
  assert tuning.shape_class(64, 64, 64) == "small"
  assert tuning.shape_class(1024, 1024, 1024) == "medium"
  assert tuning.shape_class(8192, 768, 3072) == "large"
  for backend in tuning.TABLE:
    assert set(tuning.TABLE[backend]) == {"small", "medium", "large"}


def _skip_unless(backend):
  if jax.default_backend() != backend:
    pytest.skip(f"needs a {backend} backend, have {jax.default_backend()}")


@pytest.mark.gpu
def test_gpu_compiled_kernel():
  _skip_unless("gpu")
  a, b, bias = _inputs((512, 1024), (1024, 768), jnp.float16, seed=9)
  for blocks in [dict(), dict(block_m=64, block_n=64, block_k=32)]:
    out = pallas_kernels.matmul(a, b, bias=bias, activation="gelu", interpret=False, **blocks)
    _check(out, a, b, bias, "gelu")
  grads = jax.grad(lambda x, y: pallas_kernels.matmul(x, y).astype(jnp.float32).sum(),
                   (0, 1))(a, b)
  assert [g.dtype for g in grads] == [jnp.float16, jnp.float16]


@pytest.mark.tpu
def test_tpu_compiled_kernel():
  _skip_unless("tpu")
  a, b, bias = _inputs((512, 1024), (1024, 768), jnp.bfloat16, seed=10)
  out = pallas_kernels.matmul(a, b, bias=bias, activation="silu", interpret=False)
  _check(out, a, b, bias, "silu")
