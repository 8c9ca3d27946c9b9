"""Precision-plan-aware linen layers.

Every layer creates float32 (or `param_dtype`) parameters, reads them in whatever dtype
the train state keeps them (the policy's `param_dtype`), and computes in
`self.precision.dtype(self)`: the `dsjax.precision.LayerPrecision` a model hands all its
layers gives half precision unless its plan promotes the layer's path to float32.
Matmuls and convolutions accumulate in float32 (`dsjax.nn.matmul`: their backward
products stay in half precision too), biases are added in float32, and the result is
rounded once to the layer dtype. Numerically sensitive reductions (LayerNorm
statistics, softmax) are always float32, as in PyTorch AMP.

`Dense` and `Conv` also take a call-time `numeric_format` (a `dsjax.precision.FORMATS`
name): the kernel (one scale per output channel) and the inputs (one per tensor) are then
rounded to that format (`dsjax.precision.apply_format`: fake quantization with a
straight-through gradient for integers, a cast and back for floats) before the product,
which still accumulates in float32 in the layer dtype. A DNAS format search calls one layer
under several formats with the same weights; the derived network calls it with its one.

Layers sow `max_abs` and `nonfinite` of their output into the "precision_stats"
collection when it is mutable (not during init), for a precision controller to read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from dsjax.errors import ConfigError
from dsjax.nn import matmul
from dsjax.precision import quantize
from dsjax.precision.plan import LayerPrecision

Initializer = Callable[..., jax.Array]
Axes = tuple[str | None, ...]
STATS = "precision_stats"
MATMUL_IMPLS = ("xla", "pallas")
# How `attend` computes softmax(q k^T + bias) v: "explicit" (dsjax's products, float32
# softmax, dropout; the plan governs the logits), "jax" (`jax.nn.dot_product_attention`,
# implementation chosen by JAX) or "cudnn" (its fused cuDNN flash-attention kernel, NVIDIA
# GPUs, float16/bfloat16). The fused ones never materialise the logits and have no dropout.
ATTENTION_IMPLS = ("explicit", "jax", "cudnn")
# A masked logit's bias where it must be finite in float16 (cuDNN takes the bias in the
# input dtype): exp(-32768) is 0 in float32 as surely as exp(finfo.min).
_FUSED_MASK_BIAS = -2.0**15


def sow_stats(module: nn.Module, out: jax.Array, matmul_flops: float = 0.0,
               inputs: Sequence[jax.Array] = ()) -> None:
  # Skipped during init so `init` returns only parameters, not a stats collection the
  # training state would then carry around.
  if module.is_initializing() or not module.is_mutable_collection(STATS):
    return
  module.sow(STATS, "max_abs", jnp.max(jnp.abs(out.astype(jnp.float32))))
  module.sow(STATS, "nonfinite", jnp.sum(~jnp.isfinite(out)))
  # Non-finite values propagate: a layer whose inputs were already non-finite did not
  # overflow itself, and promoting it would not help.
  module.sow(STATS, "input_nonfinite",
             sum((jnp.sum(~jnp.isfinite(x)) for x in inputs), jnp.zeros((), jnp.int32)))
  # A compile-time constant: what share of the model's matmul work this layer's plan
  # entry governs (the fp16_matmul_flops_fraction metric).
  module.sow(STATS, "matmul_flops", jnp.asarray(float(matmul_flops), jnp.float32))


def in_format(x: jax.Array, numeric_format: str | quantize.FormatMixture | None, dtype: Any,
              channel_axis: Any = None) -> jax.Array:
  """Returns `x` rounded to `numeric_format` (None: unchanged), in `dtype`.

  The rounding is computed in float32 (master weights may be kept in bfloat16), so an
  integer format's levels and scales are exact before the one cast to the layer dtype.
  """
  if numeric_format is None:
    return x.astype(dtype)
  rounded = quantize.apply_format(x.astype(jnp.float32), numeric_format,
                                  channel_axis=channel_axis)
  return rounded.astype(dtype)


def _features(features: int | Sequence[int]) -> tuple[int, ...]:
  return (features,) if isinstance(features, int) else tuple(features)


class Dense(nn.Module):
  """y = x @ kernel + bias over the last axis of x, with float32 accumulation.

  Attributes:
    features: output size, or a tuple of output sizes (kernel [in, *features]).
    use_bias: whether to add a bias.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    kernel_axes: logical axis names of the kernel, one per kernel dimension; the bias
      takes `kernel_axes[1:]`. Names only: sharding needs a mesh and rules later.
    precision: compute dtype, plan and matmul implementation: "xla" (`lax.dot_general`)
      or "pallas" (`pallas_kernels.matmul`, the FP16/BF16-in, FP32-accumulate kernel;
      interpret mode on CPU).
    param_dtype: dtype the parameters are created in.
  """

  features: int | tuple[int, ...]
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  kernel_axes: Axes = (None, None)
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array,
               numeric_format: str | quantize.FormatMixture | None = None) -> jax.Array:
    """Returns inputs @ kernel + bias; `numeric_format` rounds kernel and inputs first (see
    the module docstring)."""
    precision = self.precision
    if precision.matmul_impl not in MATMUL_IMPLS:
      raise ValueError(f"matmul_impl must be one of {MATMUL_IMPLS}, got "
                       f"{precision.matmul_impl!r}")
    features = _features(self.features)
    if len(self.kernel_axes) != 1 + len(features):
      raise ValueError(f"kernel_axes {self.kernel_axes} must name {1 + len(features)} kernel "
                       f"dimensions (input, *features={features})")
    dtype = precision.dtype(self)

    def kernel_init(rng: jax.Array, shape: tuple[int, ...], param_dtype: Any) -> jax.Array:
      # Initialise as [in, prod(features)]: variance-scaling initialisers would otherwise
      # take fan-in from shape[-2] (the heads axis of a [embed, heads, kv] kernel).
      flat = self.kernel_init(rng, (shape[0], math.prod(shape[1:])), param_dtype)
      return flat.reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, self.kernel_axes),
                        (inputs.shape[-1], *features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[1:]),
                        features, self.param_dtype)
    # One scale per output unit: every kernel axis but the input one.
    x = in_format(inputs, numeric_format, dtype)
    w = in_format(kernel, numeric_format, dtype, tuple(range(1, kernel.ndim)))
    if precision.matmul_impl == "pallas":
      # The Pallas kernel: half-precision inputs, float32 accumulation and bias, one cast.
      flat_kernel = w.reshape(kernel.shape[0], -1)
      flat_bias = None if bias is None else bias.reshape(-1).astype(jnp.float32)
      y = pallas_kernels.matmul(x, flat_kernel, bias=flat_bias, out_dtype=dtype)
      y = y.reshape(*inputs.shape[:-1], *features)
    else:
      dims = (((inputs.ndim - 1,), (0,)), ((), ()))
      y = matmul.dot_general(x, w, dims)
      if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = y.astype(dtype)
    sow_stats(self, y, 2.0 * (inputs.size // inputs.shape[-1]) * kernel.size, [inputs])
    return y


class Conv(nn.Module):
  """2-D convolution on NHWC inputs with an HWIO kernel and float32 accumulation.

  Attributes:
    features: output channels.
    kernel_size: (height, width) of the kernel.
    strides: an int, or (height, width) strides.
    padding: "SAME", "VALID" or explicit [(lo, hi), (lo, hi)].
    use_bias: whether to add a bias.
    feature_group_count: channel groups; equal to the input channels for depthwise.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
    kernel_axes: logical names of the [height, width, in, out] kernel; the bias takes
      the last. The default rules put "conv_in" on `fsdp` and "conv_out" on `model`
      (as a Dense kernel's "embed" and "mlp").
    precision: compute dtype and plan (`matmul_impl` does not apply to convolutions).
    param_dtype: dtype the parameters are created in.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  feature_group_count: int = 1
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  kernel_axes: Axes = (None, None, "conv_in", "conv_out")
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array,
               numeric_format: str | quantize.FormatMixture | None = None) -> jax.Array:
    """Convolves NHWC `inputs`; `numeric_format` rounds kernel (per output channel) and
    inputs (per tensor) first (see the module docstring)."""
    in_features = inputs.shape[-1]
    if in_features % self.feature_group_count or self.features % self.feature_group_count:
      raise ValueError(f"input ({in_features}) and output ({self.features}) channels must be "
                       f"divisible by feature_group_count={self.feature_group_count}")
    dtype = self.precision.dtype(self)
    kernel_shape = (*self.kernel_size, in_features // self.feature_group_count, self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        kernel_shape, self.param_dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
    y = matmul.conv_general_dilated(
        in_format(inputs, numeric_format, dtype), in_format(kernel, numeric_format, dtype, -1),
        window_strides=strides, padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.feature_group_count)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init,
                                                             self.kernel_axes[-1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    y = y.astype(dtype)
    sow_stats(self, y, 2.0 * (y.size // self.features) * kernel.size, [inputs])
    return y


class Embed(nn.Module):
  """A lookup table, with `attend` as the tied output projection.

  Attributes:
    num_embeddings: vocabulary size.
    features: embedding width.
    embedding_init: table initializer.
    embedding_axes: logical axis names of the [vocab, features] table.
    precision: compute dtype and plan.
    param_dtype: dtype the table is created in.
  """

  num_embeddings: int
  features: int
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
  embedding_axes: Axes = (None, None)
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32

  def setup(self) -> None:
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.embedding_axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Looks up integer `ids` [...]; returns [..., features] in the layer dtype."""
    dtype = self.precision.dtype(self)
    # Gather the feature axis for the lookup (FSDP: parameters are gathered for compute).
    # Left sharded, its mesh axis (fsdp) would shard the rows' features while the rows'
    # batch axis is sharded over the same mesh axis, which XLA can only reconcile by
    # replicating the whole lookup ("involuntary full rematerialization").
    table = nn.with_logical_constraint(self.embedding, (self.embedding_axes[0], None))
    out = jnp.take(table, ids, axis=0).astype(dtype)
    sow_stats(self, out)
    return out

  def attend(self, query: jax.Array) -> jax.Array:
    """Returns query [..., features] @ table.T: [..., num_embeddings] logits.

    Args:
      query: activations to score against every embedding.

    Returns:
      The logits in the layer dtype, accumulated in float32.
    """
    dtype = self.precision.dtype(self)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    out = matmul.dot_general(query.astype(dtype), self.embedding.astype(dtype), dims).astype(dtype)
    sow_stats(self, out, 2.0 * (query.size // query.shape[-1]) * self.embedding.size, [query])
    return out


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis, statistics always in float32.

  Half-precision variance overflows for |x| ≳ 256 in float16 and is coarse in bfloat16,
  so mean and variance are computed in float32 whatever the plan. The plan decides only
  the output dtype: "fp32" keeps the normalised output in float32.

  Attributes:
    epsilon: added to the variance.
    use_scale: whether to multiply by a learned scale (initialised to ones).
    use_bias: whether to add a learned bias (initialised to zeros).
    feature_axes: logical name of the normalised axis, for the scale and bias.
    precision: compute dtype and plan.
    param_dtype: dtype the scale and bias are created in.
  """

  epsilon: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  feature_axes: Axes = ("embed",)
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    dtype = self.precision.dtype(self)
    x = inputs.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    # Two-pass variance: E[x²] - E[x]² cancels catastrophically when |mean| >> std.
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    features = (inputs.shape[-1],)
    if self.use_scale:
      scale = nn.with_logical_partitioning(nn.initializers.ones_init(), self.feature_axes)
      y = y * self.param("scale", scale, features, self.param_dtype).astype(jnp.float32)
    if self.use_bias:
      bias = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.feature_axes)
      y = y + self.param("bias", bias, features, self.param_dtype).astype(jnp.float32)
    y = y.astype(dtype)
    sow_stats(self, y, inputs=[inputs])
    return y


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with float32 softmax.

  q, k, v and the output projection are `Dense` sub-layers named query, key, value and
  out, each with its own plan entry ("<path>/query", ...). This module's own entry
  decides the logits: produced in the layer dtype (half) unless promoted, in which case
  they stay float32 end to end. The softmax itself always runs in float32.

  Attributes:
    num_heads: number of heads.
    head_dim: width of each head.
    dropout_rate: dropout on the attention weights (needs a "dropout" rng when active).
    kernel_init: initializer of the four projection kernels.
    precision: compute dtype, plan and matmul implementation, for this layer and its
      projections.
    param_dtype: dtype the parameters are created in.
    impl: one of `ATTENTION_IMPLS` (see `attend`).
  """

  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  kernel_init: Initializer = nn.initializers.lecun_normal()
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32
  impl: str = "explicit"

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    """Attends from `inputs_q` [batch, q, embed] to `inputs_kv` [batch, k, embed].

    Args:
      inputs_q: queries.
      inputs_kv: keys/values; None for self-attention.
      mask: [batch, 1 | heads, q, k]; boolean (True = attend) or additive (added to the
        logits in float32).
      deterministic: disables dropout.

    Returns:
      [batch, q, embed] in the dtype of the "out" projection (its own plan entry).
    """
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    dtype = self.precision.dtype(self)
    embed = inputs_q.shape[-1]

    def project(name: str, x: jax.Array) -> jax.Array:
      return Dense((self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
                   kernel_init=self.kernel_init, precision=self.precision,
                   param_dtype=self.param_dtype, name=name)(x)

    q = project("query", inputs_q)
    k = project("key", inputs_kv)
    v = project("value", inputs_kv)
    q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    context = attend(self, q, k, v, mask, dtype=dtype, dropout_rate=self.dropout_rate,
                     deterministic=deterministic, impl=self.impl)
    out = Dense(embed, kernel_axes=("heads", "embed"), kernel_init=self.kernel_init,
                precision=self.precision, param_dtype=self.param_dtype,
                name="out")(context.reshape(*context.shape[:2], -1))
    return out


def attend(module: nn.Module, query: jax.Array, key: jax.Array, value: jax.Array,
           mask: jax.Array | None = None, *, dtype: Any, dropout_rate: float = 0.0,
           deterministic: bool = True, impl: str = "explicit") -> jax.Array:
  """softmax(query key^T + mask) value for each head, in `dtype`, the core of attention.

  The explicit implementation computes the logits in `dtype` with float32 accumulation,
  sows them as `module`'s precision statistics (their range is what overflows in float16),
  adds the mask and takes the softmax in float32, and applies dropout. The fused ones
  ("jax", "cudnn") hand q, k, v in `dtype` to `jax.nn.dot_product_attention`, which
  accumulates and takes the softmax in float32 inside the kernel; the statistics are then
  those of the output. "cudnn" needs half precision: a plan that promotes the layer to
  float32 (or a float32 run) computes it explicitly.

  Args:
    module: the attention layer (for statistics and the dropout rng).
    query: [batch, q, heads, head_dim], already scaled by head_dim ** -0.5.
    key: [batch, k, heads, head_dim].
    value: [batch, k, heads, head_dim].
    mask: None, a boolean [batch, 1 | heads, q | 1, k] (True: attend) or an additive bias of
      that shape (float32; masked keys at the dtype's most negative value).
    dtype: the layer's compute dtype.
    dropout_rate: dropout on the attention weights; only the explicit implementation has it.
    deterministic: disables dropout.
    impl: one of `ATTENTION_IMPLS`.

  Returns:
    [batch, q, heads, head_dim] in `dtype`.

  Raises:
    ConfigError: an unknown `impl`, dropout with a fused one, "cudnn" off NVIDIA GPUs, or
      "jax" in float16 on a CPU (XLA:CPU has no float16 x float16 -> float32 dot).
  """
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                      f"got {impl!r}")
  query, key, value = (x.astype(dtype) for x in (query, key, value))
  # FLOPs: the logits and the weighted sum of values, 2 * b*h*q*k*d each.
  flops = 4.0 * query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1] * query.shape[3]
  fused = impl == "jax" or (impl == "cudnn" and dtype != jnp.float32)
  if fused:
    if dropout_rate > 0.0 and not deterministic:
      raise ConfigError(f"attention_impl={impl!r} has no dropout on the attention weights: "
                        "set the model's attention_dropout_rate to 0 or use 'explicit'")
    if impl == "cudnn" and jax.default_backend() != "gpu":
      raise ConfigError(f"attention_impl='cudnn' runs on NVIDIA GPUs only (this run's backend "
                        f"is {jax.default_backend()}): use 'explicit' or 'jax'")
    if dtype == jnp.float16 and jax.default_backend() == "cpu":
      # JAX asks for an F16_F16_F32 dot, which XLA:CPU does not have.
      raise ConfigError("attention_impl='jax' cannot compute float16 on CPU: use 'explicit'")
    bias = boolean = None
    if mask is not None:
      # cuDNN wants the mask [batch, 1 | heads, q, k], not broadcast over q; and under vmap
      # (the pipeline's stages and replicas) JAX's batching rule reshapes a batched bias
      # to [vmapped x batch, heads, q, k], so there it must carry every head.
      heads = query.shape[2] if impl == "cudnn" else mask.shape[1]
      full = (query.shape[0], heads, query.shape[1], key.shape[1])
      if mask.dtype == jnp.bool_:
        boolean = jnp.broadcast_to(mask, full)
      else:
        bias = jnp.broadcast_to(jnp.maximum(mask.astype(jnp.float32), _FUSED_MASK_BIAS),
                                full).astype(dtype)
    try:
      context = jax.nn.dot_product_attention(
          query, key, value, bias, boolean, scale=1.0,
          implementation="cudnn" if impl == "cudnn" else None).astype(dtype)
    except (ValueError, NotImplementedError) as error:  # Shapes the kernel does not take.
      raise ConfigError(f"attention_impl={impl!r} cannot compute this attention (q "
                        f"{query.shape}, k {key.shape}, {jnp.dtype(dtype).name}): {error}; use "
                        "'explicit'") from error
    sow_stats(module, context, flops, [query, key])
    return context
  logits = matmul.einsum("bqhd,bkhd->bhqk", query, key).astype(dtype)
  sow_stats(module, logits, flops, [query, key])
  logits = logits.astype(jnp.float32)
  if mask is not None and mask.dtype == jnp.bool_:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  elif mask is not None:
    logits = logits + mask.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if dropout_rate > 0.0 and not deterministic:
    weights = nn.Dropout(dropout_rate, deterministic=False, parent=module)(weights)
  return matmul.einsum("bhqk,bkhd->bqhd", weights, value).astype(dtype)
