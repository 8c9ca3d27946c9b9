"""Precision-plan-aware Flax layers, the precision plan, and a half-residual remat policy."""

from dsjax.nn import matmul
from dsjax.nn.layers import (
    ATTENTION_IMPLS,
    MATMUL_IMPLS,
    STATS,
    Conv,
    Dense,
    Embed,
    LayerNorm,
    MultiHeadAttention,
    attend,
    sow_stats,
)
from dsjax.nn.norm import BATCH_STATS, BatchNorm
from dsjax.nn.plan import CHOICES, FP32, HALF, PrecisionPlan, layer_dtype, module_path
from dsjax.nn.remat import HALF_DTYPES, remat, save_half_residuals

__all__ = [
    "ATTENTION_IMPLS",
    "BATCH_STATS",
    "BatchNorm",
    "CHOICES",
    "FP32",
    "HALF",
    "HALF_DTYPES",
    "MATMUL_IMPLS",
    "STATS",
    "Conv",
    "Dense",
    "Embed",
    "LayerNorm",
    "MultiHeadAttention",
    "PrecisionPlan",
    "attend",
    "layer_dtype",
    "matmul",
    "module_path",
    "remat",
    "save_half_residuals",
    "sow_stats",
]
