"""Per-device memory of a step: params and optimizer state from the arrays themselves,
activations and peak from XLA's compiled memory analysis."""

from __future__ import annotations

from typing import Any

import jax


def tree_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of arrays (its addressable shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      shard = leaf.addressable_shards[0].data if leaf.addressable_shards else leaf
      total += shard.size * shard.dtype.itemsize
    elif hasattr(leaf, "nbytes"):
      total += int(leaf.nbytes)
  return total


def memory_report(compiled: Any, params: Any, opt_state: Any) -> dict[str, int]:
  """Per-device bytes: params, optimizer state, activations/temporaries, and peak.

  Args:
    compiled: the compiled train step.
    params: the (possibly sharded) parameters.
    opt_state: the optimizer state.

  Returns:
    `{"params_bytes", "opt_state_bytes", "temp_bytes", "argument_bytes", "output_bytes",
    "peak_bytes"}`; the XLA figures are 0 where the backend gives no memory analysis.
  """
  report = {"params_bytes": tree_bytes(params), "opt_state_bytes": tree_bytes(opt_state)}
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it.
    stats = None
  fields = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes",
            "output_bytes": "output_size_in_bytes", "alias_bytes": "alias_size_in_bytes"}
  for key, attr in fields.items():
    report[key] = int(getattr(stats, attr, 0) or 0)
  # Donated arguments alias outputs: count them once. Some backends (CPU) report a peak
  # without temporaries, so take the larger of the two.
  live = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
          + report["temp_bytes"])
  report["peak_bytes"] = max(int(getattr(stats, "peak_memory_in_bytes", 0) or 0), live)
  return report
