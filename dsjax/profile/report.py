"""`dsjax-profile`: run a short job, then name its bottleneck and what to try.

The job is an ordinary `train_and_evaluate` run that logs every step; the report reads
its metrics.jsonl (the step-time breakdown, MFU, loss-scale skips) and summary.json
(FLOPs, memory, collective bytes of the compiled step) and ranks what holds it back.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import ml_collections

from dsjax.measure import trace as trace_lib
from dsjax.train import train_and_evaluate
from dsjax.train.metrics import write_json

# A share of step time above which a cost is reported as a bottleneck.
_THRESHOLDS = {"data": 0.10, "host": 0.20}
_LOW_MFU = 0.30


def _median(records: list[dict[str, Any]], key: str) -> float:
  values = [r[key] for r in records if isinstance(r.get(key), int | float)]
  return statistics.median(values) if values else 0.0


def analyse(records: list[dict[str, Any]], summary: dict[str, Any],
            communication: dict[str, Any] | None = None) -> dict[str, Any]:
  """Ranks the bottlenecks of a run.

  Args:
    records: metrics.jsonl records (the first, which includes warm-up, is dropped if
      there are others).
    summary: the run's summary.json.
    communication: `trace.communication_share` of a trace of the run, if one was taken:
      then collectives rank by their measured share of device time.

  Returns:
    `{"step_ms", "breakdown": {...shares}, "mfu", "collective_bytes", "memory",
    "findings": [{"kind", "share", "message"}, ...]}` with findings most severe first.
  """
  steady = records[1:] if len(records) > 1 else records
  step_ms = _median(steady, "step_ms")
  shares = {part: (_median(steady, f"{part}_ms") / step_ms if step_ms else 0.0)
            for part in ("data_wait", "host", "device")}
  mfu = _median(steady, "mfu")
  collectives = summary.get("collective_bytes", {})
  findings = []
  if shares["data_wait"] > _THRESHOLDS["data"]:
    findings.append({"kind": "data", "share": shares["data_wait"], "message": (
        f"data loader waits {shares['data_wait']:.0%} of the step: prefetch batches in a "
        "background thread, move preprocessing out of the loop, or cache decoded data")})
  if shares["host"] > _THRESHOLDS["host"]:
    findings.append({"kind": "host", "share": shares["host"], "message": (
        f"host dispatch takes {shares['host']:.0%} of the step: the device idles between "
        "small steps; raise --batch-size (with --gradient-accumulation to keep memory)")})
  total_collective = collectives.get("total", 0.0)
  if total_collective > 0:
    kind = max((k for k in collectives if k != "total"), key=lambda k: collectives[k])
    measured = (communication or {}).get("share")
    findings.append({"kind": "communication", "share": measured, "message": (
        f"{kind} moves {collectives[kind] / 1e6:.1f} MB per step"
        + (f" ({measured:.0%} of device time)" if measured is not None else "")
        + ": fewer, larger steps (--gradient-accumulation), --grad-compression topk:0.01 "
        "or compute/communication overlap")})
  skipped = max((r.get("skipped_steps") or 0 for r in records), default=0)
  if skipped:
    findings.append({"kind": "loss_scale", "share": skipped / max(len(records), 1), "message": (
        f"{skipped} steps skipped on non-finite gradients: lower "
        "precision.loss_scale.initial_scale or use --precision mixed (adaptive plan)")})
  if 0 < mfu < _LOW_MFU:
    findings.append({"kind": "compute", "share": shares["device"], "message": (
        f"device time dominates at MFU {mfu:.1%}: try --precision mixed or a larger "
        "batch so the matmuls fill the device")})
  findings.sort(key=lambda f: -(f["share"] if f["share"] is not None else 0.5))
  return {"step_ms": step_ms, "breakdown": shares, "mfu": mfu,
          "tflops_per_device": _median(steady, "tflops_per_device"),
          "flops_per_step": summary.get("flops_per_step", 0.0),
          "collective_bytes": collectives, "memory": summary.get("memory", {}),
          "communication": communication or {}, "findings": findings}


def format_report(report: dict[str, Any]) -> str:
  """The report as a readable table."""
  shares = report["breakdown"]
  lines = [
      f"step time        {report['step_ms']:.2f} ms  (data {shares['data_wait']:.0%}, "
      f"host {shares['host']:.0%}, device {shares['device']:.0%})",
      f"throughput       {report['tflops_per_device']:.4f} TFLOP/s per device, "
      f"MFU {report['mfu']:.1%}",
      f"FLOPs per step   {report['flops_per_step']:.3e}",
  ]
  memory = report["memory"]
  if memory:
    lines.append(f"memory/device    params {memory['params_bytes'] / 1e6:.2f} MB, optimizer "
                 f"{memory['opt_state_bytes'] / 1e6:.2f} MB, temporaries "
                 f"{memory['temp_bytes'] / 1e6:.2f} MB, peak {memory['peak_bytes'] / 1e6:.2f} MB")
  moved = {k: v for k, v in report["collective_bytes"].items() if k != "total" and v}
  lines.append("collectives      " + (", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in moved.items())
                                      or "none"))
  communication = report.get("communication") or {}
  if communication:
    lines.append(f"communication    {100 * communication['share']:.1f}% of XLA instruction "
                 "time in collectives (from the trace)")
  if report.get("device_time"):
    lines.append(format_breakdown(report["device_time"]))
  if report["findings"]:
    lines.append(f"top bottleneck   {report['findings'][0]['message']}")
    lines += [f"  also: {f['message']}" for f in report["findings"][1:]]
  else:
    lines.append("top bottleneck   none found above the thresholds")
  return "\n".join(lines)


def format_breakdown(breakdown: dict[str, Any], rows: int = 12) -> str:
  """The rankings of `dsjax.measure.trace.op_breakdown` as text tables."""
  lines = []
  classes = breakdown.get("classes") or {}
  total = sum(classes.values())
  if total:
    lines.append("device time      " + ", ".join(
        f"{kind} {100 * seconds / total:.0f}%" for kind, seconds in classes.items()))
  for key, title in (("modules", "programs"), ("op_kinds", "instruction kinds"),
                     ("ops", "instructions"), ("kernels", "kernels")):
    ranked = breakdown.get(key) or []
    if not ranked:
      continue
    lines.append(f"{title} by device time:")
    for row in ranked[:rows]:
      detail = row.get("long_name") or row.get("hlo_category") or ""
      lines.append(f"  {100 * row['share']:5.1f}%  {row['seconds'] * 1e3:9.2f} ms  "
                   f"x{row['count']:<5d} {row['name'][:60]}  {detail[:90]}")
  return "\n".join(lines)


def run_profile(config: ml_collections.ConfigDict, workdir: str | Path, *, steps: int,
                trace: bool = False) -> dict[str, Any]:
  """Runs `steps` training steps logging every step, and writes `workdir/profile.json`.

  Args:
    config: the run's config (its step count and logging cadence are overridden).
    workdir: a fresh folder for the short run.
    steps: how many steps to profile.
    trace: also write a jax.profiler trace to `workdir/trace` (TensorBoard/Perfetto).

  Returns:
    The report (see `analyse`).
  """
  workdir = Path(workdir).absolute()
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.steps = steps
  config.train.log_every_steps = 1
  config.train.eval_every_steps = steps
  config.checkpoint.every_steps = steps
  if trace:  # The steady steps only: compilation and autotuning would swamp them.
    config.logging.trace_dir = str(workdir / "trace")
    config.logging.trace_after_steps = min(config.logging.trace_after_steps, steps - 1)
  summary = train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  communication = trace_lib.communication_share(workdir / "trace") if trace else None
  report = analyse(records, summary, communication)
  if trace:
    report["device_time"] = trace_lib.op_breakdown(workdir / "trace")
  write_json(workdir / "profile.json", report)
  return report
