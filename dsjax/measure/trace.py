"""Where device time goes, read from a `jax.profiler` trace.

The trace (`.xplane.pb`) records one event per executed XLA instruction, named after it
("all-reduce", "fusion.3", "all-gather-start.1", ...), on the device planes (GPU/TPU) or the
CPU client's threads. `communication_share` is the time in collective instructions over
the time in all instructions; with async collectives overlapped by compute it overstates
what the step waits for (a collective hidden behind compute costs no step time).
`op_breakdown` ranks programs, instructions and kernels by device time: the first thing
to read when MFU is low.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from dsjax.measure.hlo import COLLECTIVE_KINDS

# HLO instruction names: lowercase words with - or _, an optional .N suffix.
_INSTRUCTION = re.compile(r"^%?[a-z][a-z0-9_\-]*(\.\d+)*$")
_COLLECTIVE = re.compile(r"^%?(" + "|".join(COLLECTIVE_KINDS) + r"|nccl)", re.IGNORECASE)
# Kernel (or CPU instruction) names by what they do: library/Triton matmuls, copies and
# slice updates (scan stacking, layout changes), and everything else (fused elementwise
# and reduction kernels, mostly memory-bound).
_KERNEL_CLASSES = (
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|cudnn|^dot|ynn_fusion|conv(?!ert)",
                          re.I)),
    ("copy", re.compile(r"memcpy|memset|dynamic.update.slice|dynamic.slice|^copy", re.I)),
)

# On CPU, the threads that run compiled programs (others trace, compile or run Python).
_HOST_XLA_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")


def newest_trace(trace_dir: str | Path) -> Path | None:
  """The newest `.xplane.pb` under `trace_dir`, or None."""
  files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  return files[-1] if files else None


@functools.lru_cache(maxsize=1)
def _read(path: str, mtime: float) -> Any:
  """The parsed trace; cached so that the several readings of one report parse it once."""
  import jax  # noqa: PLC0415 - only traces need it.

  del mtime  # Part of the cache key only: a rewritten file is read again.
  return jax.profiler.ProfileData.from_file(path)


def _xla_lines(trace_dir: str | Path) -> tuple[list[Any], bool] | None:
  """The trace lines that record compiled programs, and whether they are host (CPU)
  threads rather than device planes' lines; None if the folder holds no trace."""
  path = newest_trace(trace_dir)
  if path is None:
    return None
  data = _read(str(path), path.stat().st_mtime)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if planes:
    return [line for plane in planes for line in plane.lines], False
  return [line for plane in data.planes if plane.name.startswith("/host:CPU")
          for line in plane.lines if line.name.startswith(_HOST_XLA_THREADS)], True


def communication_share(trace_dir: str | Path) -> dict[str, Any]:
  """Time in collective instructions against time in all XLA instructions of a trace.

  Args:
    trace_dir: the folder `jax.profiler.trace` wrote.

  Returns:
    `{"collective_s", "instruction_s", "share", "by_kind": {kind: seconds}}`; empty if the
    folder holds no trace or the trace has no instruction events.
  """
  lines = _xla_lines(trace_dir)
  if lines is None:
    return {}
  total = 0.0
  by_kind = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
  for line in lines[0]:
    for event in line.events:
      name = event.name
      if not _INSTRUCTION.match(name) and not name.lower().startswith("nccl"):
        continue
      seconds = event.duration_ns * 1e-9
      total += seconds
      if _COLLECTIVE.match(name):
        kind = next((k for k in COLLECTIVE_KINDS if name.lstrip("%").startswith(k)),
                    "all-reduce")  # NCCL kernels: counted with the reductions.
        by_kind[kind] += seconds
  if total == 0:
    return {}
  collective = sum(by_kind.values())
  return {"collective_s": collective, "instruction_s": total, "share": collective / total,
          "by_kind": by_kind}


def _stats(event: Any) -> dict[str, str]:
  out = {}
  for name, value in event.stats:
    if name in ("hlo_op", "long_name", "hlo_category", "tf_op", "kernel_details", "flops",
                "bytes_accessed", "theoretical_flops"):
      out[name] = str(value)[:300]
  return out


