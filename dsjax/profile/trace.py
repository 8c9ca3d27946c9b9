"""Communication's share of device time, read from a `jax.profiler` trace.

The trace (`.xplane.pb`) records one event per executed XLA instruction, named after it
("all-reduce", "fusion.3", "all-gather-start.1", ...), on the device planes (GPU/TPU) or the
CPU client's threads. The share is the time in collective instructions over the time in
all instructions; with async collectives overlapped by compute it overstates what the step
waits for (a collective hidden behind compute costs no step time).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dsjax.profile.hlo import COLLECTIVE_KINDS

# HLO instruction names: lowercase words with - or _, an optional .N suffix.
_INSTRUCTION = re.compile(r"^%?[a-z][a-z0-9_\-]*(\.\d+)*$")
_COLLECTIVE = re.compile(r"^%?(" + "|".join(COLLECTIVE_KINDS) + r"|nccl)", re.IGNORECASE)


def newest_trace(trace_dir: str | Path) -> Path | None:
  """The newest `.xplane.pb` under `trace_dir`, or None."""
  files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  return files[-1] if files else None


def communication_share(trace_dir: str | Path) -> dict[str, Any]:
  """Time in collective instructions against time in all XLA instructions of a trace.

  Args:
    trace_dir: the folder `jax.profiler.trace` wrote.

  Returns:
    `{"collective_s", "instruction_s", "share", "by_kind": {kind: seconds}}`; empty if the
    folder holds no trace or the trace has no instruction events.
  """
  import jax  # noqa: PLC0415 - only traces need it.

  path = newest_trace(trace_dir)
  if path is None:
    return {}
  data = jax.profiler.ProfileData.from_file(str(path))
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  planes = planes or [p for p in data.planes if p.name.startswith("/host:CPU")]
  total = 0.0
  by_kind = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        if not _INSTRUCTION.match(name) and not name.lower().startswith("nccl"):
          continue
        seconds = event.duration_ns * 1e-9
        total += seconds
        match = _COLLECTIVE.match(name)
        if match:
          kind = next((k for k in COLLECTIVE_KINDS if name.lstrip("%").startswith(k)),
                      "all-reduce")  # NCCL kernels: counted with the reductions.
          by_kind[kind] += seconds
  if total == 0:
    return {}
  collective = sum(by_kind.values())
  return {"collective_s": collective, "instruction_s": total, "share": collective / total,
          "by_kind": by_kind}
