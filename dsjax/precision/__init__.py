"""Precision: dtype policies, presets and loss scaling.

Master weights and optimizer state stay float32 under every preset; only the forward
and backward computation changes dtype. `mixed` is float16 compute where float16 is fast
(GPUs) and bfloat16 elsewhere (TPUs, CPUs), where float16 is emulated or unsupported.
Float16 compute needs a dynamic loss scale (see `loss_scale`); the other presets get a
no-op one with the same interface.
"""

from __future__ import annotations

import jax.numpy as jnp

from dsjax.precision.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    all_finite,
    dynamic_loss_scale,
    loss_scale_for,
    select_tree,
)
from dsjax.precision.policy import PRESETS, Policy, get_policy, needs_loss_scaling, parse_policy

__all__ = [
    "PRESETS", "DynamicLossScale", "LossScale", "NoOpLossScale", "Policy", "all_finite",
    "compute_dtype", "dynamic_loss_scale", "get_policy", "loss_scale_for",
    "needs_loss_scaling", "parse_policy", "select_tree",
]


def compute_dtype(preset: str, platform: str | None = None) -> jnp.dtype:
  """Returns the compute dtype of a precision preset on a platform.

  Args:
    preset: one of PRESETS.
    platform: `cpu`, `gpu` or `tpu`; the default backend when None.

  Returns:
    The dtype activations and matmul inputs use.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown precision {preset!r}; known: {', '.join(PRESETS)}")
  return get_policy(preset, platform).compute_dtype
