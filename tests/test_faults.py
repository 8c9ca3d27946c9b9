"""Faults of multi-process runs: a process killed mid-training (SIGKILL) ends the others
within the peer timeout, each with one line naming it, and rerunning the whole job
resumes from the last complete checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_checkpoint import final_state
from test_multihost import REPO, _env, _free_port

from dsjax.configs import digits_cnn
from dsjax.errors import ConfigError
from dsjax.parallel import distributed, watchdog
from dsjax.train import train_and_evaluate

STEPS, EVERY, SEED = 40, 10, 3
ARGS = ["--config", "configs/digits_cnn.py:tiny", "--steps", str(STEPS), "--batch-size", "16",
        "--seed", str(SEED), "--mesh", "data=2", "--config.optimizer.name=sgd",
        "--config.logging.tensorboard=False", "--config.logging.progress_bar=False",
        f"--config.train.eval_every_steps={STEPS}", f"--config.train.log_every_steps={EVERY}",
        f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.max_to_keep=10",
        "--config.distributed.peer_timeout_s=3"]
PARTIAL = ".orbax-checkpoint-tmp"

# What JAX 0.10's coordination client writes as it ends a process: on process 0 when
# process 1 stopped, and on process 1 when process 0 (and the service with it) did.
WORKER_STOPPED = (
    "E1203 13:35:58.335075   16284 coordination_service.cc:1549] [8440196599962597381] Use "
    "error polling to propagate the following error to all tasks: UNAVAILABLE: The following "
    "tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n"
    "E1203 13:35:58.335902   16295 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).\n"
    "F1203 13:35:58.336065   16295 client.h:80] Terminating process because the JAX "
    "distributed service detected fatal errors. This most likely indicates that another task "
    "died; absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
    "heartbeats):\n1\nThe tasks have crashed.\n")
COORDINATOR_STOPPED = (
    "F1203 13:28:57.673003   12269 client.h:80] Terminating process because the JAX "
    "distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC "
    "to coordination service. Either the leader task was preempted/died/restarted "
    "unexpectedly or this task is experiencing network issues.\nAdditional GRPC error "
    "information from remote target coordination_service while calling "
    "/xla.coordination.CoordinationService/PollForError:\n:UNKNOWN:Error received from peer "
    '{grpc_status:14, grpc_message:"Socket closed"}\n')
# A process whose watchdog sees native records; argv[1]: "fatal" or "exit".
FAKE_PROCESS = f"""
import os, sys, time
from dsjax.parallel import watchdog
watchdog._CAPTURE_S, watchdog.program = 0.3, "dsjax-test"
watchdog.install(1, 2, 3)
os.write(2, b"native line\\n")
print("python line", file=sys.stderr)
os.write(2, b"W1203 13:36:31.886648   16598 preemption_sync_manager.cc:147] held, then shown\\n")
time.sleep(1)
if sys.argv[1] == "fatal":
  os.write(2, {COORDINATOR_STOPPED.encode()!r})
  time.sleep(5)
"""


def test_the_stopped_process_is_named():
  assert watchdog.stopped_processes(WORKER_STOPPED, 0) == [1]
  assert watchdog.stopped_processes(COORDINATOR_STOPPED, 1) == [0]
  assert watchdog.stopped_processes("UNAVAILABLE: Task 2 heartbeat timeout.", 0) == [2]
  assert watchdog.stopped_processes("INTERNAL: something else", 0) == []
  line = watchdog.message([0], 1, 2)
  assert line.startswith("dsjax: error: process 0 of 2 (the coordinator) stopped responding")
  assert "Rerun the whole job" in line and "\n" not in line
  assert watchdog.message([], 1, 4).startswith(
      "dsjax: error: another process of this 4-process run stopped")


@pytest.mark.parametrize("ending", ["fatal", "exit"])
def test_the_watchdog_replaces_the_fatal_log_with_one_line(ending):
  run = subprocess.run([sys.executable, "-c", FAKE_PROCESS, ending], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  lines = run.stderr.splitlines()
  # Native and Python output pass (Python's directly, so either may come first); a
  # coordination record that no fatal one follows is shown after a while.
  assert sorted(lines[:2]) == ["native line", "python line"], run.stderr
  assert lines[2] == ("W1203 13:36:31.886648   16598 preemption_sync_manager.cc:147] held, "
                      "then shown")
  if ending == "fatal":
    assert run.returncode == watchdog.EXIT_STATUS
    assert lines[3:] == [watchdog.message([0], 1, 2).replace("dsjax:", "dsjax-test:")]
  else:
    assert run.returncode == 0 and len(lines) == 3


def test_a_bad_peer_timeout_is_refused_before_joining():
  cfg = ml_collections.ConfigDict(dict(coordinator="127.0.0.1:1", num_processes=2,
                                       process_id=0, initialization_timeout=1,
                                       peer_timeout_s=0, cluster_detection=False))
  with pytest.raises(ConfigError, match="distributed.peer_timeout_s must be"):
    distributed.initialize(cfg)


def _start(workdir: Path) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "dsjax.train", *ARGS, "--workdir", str(workdir),
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index)],
      cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for index in range(2)]


def _steps(checkpoints: Path) -> tuple[set[int], set[str]]:
  """The complete checkpoints' steps, and the partial (temporary) folders."""
  names = [entry.name for entry in checkpoints.iterdir()] if checkpoints.is_dir() else []
  return {int(name) for name in names if name.isdigit()}, {n for n in names if PARTIAL in n}


