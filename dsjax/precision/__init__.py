"""Precision: dtype policies, presets, per-layer plans, loss scaling and the controller.

The four rooms of precision: a `Policy` (`policy`) says which dtype parameters are
stored, computed and returned in; a `PrecisionPlan` (`plan`) promotes single layers to
float32, and `LayerPrecision` carries the compute dtype and plan from a model to its
layers; a loss scale (`loss_scale`) keeps float16 gradients in range; the adaptive
controller (`adaptive`) rewrites the plan from the layers' statistics. Numeric formats
(`quantize`) simulate a layer's float or integer format and give its bit-ops and bytes.

Every preset keeps float32 master weights and outputs; only the forward and backward
computation changes dtype. `mixed` is float16 compute where float16 is fast (GPUs) and
bfloat16 elsewhere (TPUs, CPUs), where float16 is emulated or unsupported, with the
adaptive controller on. A policy string may also store bfloat16 master weights
(`p=bf16`); `check_policy` refuses what no run can honour. Float16 compute needs a dynamic
loss scale; the other policies get a no-op one with the same interface.
"""

from __future__ import annotations

import jax.numpy as jnp

from dsjax.precision.adaptive import PrecisionController, controller_enabled
from dsjax.precision.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    all_finite,
    dynamic_loss_scale,
    loss_scale_for,
    select_tree,
)
from dsjax.precision.plan import (
    CHOICES,
    FP32,
    HALF,
    LayerPrecision,
    PrecisionPlan,
    layer_dtype,
    module_path,
)
from dsjax.precision.policy import (
    PRESETS,
    Policy,
    Preset,
    check_policy,
    get_policy,
    get_preset,
    needs_loss_scaling,
    parse_policy,
)
from dsjax.precision.quantize import (
    FORMATS,
    NumericFormat,
    apply_format,
    bit_ops,
    expected_bit_ops,
    expected_bits,
    fake_quant,
    get_format,
    model_bytes,
)

__all__ = [
    "CHOICES", "FP32", "HALF", "PRESETS", "DynamicLossScale", "LayerPrecision", "LossScale",
    "NoOpLossScale", "Policy", "PrecisionController", "PrecisionPlan", "Preset", "all_finite",
    "check_policy", "compute_dtype", "controller_enabled", "dynamic_loss_scale", "get_policy",
    "get_preset", "layer_dtype", "loss_scale_for", "module_path", "needs_loss_scaling",
    "parse_policy", "select_tree",
    # Numeric formats (quantize).
    "FORMATS", "NumericFormat", "apply_format", "bit_ops", "expected_bit_ops", "expected_bits",
    "fake_quant", "get_format", "model_bytes",
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
