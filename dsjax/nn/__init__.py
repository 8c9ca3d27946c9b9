"""Precision-plan-aware Flax layers and a half-residual remat policy.

The layers read one `dsjax.precision.LayerPrecision`; plans and policies live in
`dsjax.precision`.
"""

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
from dsjax.nn.remat import HALF_DTYPES, remat, save_half_residuals

__all__ = [
    "ATTENTION_IMPLS",
    "BATCH_STATS",
    "BatchNorm",
    "HALF_DTYPES",
    "MATMUL_IMPLS",
    "STATS",
    "Conv",
    "Dense",
    "Embed",
    "LayerNorm",
    "MultiHeadAttention",
    "attend",
    "matmul",
    "remat",
    "save_half_residuals",
    "sow_stats",
]
