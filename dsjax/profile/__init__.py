"""Profiling: FLOPs and MFU from XLA's cost analysis, collective bytes from the compiled
HLO, and memory from the compiled memory analysis."""

from dsjax.profile.flops import (
    compiled_flops,
    device_peak_flops,
    measured_peak_flops,
    mfu,
    transformer_flops_per_token,
)
from dsjax.profile.hlo import COLLECTIVE_KINDS, collective_bytes
from dsjax.profile.memory import memory_report, tree_bytes

__all__ = ["COLLECTIVE_KINDS", "collective_bytes", "compiled_flops", "device_peak_flops",
           "measured_peak_flops", "memory_report", "mfu", "transformer_flops_per_token",
           "tree_bytes"]
