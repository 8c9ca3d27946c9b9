"""Multi-host for real: two local processes join through `jax.distributed` (gloo CPU
collectives) and train the same run as one 8-device process; the two-process checkpoint
restores in one process on another mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/digits_cnn.py:tiny", "--steps", "3", "--batch-size", "32",
        "--config.optimizer.name=sgd", "--config.logging.tensorboard=False",
        "--config.train.eval_every_steps=3", "--config.checkpoint.every_steps=3"]


def _env(devices: int) -> dict[str, str]:
  # conftest's fast-compile flags, with this process's own device count.
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _train(*args: str, devices: int) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dsjax.train", *ARGS, *args], cwd=REPO,
                        env=_env(devices), capture_output=True, text=True, timeout=300)


def _losses(workdir: Path) -> dict[int, float]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {record["step"]: record["loss"] for record in records}


@pytest.mark.slow
def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
  single = _train("--mesh", "data=4,model=2", "--workdir", str(tmp_path / "one"), devices=8)
  assert single.returncode == 0, single.stderr[-2000:]

  port = _free_port()
  workdir = tmp_path / "two"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "dsjax.train", *ARGS, "--mesh", "data=4,model=2",
       "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", str(index)],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for index in range(2)]
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-2000:]
  # Process 0 alone wrote the logs and the summary (one line per logged step).
  two = _losses(workdir)
  assert sorted(two) == [1, 2, 3]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["mesh"]["data"] == 4
  # Same global batches, same math; only the cross-process reduction order differs.
  one = _losses(tmp_path / "one")
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  single_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
  np.testing.assert_allclose(summary["test_loss"], single_summary["test_loss"], rtol=1e-5)

  # The two-process checkpoint, restored by one process onto an FSDP mesh, trains on.
  resumed = _train("--mesh", "fsdp=8", "--steps", "4", "--workdir", str(workdir), devices=8)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step 3" in resumed.stderr
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  assert (workdir / "checkpoints" / "4").is_dir()
