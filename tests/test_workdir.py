"""The run folder and failing writes: one clear error, and no checkpoint lost."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest
from test_checkpoint import assert_trees_equal, final_state, tiny_config
from test_cli import ONE_DEVICE, REPO

from dsjax.errors import CheckpointError, ConfigError
from dsjax.train import train_and_evaluate
from dsjax.train.workdir import prepare_workdir


@pytest.mark.parametrize("where, expected", [
    ("/proc/forbidden", "cannot be created (No such file or directory (ENOENT))"),
    ("{file}/run", "cannot be created (Not a directory (ENOTDIR))"),
    ("{file}", "exists and is not a folder"),
])
def test_impossible_workdir_is_one_config_error(tmp_path, where, expected):
  (tmp_path / "file").write_text("")
  workdir = where.format(file=tmp_path / "file")
  with pytest.raises(ConfigError, match=r"--workdir .* " + expected.replace("(", r"\(")
                     .replace(")", r"\)") + ": choose another --workdir"):
    train_and_evaluate(tiny_config(2), workdir)


def test_full_disk_is_found_before_training(tmp_path, monkeypatch):
  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", no_space)
  with pytest.raises(ConfigError, match=r"is not writable \(No space left on device "
                                        r"\(ENOSPC\)\)"):
    prepare_workdir(tmp_path / "run")
  assert list((tmp_path / "run").iterdir()) == []  # The probe file is gone.


# The disk fills while step 4's checkpoint is written: its host JSON is cut short.
DISK_FILLS_AT_STEP_4 = """
import errno, os
import orbax.checkpoint as ocp
original = ocp.handlers.JsonCheckpointHandler._save_fn

async def disk_full(self, item, directory):
  if directory.parent.name.startswith("4."):  # The temporary folder of step 4.
    (directory / "metadata").write_text('{"truncat')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
  return await original(self, item, directory)
"""


@pytest.mark.slow
def test_checkpoint_write_failing_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
  """The disk fills while step 4's checkpoint is written: its host JSON is cut short. The
  error names the intact step-2 checkpoint, and rerunning resumes from it to the same final
  state as an uninterrupted run."""
  patch = {}
  exec(DISK_FILLS_AT_STEP_4, patch)
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", patch["disk_full"])
  config = tiny_config(4)
  config.checkpoint.every_steps = 2
  with pytest.raises(CheckpointError) as caught:
    train_and_evaluate(config, tmp_path / "run")
  message = str(caught.value)
  assert "saving checkpoint 4" in message and "No space left on device" in message, message
  assert f"the previous checkpoint, {tmp_path / 'run' / 'checkpoints' / '2'}, is intact" in message
  monkeypatch.undo()

  train_and_evaluate(config, tmp_path / "run")  # Resumes from step 2.
  train_and_evaluate(config, tmp_path / "fresh")
  assert_trees_equal(final_state(tmp_path / "run")[1], final_state(tmp_path / "fresh")[1])



@pytest.mark.slow
def test_failed_checkpoint_write_via_cli_is_one_line(tmp_path):
  """Through the CLI: one line naming the intact checkpoint, none of orbax's writer
  threads' tracebacks."""
  script = tmp_path / "disk_fills.py"
  script.write_text(DISK_FILLS_AT_STEP_4 + "ocp.handlers.JsonCheckpointHandler._save_fn = "
                    "disk_full\nfrom dsjax.cli import train_main\ntrain_main()\n")
  args = [sys.executable, str(script), f"--config={REPO}/configs/digits_cnn.py:tiny",
          "--steps", "4", "--config.checkpoint.every_steps=2", "--workdir", str(tmp_path / "w")]
  result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0].startswith("dsjax-train: error: saving checkpoint 4 into ")
  assert f"the previous checkpoint, {tmp_path / 'w' / 'checkpoints' / '2'}, is intact" in lines[0]
