"""FP16/BF16-in, FP32-accumulate matmul with a fused bias + activation epilogue, in Pallas.

  y = activation(a @ b + bias).astype(out_dtype)

Products are accumulated in float32 inside the kernel and the epilogue runs in float32,
so the result is rounded to `out_dtype` once, instead of after the matmul, the bias add
and the activation. The same `pallas_call` runs on GPU (Triton), TPU (Mosaic) and CPU
(interpret mode, chosen automatically); see `_kernels.py` for the two kernel shapes.

Operands of any shape are zero-padded to block multiples outside the kernel and the
result sliced back, so a ragged edge adds zeros to the sum instead of reading out of
bounds (which interpret mode fills with NaN). The padding copies only for shapes that do
not divide the blocks.

Gradients come from a `jax.custom_vjp`: dA = dZ·Bᵀ and dB = Aᵀ·dZ with the same kernel
(float32 accumulation), where dZ is the cotangent through the activation, evaluated in
float32 at the pre-activation the forward pass saved, and rounded to the operand dtype
for the two matmuls (as an XLA half-precision backward does). The bias gradient is a
float32 sum of dZ. Gradients come back in the input dtypes. Second derivatives are not
supported.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import _kernels, tuning

SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
ACTIVATIONS = _kernels.ACTIVATIONS


class _Config(NamedTuple):
  """Static settings of one call; hashable, so they key the jit cache."""
  user_blocks: tuple[int | None, int | None, int | None]
  blocks: tuple[int, int, int]
  platform: str
  interpret: bool


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _fit(block: int, dim: int, floor: int) -> int:
  # A table block larger than the (power-of-2 rounded) dimension only multiplies zeros.
  return min(block, max(floor, _next_pow2(dim)))


def _check_blocks(blocks: tuple[int, int, int], platform: str, interpret: bool) -> None:
  for name, value in zip(("block_m", "block_n", "block_k"), blocks, strict=True):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
    if interpret:
      continue
    if platform == "gpu" and (value < 16 or value & (value - 1)):
      raise ValueError(f"{name}={value}: Triton needs powers of 2 of at least 16; "
                       "pass e.g. 64 or 128, or None for the tuned default")
    if platform == "tpu" and value % (8 if name == "block_m" else 128):
      raise ValueError(f"{name}={value}: TPU blocks must be multiples of (8, 128, 128) "
                       "for (block_m, block_n, block_k); pass e.g. 256, or None")


def resolve_blocks(m: int, k: int, n: int, dtype: Any, cfg: _Config) -> tuple[int, int, int]:
  """Fills unset block sizes from the tuning cache or table and checks them.

  Args:
    m, k, n: the 2-D problem (A is [m, k], B is [k, n]).
    dtype: the operand dtype.
    cfg: the call's settings; `cfg.user_blocks` holds what the caller passed.

  Returns:
    (block_m, block_n, block_k).
  """
  user = cfg.user_blocks
  if None in user:
    table, tuned = tuning.lookup((m, k, n), dtype)
    if not tuned:
      # Triton's dot wants >= 16 per side; TPU tiles are (8, 128) and bf16 packs 16 rows.
      lane = 128 if cfg.platform == "tpu" else 16
      table = (_fit(table[0], m, 16), _fit(table[1], n, lane), _fit(table[2], k, lane))
    user = tuple(u if u is not None else t for u, t in zip(user, table, strict=True))
  _check_blocks(user, cfg.platform, cfg.interpret)
  return user


def _round_up(x: int, block: int) -> int:
  return max(1, -(-x // block)) * block


def _call(a, b, bias, *, blocks, activation, out_dtype, save_preact, cfg):
  """Pads to block multiples, runs the backend's kernel, slices the padding off."""
  (m, k), n = a.shape, b.shape[1]
  bm, bn, bk = blocks
  mp, kp, np_ = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
  a = jnp.pad(a, ((0, mp - m), (0, kp - k)))
  b = jnp.pad(b, ((0, kp - k), (0, np_ - n)))
  if bias is not None:
    bias = jnp.pad(bias.astype(jnp.float32), (0, np_ - n)).reshape(1, np_)
  kwargs = dict(blocks=blocks, activation=activation, out_dtype=out_dtype,
                save_preact=save_preact, interpret=cfg.interpret)
  if cfg.platform == "tpu":
    out = _kernels.tpu_style_call(a, b, bias, **kwargs)
  else:
    out = _kernels.gpu_style_call(a, b, bias, on_gpu=cfg.platform == "gpu", **kwargs)
  if save_preact:
    return tuple(x[:m, :n] for x in out)
  return out[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _matmul_vjp(a, b, bias, activation, out_dtype, cfg):
  return _call(a, b, bias, blocks=cfg.blocks, activation=activation, out_dtype=out_dtype,
               save_preact=False, cfg=cfg)


def _matmul_fwd(a, b, bias, activation, out_dtype, cfg):
  if activation is None:
    y = _call(a, b, bias, blocks=cfg.blocks, activation=None, out_dtype=out_dtype,
              save_preact=False, cfg=cfg)
    return y, (a, b, bias, None)
  # The float32 pre-activation costs 4 bytes per output element but saves recomputing
  # the matmul in the backward pass.
  y, z = _call(a, b, bias, blocks=cfg.blocks, activation=activation, out_dtype=out_dtype,
               save_preact=True, cfg=cfg)
  return y, (a, b, bias, z)


def _matmul_bwd(activation, out_dtype, cfg, residuals, g):
  a, b, bias, z = residuals
  dz = g.astype(jnp.float32)
  if z is not None:
    _, act_vjp = jax.vjp(lambda t: _kernels.apply_activation(t, activation), z)
    (dz,) = act_vjp(dz)
  dbias = None if bias is None else jnp.sum(dz, axis=0).astype(bias.dtype)
  dz = dz.astype(a.dtype)
  (m, k), n = a.shape, b.shape[1]
  b_t, a_t = b.T, a.T
  da = _call(dz, b_t, None, blocks=resolve_blocks(m, n, k, a.dtype, cfg), activation=None,
             out_dtype=a.dtype, save_preact=False, cfg=cfg)
  db = _call(a_t, dz, None, blocks=resolve_blocks(k, m, n, a.dtype, cfg), activation=None,
             out_dtype=b.dtype, save_preact=False, cfg=cfg)
  return da, db, dbias


_matmul_vjp.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.jit, static_argnames=("activation", "out_dtype", "cfg"))
def _matmul_2d(a, b, bias, *, activation, out_dtype, cfg):
  return _matmul_vjp(a, b, bias, activation, out_dtype, cfg)


