"""Kernel bodies and `pallas_call` builders for the FP32-accumulate matmul.

Two kernel shapes, one per family of hardware:

* GPU style (also used on CPU in interpret mode): a 1-D grid over the (M/bm, N/bn)
  output tiles, each program holding a full-K row block of A and column block of B and
  looping over K blocks inside the kernel with `fori_loop`. GPU programs run in
  parallel, so a K grid axis accumulating into one output tile would race. The tile
  order is "grouped" (Triton matmul tutorial): `group_m` row tiles share each column
  tile so the B blocks stay in L2.
* TPU style: a 3-D grid (M/bm, N/bn, K/bk) whose K axis is "arbitrary" (sequential on
  one core), accumulating into a float32 VMEM scratch tile written out on the last step.

Both multiply half-precision tiles with `preferred_element_type=float32` into a float32
accumulator, apply the optional bias and activation in float32, and cast once. Callers
pass operands already padded to block multiples (see `matmul.py`), so no block ever
reads out of bounds; interpret mode would otherwise fill those reads with NaN.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

ACTIVATIONS = ("relu", "gelu", "silu")
# tanh-approximate GELU, the same formula as jax.nn.gelu(approximate=True).
_GELU_C = math.sqrt(2.0 / math.pi)


def apply_activation(z: jax.Array, activation: str | None) -> jax.Array:
  """The epilogue activation, written with ops every Pallas lowering supports.

  Args:
    z: the float32 pre-activation tile.
    activation: None, "relu", "gelu" (tanh approximation) or "silu".

  Returns:
    The activated tile, still float32.
  """
  if activation is None:
    return z
  if activation == "relu":
    # where, not maximum: its derivative at exactly 0 is 0 like jax.nn.relu's.
    return jnp.where(z > 0, z, 0.0)
  if activation == "gelu":
    return 0.5 * z * (1.0 + jnp.tanh(_GELU_C * (z + 0.044715 * z * z * z)))
  if activation == "silu":
    return z / (1.0 + jnp.exp(-z))
  raise ValueError(f"unknown activation {activation!r}; use one of {ACTIVATIONS} or None")


def _dot_precision(dtype: Any) -> Any:
  # Float32 operands would otherwise be rounded to bf16 (TPU) or TF32 (GPU).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _epilogue(acc, bias_ref, o_ref, z_ref, activation):
  z = acc if bias_ref is None else acc + bias_ref[...].astype(jnp.float32)
  if z_ref is not None:
    z_ref[...] = z
  o_ref[...] = apply_activation(z, activation).astype(o_ref.dtype)


def _gpu_kernel(*refs, has_bias, save_preact, activation, nk, bk, precision):
  a_ref, b_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  o_ref = rest.pop(0)
  z_ref = rest.pop(0) if save_preact else None
  bm, bn = a_ref.shape[0], b_ref.shape[1]

  def body(k, acc):
    start = pl.multiple_of(k * bk, bk)
    a = a_ref[:, pl.ds(start, bk)]
    b = b_ref[pl.ds(start, bk), :]
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

  acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  _epilogue(acc, bias_ref, o_ref, z_ref, activation)


def _tpu_kernel(*refs, has_bias, save_preact, activation, nk, precision):
  a_ref, b_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  o_ref = rest.pop(0)
  z_ref = rest.pop(0) if save_preact else None
  acc_ref = rest.pop(0)
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  acc_ref[...] += jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32,
                          precision=precision)

  @pl.when(k == nk - 1)
  def _():
    _epilogue(acc_ref[...], bias_ref, o_ref, z_ref, activation)


def _grouped_tile(pid, num_m, num_n, group_m):
  """Maps a 1-D program id to an (m, n) tile, `group_m` row tiles at a time."""
  group_size = group_m * num_n
  first_m = lax.div(pid, group_size) * group_m
  rows = lax.min(num_m - first_m, group_m)
  local = lax.rem(pid, group_size)
  return first_m + lax.rem(local, rows), lax.div(local, rows)


def triton_compiler_params(block_m: int, block_n: int, block_k: int) -> Any:
  """Triton compiler parameters, by whichever name the installed jax uses.

  Returns:
    A Triton `CompilerParams` (which also selects the Triton lowering on jax >= 0.9.1),
    or None when this jax has no Triton backend.
  """
  try:
    from jax.experimental.pallas import triton as pltriton
  except ImportError:
    return None
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pl, "TritonCompilerParams", None)
  if cls is None:
    return None
  # The Triton tutorial's best H100 tile (128x256x64) uses 8 warps; smaller tiles 4.
  num_warps = 8 if block_m * block_n >= 128 * 256 else 4
  num_stages = 4 if block_k <= 32 else 3
  return cls(num_warps=num_warps, num_stages=num_stages)


@functools.cache
def _pallas_call_has_backend_arg() -> bool:
  # jax < 0.9.1 picked the GPU lowering by `backend=`; later versions by params type.
  return "backend" in inspect.signature(pl.pallas_call).parameters


def gpu_style_call(a, b, bias, *, blocks, activation, out_dtype, save_preact, interpret,
                   on_gpu, group_m=8):
  """Runs the GPU-style kernel on block-aligned operands.

  Args:
    a: [Mp, Kp], b: [Kp, Np], both multiples of `blocks`.
    bias: None or a float32 [1, Np].
    blocks: (block_m, block_n, block_k).
    activation: the epilogue activation (see `apply_activation`).
    out_dtype: dtype of the result.
    save_preact: also return the float32 pre-activation (for the backward pass).
    interpret: run in the Pallas interpreter.
    on_gpu: compile for a real GPU (adds the Triton compiler parameters).
    group_m: row tiles per group in the tile order.

  Returns:
    [Mp, Np] in `out_dtype`, or (that, float32 pre-activation) if `save_preact`.
  """
  bm, bn, bk = blocks
  (mp, kp), np_ = a.shape, b.shape[1]
  num_m, num_n = mp // bm, np_ // bn
  tile = functools.partial(_grouped_tile, num_m=num_m, num_n=num_n,
                           group_m=min(group_m, num_m))
  in_specs = [pl.BlockSpec((bm, kp), lambda p: (tile(p)[0], 0)),
              pl.BlockSpec((kp, bn), lambda p: (0, tile(p)[1]))]
  operands = [a, b]
  if bias is not None:
    in_specs.append(pl.BlockSpec((1, bn), lambda p: (0, tile(p)[1])))
    operands.append(bias)
  out_spec = pl.BlockSpec((bm, bn), lambda p: tile(p))
  out_shape = [jax.ShapeDtypeStruct((mp, np_), out_dtype)]
  if save_preact:
    out_shape.append(jax.ShapeDtypeStruct((mp, np_), jnp.float32))
  kernel = functools.partial(_gpu_kernel, has_bias=bias is not None, save_preact=save_preact,
                             activation=activation, nk=kp // bk, bk=bk,
                             precision=_dot_precision(a.dtype))
  extra: dict[str, Any] = {}
  if on_gpu and not interpret:
    params = triton_compiler_params(bm, bn, bk)
    if params is None:
      raise NotImplementedError(
          f"jax {jax.__version__} has no Pallas Triton backend, which this kernel's GPU "
          "path needs; use jax < 0.12 or pass interpret=True")
    extra["compiler_params"] = params
    if _pallas_call_has_backend_arg():
      extra["backend"] = "triton"
  out = pl.pallas_call(kernel, out_shape=out_shape, grid=(num_m * num_n,), in_specs=in_specs,
                       out_specs=[out_spec] * len(out_shape), interpret=interpret,
                       name="dsjax_matmul", **extra)(*operands)
  return tuple(out) if save_preact else out[0]


def tpu_style_call(a, b, bias, *, blocks, activation, out_dtype, save_preact, interpret):
  """Runs the TPU-style kernel (K as an "arbitrary" grid axis) on block-aligned operands.

  Args and Returns are as for `gpu_style_call`.
  """
  from jax.experimental.pallas import tpu as pltpu

  bm, bn, bk = blocks
  (mp, kp), np_ = a.shape, b.shape[1]
  grid = (mp // bm, np_ // bn, kp // bk)
  in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
              pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))]
  operands = [a, b]
  if bias is not None:
    in_specs.append(pl.BlockSpec((1, bn), lambda i, j, k: (0, j)))
    operands.append(bias)
  out_spec = pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))
  out_shape = [jax.ShapeDtypeStruct((mp, np_), out_dtype)]
  if save_preact:
    out_shape.append(jax.ShapeDtypeStruct((mp, np_), jnp.float32))
  kernel = functools.partial(_tpu_kernel, has_bias=bias is not None, save_preact=save_preact,
                             activation=activation, nk=grid[2],
                             precision=_dot_precision(a.dtype))
  params_cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=[out_spec] * len(out_shape),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=params_cls(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="dsjax_matmul")(*operands)
  return tuple(out) if save_preact else out[0]
