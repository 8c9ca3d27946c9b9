"""Batch normalisation with float32 statistics, for half-precision convolutional nets.

Batch statistics are reductions over every example and position of a channel: in float16
the sum of squares overflows for activations of a few hundred, and in either half format
the mean of thousands of values loses most of its digits. So, whatever the compute dtype
or precision plan, `BatchNorm` computes the batch mean and (two-pass) variance in float32,
normalises in float32, and keeps its running averages in float32 in the "batch_stats"
collection. The plan decides only the output dtype, as for `dsjax.nn.LayerNorm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.nn.layers import sow_stats
from dsjax.precision.plan import LayerPrecision

BATCH_STATS = "batch_stats"


class BatchNorm(nn.Module):
  """Normalises each channel (the last axis) over all other axes of the batch.

  Training (`use_running_average=False`) normalises with the batch's own statistics and
  updates the running averages by the momentum rule

    mean <- momentum * mean + (1 - momentum) * batch_mean
    var  <- momentum * var  + (1 - momentum) * batch_var

  where `batch_var` is the biased (divide-by-n) variance, the one used to normalise, as in
  `flax.linen.BatchNorm` (PyTorch stores the unbiased one). The update writes the
  "batch_stats" collection, so it must be mutable in training; `init` only creates the
  averages (mean 0, var 1) without updating them. Evaluation
  (`use_running_average=True`) normalises with the running averages: each example's
  output then depends on that example alone.

  Scale and bias are per-channel vectors. By default (`param_axis=None`) they are plain
  parameters, like those of `Conv` and `LayerNorm`, whose kernels carry no logical axis
  names in this codebase: a few hundred floats are cheapest replicated. Naming an axis
  (e.g. "conv_out") boxes them with `nn.with_logical_partitioning`, for sharding rules
  that split conv channels.

  Attributes:
    momentum: decay of the running averages.
    epsilon: added to the variance.
    use_scale: whether to multiply by a learned scale (initialised to ones).
    use_bias: whether to add a learned bias (initialised to zeros).
    precision: compute dtype and plan: the output is in the compute dtype unless the plan
      promotes this layer.
    param_dtype: dtype the scale and bias are created in. The running averages are
      float32 whatever it is.
    axis_name: a mapped axis (`pmap`/`shard_map`/`vmap` axis name) to average the batch
      statistics over, for cross-replica ("synchronised") batch norm. Replicas must hold
      equally many examples: the global statistics are means of per-replica means. None:
      statistics of the local batch only.
    param_axis: logical axis name of the scale and bias (see above); None: plain params.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  precision: LayerPrecision = LayerPrecision()
  param_dtype: Any = jnp.float32
  axis_name: str | None = None
  param_axis: str | None = None

  def _param(self, name: str, init: nn.initializers.Initializer, features: int) -> jax.Array:
    if self.param_axis is not None:
      init = nn.with_logical_partitioning(init, (self.param_axis,))
    return self.param(name, init, (features,), self.param_dtype)

  @nn.compact
  def __call__(self, inputs: jax.Array, *, use_running_average: bool) -> jax.Array:
    """Normalises `inputs` [..., channels].

    Args:
      inputs: activations, channels last (NHWC for images, [batch, features] for dense).
      use_running_average: True (evaluation) normalises with the running averages; False
        (training) with the batch statistics, and updates the running averages unless
        initialising.

    Returns:
      The normalised, scaled and shifted activations, same shape, in the layer dtype.
    """
    dtype = self.precision.dtype(self)
    features = inputs.shape[-1]
    reduce_axes = tuple(range(inputs.ndim - 1))
    ra_mean = self.variable(BATCH_STATS, "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable(BATCH_STATS, "var", jnp.ones, (features,), jnp.float32)
    x = inputs.astype(jnp.float32)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = jnp.mean(x, axis=reduce_axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      # Two-pass variance: E[x²] - E[x]² cancels catastrophically when |mean| >> std.
      var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var

    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self._param("scale", nn.initializers.ones_init(), features).astype(jnp.float32)
    if self.use_bias:
      y = y + self._param("bias", nn.initializers.zeros_init(), features).astype(jnp.float32)
    y = y.astype(dtype)
    sow_stats(self, y, inputs=[inputs])
    return y