def _check_dtype(name: str, dtype: Any) -> None:
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"{name} has dtype {jnp.dtype(dtype).name}, but matmul takes float16, "
                    f"bfloat16 or float32; cast it, e.g. {name}.astype(jnp.bfloat16)")


def matmul(a: jax.Array, b: jax.Array, *, bias: jax.Array | None = None,
           activation: str | None = None, out_dtype: Any = None, block_m: int | None = None,
           block_n: int | None = None, block_k: int | None = None,
           interpret: bool | None = None) -> jax.Array:
  """`activation(a @ b + bias)` with float32 accumulation and one final cast.

  Args:
    a: [..., M, K], float16, bfloat16 or float32; leading dimensions are folded into M.
    b: [K, N], the same dtype as `a`.
    bias: optional [N] floating-point vector, added in float32.
    activation: None, "relu", "gelu" (the tanh approximation, as
      `jax.nn.gelu(approximate=True)`) or "silu"; applied in float32.
    out_dtype: dtype of the result; default `a.dtype`.
    block_m, block_n, block_k: tile sizes; None takes the autotuned value cached for this
      device, shape and dtype, else the `tuning.TABLE` default.
    interpret: run the kernel in the Pallas interpreter; None means True exactly on CPU.

  Returns:
    [..., M, N] in `out_dtype`.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_dtype("a", a.dtype)
  _check_dtype("b", b.dtype)
  if a.dtype != b.dtype:
    raise TypeError(f"a is {a.dtype.name} but b is {b.dtype.name}; cast both to one dtype "
                    "(the kernel multiplies like with like)")
  if a.ndim < 2:
    raise ValueError(f"a must be [..., M, K] (at least 2-D), got shape {a.shape}; "
                     "reshape a vector to [1, K]")
  if b.ndim != 2:
    raise ValueError(f"b must be 2-D [K, N], got shape {b.shape}; for a batch of b, "
                     "use jax.vmap over matmul")
  if a.shape[-1] != b.shape[0]:
    raise ValueError(f"inner dimensions differ: a is {a.shape} and b is {b.shape} "
                     f"(a.shape[-1]={a.shape[-1]} must equal b.shape[0]={b.shape[0]})")
  n = b.shape[1]
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (n,):
      raise ValueError(f"bias must have shape ({n},) to match b's N, got {bias.shape}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias must be floating point, got {bias.dtype.name}")
  if activation is not None and activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; use one of {ACTIVATIONS} or None")
  out_dtype = a.dtype if out_dtype is None else jnp.dtype(out_dtype)
  _check_dtype("out_dtype", out_dtype)

  platform = tuning.backend_name()
  if interpret is None:
    interpret = platform == "cpu"
  elif not interpret and platform == "cpu":
    raise ValueError("Pallas kernels run on CPU only in interpret mode; pass interpret=None "
                     "or interpret=True")
  if platform == "tpu" and not interpret and a.dtype == jnp.float16:
    raise TypeError("TPU Pallas kernels do not take float16; use bfloat16 operands on TPU")

  batch = a.shape[:-1]
  a2 = a.reshape(math.prod(batch), a.shape[-1])  # not -1: K may be 0
  cfg = _Config((block_m, block_n, block_k), (0, 0, 0), platform, bool(interpret))
  cfg = cfg._replace(blocks=resolve_blocks(a2.shape[0], a2.shape[1], n, a.dtype, cfg))
  out = _matmul_2d(a2, b, bias, activation=activation, out_dtype=out_dtype, cfg=cfg)
  return out.reshape(*batch, n)
