"""Pallas kernels for dsjax.

The FP16/BF16-in, FP32-accumulate matmul with a fused epilogue lands here (see the
Pallas kernel issue); dsjax.nn layers route through it with
`--config.model.matmul_impl=pallas`.
"""
