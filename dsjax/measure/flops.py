"""FLOPs per step from XLA's cost analysis, and model FLOPs utilisation (MFU).

FLOPs are those of the compiled per-device program, as XLA counts them (a multiply-add
is 2). MFU divides the achieved FLOP/s by the device's dense peak: a table for the
accelerators people train on, and for CPUs and unknown devices a peak measured once per
process with a large float32 matmul (so CPU MFU reads "share of what this machine's
matmul reaches", not of a datasheet figure).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device in 16-bit (bf16/fp16) and float32, from vendor datasheets
# (SXM parts; no sparsity). Matched by substring of `device.device_kind`, first match wins.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 67e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("TPU v5p", 459e12, 459e12 / 2),
    ("TPU v5 lite", 197e12, 197e12 / 2),
    ("TPU v5e", 197e12, 197e12 / 2),
    ("TPU v4", 275e12, 275e12 / 2),
)


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one call of a compiled program (`jax.jit(f).lower(...).compile()`).

  Returns:
    XLA's `flops` estimate, or 0.0 where the backend gives no cost analysis.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it.
    return 0.0
  if isinstance(analysis, list | tuple):  # Older jax returned one dict per program.
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


@functools.cache
def measured_peak_flops(size: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of the default device, measured once per process."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def device_peak_flops(half_precision: bool = True, device: Any = None) -> tuple[float, str]:
  """Dense peak FLOP/s of a device, and where the figure comes from.

  Args:
    half_precision: the bf16/fp16 peak (else float32).
    device: a jax device; the first default device when None.

  Returns:
    `(peak_flops, source)`; source is "table:<kind>" or "measured:float32-matmul".
  """
  device = device or jax.devices()[0]
  for kind, half_peak, fp32_peak in PEAK_FLOPS:
    if kind.lower() in device.device_kind.lower():
      return (half_peak if half_precision else fp32_peak), f"table:{kind}"
  return measured_peak_flops(), "measured:float32-matmul"


def transformer_flops_per_token(*, num_layers: int, hidden: int, mlp_dim: int, seq_len: int,
                                vocab_size: int, head_hidden: int | None = None) -> float:
  """Forward matmul FLOPs per token of a (BERT-style) transformer encoder with an LM head.

  Counts what MaxText and the PaLM appendix count: 2 FLOPs per multiply-add of every
  matmul (Q/K/V/output projections 4·H², MLP 2·H·F, attention scores and values 2·S·H per
  layer; the head's dense H² plus the vocabulary projection H·V). Elementwise work
  (softmax, LayerNorm, GELU) and embedding lookups are not matmuls and are left out.

  Args:
    num_layers: L.
    hidden: H.
    mlp_dim: F.
    seq_len: S (attention is bidirectional: every query sees every key).
    vocab_size: V.
    head_hidden: width of the LM head's transform dense; None: H.

  Returns:
    Forward FLOPs per token; a training step costs 3x (backward = 2x forward).
  """
  head_hidden = hidden if head_hidden is None else head_hidden
  per_layer = 2 * (4 * hidden * hidden + 2 * hidden * mlp_dim) + 2 * 2 * seq_len * hidden
  head = 2 * (hidden * head_hidden + head_hidden * vocab_size)
  return float(num_layers * per_layer + head)


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
  """Model FLOPs utilisation of one device: achieved FLOP/s over the peak.

  Args:
    flops_per_step: FLOPs of the per-device program for one step.
    step_seconds: wall time of one step.
    peak_flops: the device's peak FLOP/s.

  Returns:
    The utilisation (0 when any input is missing).
  """
  if flops_per_step <= 0 or step_seconds <= 0 or peak_flops <= 0:
    return 0.0
  return flops_per_step / step_seconds / peak_flops
