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
    layer_precision,
    sow_stats,
)
from dsjax.nn.norm import BATCH_STATS, BatchNorm
from dsjax.nn.remat import HALF_DTYPES, remat, save_half_residuals

# Still spelled `dsnn.PrecisionPlan` and `dsnn.layer_dtype` by models/supernet.py; drop
# these two once it imports them from dsjax.precision.
from dsjax.precision.plan import PrecisionPlan, layer_dtype

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
    "PrecisionPlan",
    "attend",
    "layer_dtype",
    "layer_precision",
    "matmul",
    "remat",
    "save_half_residuals",
    "sow_stats",
]
