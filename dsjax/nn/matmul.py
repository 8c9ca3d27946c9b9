"""Matmuls and convolutions that accumulate in float32 and keep their backward pass in
half precision.

`lax.dot_general(a16, b16, preferred_element_type=float32)` is the right forward for
mixed precision, but its transpose rule feeds the float32 output cotangent into the two
backward products: `dot(g32, b16)` has mixed operand dtypes, which XLA computes by
upcasting the half operand. On a GPU that sends two thirds of a training step's matmul
FLOPs to float32 (TF32 cuBLAS or Triton) kernels instead of the half-precision tensor
cores (measured on an H200: bert-base under `--precision mixed` ran at the speed of
fp32). The functions here give the same forward and round the cotangent to the
operands' dtype before the backward products, as PyTorch AMP's backward does (and
forward-mode tangents likewise); every
product still accumulates in float32 (XLA's half GEMMs and convolutions accumulate in
float32 on GPU, TPU and CPU), and gradients come back in the operand dtypes.

The rounding loses nothing where the caller rounds the forward output to the operand
dtype anyway (every dsjax layer does: `y = (dot + bias).astype(dtype)`), because the
cotangent reaching the product is then a half value converted to float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

# op(lhs, rhs, preferred_element_type) -> product; bilinear in (lhs, rhs).
Bilinear = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _half_backward(op: Bilinear) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Wraps a bilinear op: float32 forward output, derivatives in the operands' dtype
  (half operands go through a custom JVP; float32 ones through the op itself).

  A custom JVP rather than a custom VJP, so forward mode (`jax.jvp`, Hessian-vector
  products as in second-order DNAS) works too: the tangent products take half operands
  and are rounded to the half dtype before the float32 sum, so their transposes, the
  backward products, take half cotangents.
  """

  @jax.custom_jvp
  def apply(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return op(lhs, rhs, jnp.float32)

  def jvp(primals: tuple[jax.Array, jax.Array],
          tangents: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    out = op(lhs, rhs, jnp.float32)
    terms = []
    if not isinstance(lhs_dot, SymbolicZero):
      terms.append(op(lhs_dot, rhs, None).astype(jnp.float32))
    if not isinstance(rhs_dot, SymbolicZero):
      terms.append(op(lhs, rhs_dot, None).astype(jnp.float32))
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)

  apply.defjvp(jvp, symbolic_zeros=True)

  def dispatch(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    # Float32 operands: the op's own derivative already takes float32 cotangents, and the
    # custom rule only hides the product from XLA (bert-base fp32 on CPU ran 5-8% slower
    # through it: docs/benchmarks.md).
    if not jnp.issubdtype(lhs.dtype, jnp.floating) or jnp.finfo(lhs.dtype).bits >= 32:
      return op(lhs, rhs, jnp.float32)
    return apply(lhs, rhs)

  return dispatch


def _check_dtypes(lhs: jax.Array, rhs: jax.Array, name: str) -> None:
  if jnp.dtype(lhs.dtype) != jnp.dtype(rhs.dtype):
    raise TypeError(f"{name}: operands must share one dtype (cast both to the layer dtype), "
                    f"got {lhs.dtype} and {rhs.dtype}")


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> jax.Array:
  """`lax.dot_general` with a float32 result and a half-precision backward.

  Args:
    lhs: left operand (float16, bfloat16 or float32).
    rhs: right operand, same dtype as lhs.
    dimension_numbers: as for `lax.dot_general`.

  Returns:
    The product in float32, accumulated in float32.
  """
  _check_dtypes(lhs, rhs, "dot_general")

  def op(a: jax.Array, b: jax.Array, out: Any) -> jax.Array:
    return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=out)

  return _half_backward(op)(lhs, rhs)


def einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """Two-operand `jnp.einsum` with a float32 result and a half-precision backward.

  Args:
    subscripts: e.g. "bqhd,bkhd->bhqk".
    lhs: first operand.
    rhs: second operand, same dtype.

  Returns:
    The contraction in float32, accumulated in float32.
  """
  _check_dtypes(lhs, rhs, "einsum")

  def op(a: jax.Array, b: jax.Array, out: Any) -> jax.Array:
    return jnp.einsum(subscripts, a, b, preferred_element_type=out)

  return _half_backward(op)(lhs, rhs)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *, window_strides: Sequence[int],
                         padding: Any, dimension_numbers: Any,
                         feature_group_count: int = 1) -> jax.Array:
  """`lax.conv_general_dilated` with a float32 result and a half-precision backward.

  Args:
    lhs: input activations.
    rhs: kernel, same dtype.
    window_strides: strides per spatial dimension.
    padding: "SAME", "VALID" or explicit pairs.
    dimension_numbers: e.g. ("NHWC", "HWIO", "NHWC").
    feature_group_count: channel groups.

  Returns:
    The convolution in float32, accumulated in float32.
  """
  _check_dtypes(lhs, rhs, "conv_general_dilated")
  strides = tuple(window_strides)
  padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)

  def op(a: jax.Array, b: jax.Array, out: Any) -> jax.Array:
    return jax.lax.conv_general_dilated(
        a, b, window_strides=strides, padding=padding, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, preferred_element_type=out)

  return _half_backward(op)(lhs, rhs)
