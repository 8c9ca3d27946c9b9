"""Precision presets: which dtype the model computes in.

Master weights and optimizer state stay float32 under every preset; only the forward
and backward computation changes dtype. `mixed` is float16 compute where float16 is fast
(GPUs) and bfloat16 elsewhere (TPUs, CPUs), where float16 is emulated or unsupported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRESETS = ("fp32", "bf16", "fp16", "mixed")


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
  platform = platform or jax.default_backend()
  if preset == "mixed":
    return jnp.dtype(jnp.float16 if platform == "gpu" else jnp.bfloat16)
  return jnp.dtype({"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[preset])