def _kill_in_a_save(procs: list[subprocess.Popen], victim: int, checkpoints: Path) -> float:
  """SIGKILLs `procs[victim]` once this invocation wrote a checkpoint, while it writes the
  next one (or once that one is complete); returns the time of the kill."""
  before = max(_steps(checkpoints)[0], default=0)
  deadline = time.monotonic() + 120
  while max(_steps(checkpoints)[0], default=0) <= before:
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.002)
  first = max(_steps(checkpoints)[0])
  while True:
    complete, partial = _steps(checkpoints)
    if partial or max(complete) > first or time.monotonic() > deadline:
      break
    time.sleep(0.001)
  procs[victim].send_signal(signal.SIGKILL)
  return time.monotonic()


def _reference_config() -> ml_collections.ConfigDict:
  """ARGS as a config: the same run in one process, on two of its devices."""
  config = digits_cnn.get_config("tiny")
  config.seed, config.train.steps, config.train.batch_size = SEED, STEPS, 16
  config.mesh.data, config.mesh.num_devices = 2, 2
  config.optimizer.name = "sgd"
  config.logging.tensorboard = config.logging.progress_bar = False
  config.train.eval_every_steps, config.train.log_every_steps = STEPS, EVERY
  config.checkpoint.every_steps, config.checkpoint.max_to_keep = EVERY, 10
  return config


@pytest.mark.slow
def test_a_killed_process_ends_the_others_and_the_job_resumes(tmp_path):
  train_and_evaluate(_reference_config(), tmp_path / "one")

  workdir = tmp_path / "two"
  checkpoints = workdir / "checkpoints"
  left_partial = False
  resume_step = None
  for victim in (1, 0):  # A worker, then the coordinator (it hosts JAX's service).
    procs = _start(workdir)
    killed_at = _kill_in_a_save(procs, victim, checkpoints)
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=90)
    elapsed = time.monotonic() - killed_at
    procs[victim].communicate()
    assert survivor.returncode == watchdog.EXIT_STATUS, err[-3000:]
    assert elapsed < 60
    if resume_step is not None:
      assert f"resuming from step {resume_step}" in err
    # One line says which process stopped and what to do; no traceback, no absl records.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"dsjax-train: error: process {victim} of 2 "), errors
    assert "Rerun the whole job" in errors[0]
    assert "Traceback" not in err and not re.search(r"^[WEF]\d{4} ", err, re.MULTILINE), err
    complete, partial = _steps(checkpoints)
    left_partial |= bool(partial)
    resume_step = max(complete)

  # A save cut short stays a temporary folder: the rerun resumes from the step before it.
  assert left_partial
  procs = _start(workdir)
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming from step {resume_step}" in err
  assert _steps(checkpoints)[1] == set()  # The partial folders were cleaned up.
  # Equal to the uninterrupted run of the same global batch (up to the reduction order).
  step_a, state_a = final_state(tmp_path / "one")
  step_b = max(_steps(checkpoints)[0])
  with ocp.StandardCheckpointer() as checkpointer:  # Restored onto the reference's devices.
    state_b = checkpointer.restore((checkpoints / str(step_b) / "state").absolute(), state_a)
  assert step_a == step_b == STEPS
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
