"""Pallas kernels for dsjax.

`matmul` is the FP16/BF16-in, FP32-accumulate matmul with a fused bias + activation
epilogue and a custom VJP (see the Pallas kernel issue); `tuning` holds its block-size
table and on-device autotuner. dsjax.nn layers route through it with
`--config.model.matmul_impl=pallas`.
"""

from pallas_kernels import tuning
from pallas_kernels.matmul import matmul

__all__ = ["matmul", "tuning"]