def _ranked(totals: dict[str, list], total_s: float, top: int) -> list[dict[str, Any]]:
  rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
  return [{"name": name, "count": count, "seconds": seconds,
           "share": seconds / total_s if total_s else 0.0, **stats}
          for name, (count, seconds, stats) in rows]


def _add(totals: dict[str, list], name: str, seconds: float, event: Any) -> None:
  row = totals.setdefault(name, [0, 0.0, None])
  row[0] += 1
  row[1] += seconds
  if row[2] is None:
    row[2] = _stats(event)


def kernel_class(name: str) -> str:
  """"matmul", "copy" or "other" for a kernel or instruction name (see `op_breakdown`)."""
  return next((kind for kind, pattern in _KERNEL_CLASSES if pattern.search(name)), "other")


def op_breakdown(trace_dir: str | Path, top: int = 25) -> dict[str, Any]:
  """Device time by compiled program, XLA instruction and kernel, from a trace.

  GPU planes carry three views of the same time: "XLA Modules" (one event per program
  run), "XLA Ops" (one per HLO instruction) and the stream lines (one per CUDA kernel,
  named by the library or fusion that launched it: cuBLAS/cuDNN gemms show here by their
  kernel names, e.g. `sm90_xmma_gemm_f16f16...`). Where a jax version records no "XLA
  Ops" line, instructions are read from the kernels' `hlo_op` stat. On CPU only
  instructions are recorded.

  Args:
    trace_dir: the folder `jax.profiler.trace` wrote.
    top: rows kept in each ranking.

  Returns:
    `{"modules": [...], "ops": [...], "op_kinds": [...], "kernels": [...], "op_seconds",
    "kernel_seconds"}`; each ranking's rows are `{"name", "count", "seconds", "share"}`
    plus the first event's descriptive stats (`long_name`, `hlo_category`, ...).
    `op_kinds` groups instructions by name without the `.N` suffix; `classes` splits the
    kernel (or, on CPU, instruction) seconds into "matmul", "copy" and "other". Empty if
    the folder holds no trace.
  """
  found = _xla_lines(trace_dir)
  if found is None:
    return {}
  lines, on_host = found
  modules: dict[str, list] = {}
  ops: dict[str, list] = {}
  kinds: dict[str, list] = {}
  kernels: dict[str, list] = {}
  kernel_ops: dict[str, list] = {}
  for line in lines:
    if line.name == "XLA Modules":
      for event in line.events:
        _add(modules, event.name, event.duration_ns * 1e-9, event)
      continue
    is_ops = line.name == "XLA Ops" or on_host
    for event in line.events:
      seconds = event.duration_ns * 1e-9
      if is_ops:
        if not _INSTRUCTION.match(event.name):
          continue
        _add(ops, event.name.lstrip("%"), seconds, event)
        _add(kinds, re.sub(r"(\.\d+)+$", "", event.name.lstrip("%")), seconds, event)
      elif not line.name.startswith(("XLA", "Steps", "Framework", "Source")):
        _add(kernels, event.name, seconds, event)
        hlo_op = next((str(v) for k, v in event.stats if k == "hlo_op"), None)
        if hlo_op:  # Instructions seen through their kernels (no "XLA Ops" line).
          _add(kernel_ops, hlo_op, seconds, event)
  if not ops:
    ops = kernel_ops
    for name, (count, seconds, stats) in kernel_ops.items():
      row = kinds.setdefault(re.sub(r"(\.\d+)+$", "", name), [0, 0.0, stats])
      row[0] += count
      row[1] += seconds
  classes = dict.fromkeys(["matmul", "copy", "other"], 0.0)
  for name, (_, seconds, _) in (kernels or ops).items():
    classes[kernel_class(name)] += seconds
  op_seconds = float(np.sum([row[1] for row in ops.values()]))
  kernel_seconds = float(np.sum([row[1] for row in kernels.values()]))
  module_seconds = float(np.sum([row[1] for row in modules.values()]))
  return {"modules": _ranked(modules, module_seconds, top),
          "ops": _ranked(ops, op_seconds, top), "op_kinds": _ranked(kinds, op_seconds, top),
          "kernels": _ranked(kernels, kernel_seconds, top), "op_seconds": op_seconds,
          "kernel_seconds": kernel_seconds, "module_seconds": module_seconds,
          "classes": classes}

