"""Shared benchmark harness: warm-up, repeats, median/min, and the run's environment.

Every `scripts/bench_*.py` times with `time_steps` and writes JSON with `save_result`,
so figures from different scripts and machines compare like for like.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax


def environment() -> dict[str, Any]:
  """Device, software versions and commit of the run."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
  except OSError:
    commit = ""
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "python": platform.python_version(), "machine": platform.machine(),
          "processor": platform.processor() or platform.machine(), "commit": commit}


def time_steps(step: Callable[[], Any], *, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
  """Times `step()` (which must return something to block on) after `warmup` calls.

  Returns:
    `{"median_s", "min_s", "mean_s", "repeats"}` per call.
  """
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times),
          "mean_s": statistics.fmean(times), "repeats": repeats}


def save_result(path: str | Path, name: str, results: Any) -> Path:
  """Writes `{"benchmark": name, "environment": ..., "results": ...}` as JSON."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"benchmark": name, "environment": environment(), "results": results}
  path.write_text(json.dumps(payload, indent=2) + "\n")
  return path
