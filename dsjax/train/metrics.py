"""Metric outputs of a run: `metrics.jsonl`, TensorBoard events, JSON files.

Only process 0 writes, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np


def to_python(value: Any) -> Any:
  """Converts arrays and numpy scalars to JSON-serialisable Python values."""
  if isinstance(value, dict):
    return {key: to_python(item) for key, item in value.items()}
  if isinstance(value, list | tuple):
    return [to_python(item) for item in value]
  if isinstance(value, jax.Array | np.ndarray | np.generic):
    value = np.asarray(value)
    value = value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no inf/NaN; `skipped_steps` tells why a value is missing.
  return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
  """Writes JSON atomically (temporary file, then rename), from process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(to_python(payload), indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


class MetricWriter:
  """Appends one JSON object per logged step to `metrics.jsonl`, mirrored to TensorBoard.

  Args:
    workdir: the run's folder.
    tensorboard: also write TensorBoard event files (tensorboardX) into `workdir`.
    resume_step: the step the run restarts from. Lines a killed run logged after its last
      checkpoint are dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: Path, *, tensorboard: bool, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    if resume_step and self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if _step_of(line) is not None and _step_of(line) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    elif self.path.exists():
      self.path.unlink()
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: it pulls in protobuf.
      self._tb = SummaryWriter(str(workdir), purge_step=resume_step or None)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs scalars for `step`."""
    if not self.enabled:
      return
    record = {"step": step, **to_python(metrics)}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None
