"""DNAS search checkpoints: a stopped and resumed search equals an uninterrupted one, and
corrupt or mismatched checkpoints are refused with a clear error and left untouched.

Compilation dominates on CPU: one tiny search space (the digits DNAS config's tiny
variant), and one search stopped at step 3 that every test copies.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsjax.errors import CheckpointError
from dsjax.train import search_architecture

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "digits_dnas.py"
STEPS, STOP = 6, 3


def tiny_search_config():
  """The digits DNAS config's tiny variant, searching 6 steps and checkpointing every 3."""
  spec = importlib.util.spec_from_file_location(CONFIG_FILE.stem, CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.search.steps, config.search.warmup_steps = STEPS, 2
  config.train.log_every_steps = 1
  config.checkpoint.every_steps = STOP
  config.logging.tensorboard = False
  config.logging.progress_bar = False
  # One device whatever the scope: the module-scoped `stopped` search is set up before the
  # autouse one-device fixture, and a search now spans the mesh like training does.
  config.mesh.num_devices = 1
  return config


def checkpoint_state(workdir: Path, step: int):
  """Reads a checkpoint's arrays straight from disk, without the search."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore((workdir / "checkpoints" / str(step) / "state").absolute())


def checkpoint_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def logged_steps(workdir: Path) -> list[int]:
  return [json.loads(line)["step"]
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A workdir whose search stopped (pre-emption drill) after 3 of 6 steps; copy it."""
  workdir = tmp_path_factory.mktemp("stopped") / "search"
  summary = search_architecture(tiny_search_config(), workdir, stop_after=STOP)
  assert summary["stopped_at"] == STOP and "architecture" not in summary
  assert checkpoint_steps(workdir) == [STOP]
  assert not (workdir / "architecture.json").exists()
  assert not (workdir / "summary.json").exists()
  assert logged_steps(workdir) == [1, 2, 3]
  return workdir


def copy_of(stopped: Path, tmp_path: Path) -> Path:
  workdir = tmp_path / "search"
  shutil.copytree(stopped, workdir)
  return workdir


@pytest.mark.slow
def test_resumed_search_equals_uninterrupted_search(stopped, tmp_path, caplog):
  straight = search_architecture(tiny_search_config(), tmp_path / "straight")
  resumed_dir = copy_of(stopped, tmp_path)
  with caplog.at_level(logging.INFO, logger="dsjax.train.loop"):
    resumed = search_architecture(tiny_search_config(), resumed_dir)
  # It went on from step 3 rather than starting over.
  assert f"resuming the search from step {STOP}" in caplog.messages
  assert resumed["start_step"] == STOP and resumed["steps"] == straight["steps"] == STEPS
  assert checkpoint_steps(resumed_dir) == [STOP, STEPS]

  # Same final search state (weights, arch logits, optimizer states, step)...
  state_a = checkpoint_state(tmp_path / "straight", STEPS)
  state_b = checkpoint_state(resumed_dir, STEPS)
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for a, b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
  assert int(state_b["step"]) == STEPS
  # ...the warm-up ended on schedule (the arch moved after step 2, not twice from scratch)...
  fresh_arch = checkpoint_state(stopped, STOP)["arch"]
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(fresh_arch), jax.tree.leaves(state_b["arch"]), strict=True))
  # ...same outputs, and metrics.jsonl reads as one run with the same records.
  architecture_a = json.loads((tmp_path / "straight" / "architecture.json").read_text())
  assert json.loads((resumed_dir / "architecture.json").read_text()) == architecture_a
  summary_b = json.loads((resumed_dir / "summary.json").read_text())
  for key in ("val_loss", "train_loss"):
    assert summary_b[key] == pytest.approx(straight[key], abs=1e-5)
  assert logged_steps(resumed_dir) == list(range(1, STEPS + 1))
  records_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
  records_b = (resumed_dir / "metrics.jsonl").read_text().splitlines()
  for line_a, line_b in zip(records_a, records_b, strict=True):
    a, b = json.loads(line_a), json.loads(line_b)
    assert a.keys() == b.keys()
    for key in ("temperature", "arch_active", "val_loss", "train_loss"):
      assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)

  # Rerunning a finished search takes no step and derives the same outputs.
  metrics_before = (resumed_dir / "metrics.jsonl").read_text()
  again = search_architecture(tiny_search_config(), resumed_dir)
  assert again["start_step"] == STEPS and again["steps"] == STEPS
  assert json.loads((resumed_dir / "architecture.json").read_text()) == architecture_a
  assert again["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-5)
  assert (resumed_dir / "metrics.jsonl").read_text() == metrics_before
  assert checkpoint_steps(resumed_dir) == [STOP, STEPS]


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_and_kept(stopped, tmp_path):
  workdir = copy_of(stopped, tmp_path)
  corrupted = []
  for path in (workdir / "checkpoints" / str(STOP) / "state").rglob("*"):
    if path.is_file() and "manifest" not in path.name:
      path.write_bytes(b"\x00not a checkpoint")
      corrupted.append(path)
  assert corrupted
  files_before = sorted(p for p in (workdir / "checkpoints").rglob("*") if p.is_file())
  config_before = (workdir / "config.json").read_text()
  with pytest.raises(CheckpointError) as raised:
    search_architecture(tiny_search_config(), workdir)
  message = str(raised.value)
  assert f"checkpoints/{STOP} cannot be restored" in message and "--workdir" in message
  assert "\n" not in message
  # Nothing deleted or overwritten, no newer checkpoint, no outputs.
  assert sorted(p for p in (workdir / "checkpoints").rglob("*") if p.is_file()) == files_before
  assert all(p.read_bytes() == b"\x00not a checkpoint" for p in corrupted)
  assert checkpoint_steps(workdir) == [STOP]
  assert (workdir / "config.json").read_text() == config_before
  assert not (workdir / "architecture.json").exists()


def test_changed_search_space_is_refused_clearly(stopped, tmp_path):
  workdir = copy_of(stopped, tmp_path)
  config = tiny_search_config()
  config.model.backbone.max_channels = 12  # Other weight shapes than the checkpoint's.
  with pytest.raises(CheckpointError,
                     match=r"different model settings; resuming would mix .* new --workdir"):
    search_architecture(config, workdir)
  assert json.loads((workdir / "config.json").read_text())["model"]["backbone"][
      "max_channels"] == 8  # The saved config was not overwritten.
  # Without config.json to compare, the restore itself refuses the arrays: still one
  # CheckpointError naming the checkpoint and the fix, not a raw orbax ValueError.
  (workdir / "config.json").unlink()
  with pytest.raises(CheckpointError) as raised:
    search_architecture(config, workdir)
  message = str(raised.value)
  assert f"checkpoints/{STOP} cannot be restored" in message and "--workdir" in message
  assert checkpoint_steps(workdir) == [STOP]
