"""Checkpoint and resume: bit-identical continuation, and clear refusals."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsjax import config as config_lib
from dsjax.errors import CheckpointError
from dsjax.train import train_and_evaluate


def tiny_config(steps):
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  config.model.dropout_rate = 0.2  # Exercises the per-step rng on resume.
  config.optimizer.schedule = "constant"
  config.train.steps, config.train.batch_size, config.train.grad_accum_steps = steps, 32, 2
  config.train.eval_every_steps = config.train.log_every_steps = 2
  config.checkpoint.every_steps = 3
  config.logging.progress_bar = False
  return config


def final_state(workdir):
  """Reads the newest checkpoint's arrays straight from disk, without the trainer."""
  checkpoints = workdir / "checkpoints"
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as checkpointer:
    return step, checkpointer.restore((checkpoints / str(step) / "state").absolute())


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_is_bit_identical(tmp_path):
  train_and_evaluate(tiny_config(8), tmp_path / "straight")
  train_and_evaluate(tiny_config(4), tmp_path / "resumed")
  step_4, _ = final_state(tmp_path / "resumed")
  assert step_4 == 4
  summary = train_and_evaluate(tiny_config(8), tmp_path / "resumed")
  assert summary["steps"] == 8
  step_a, state_a = final_state(tmp_path / "straight")
  step_b, state_b = final_state(tmp_path / "resumed")
  assert step_a == step_b == 8
  assert_trees_equal(state_a, state_b)  # params, optimizer state, rng, step.
  # metrics.jsonl reads as one run: each logged step once, in order.
  steps = [json.loads(line)["step"] for line in
           (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4, 6, 8]


def test_rerun_of_finished_run_trains_nothing(tmp_path):
  first = train_and_evaluate(tiny_config(4), tmp_path)
  again = train_and_evaluate(tiny_config(4), tmp_path)
  assert again["steps"] == 4
  assert again["test_accuracy"] == first["test_accuracy"]


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
  train_and_evaluate(tiny_config(3), tmp_path)
  state_dir = tmp_path / "checkpoints" / "3" / "state"
  corrupted = []
  for path in state_dir.rglob("*"):
    if path.is_file() and "manifest" not in path.name:
      path.write_bytes(b"\x00not a checkpoint")
      corrupted.append(path)
  assert corrupted
  with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoints/3 cannot be restored"):
    train_and_evaluate(tiny_config(6), tmp_path)
  # Nothing was deleted or overwritten, and no newer checkpoint appeared.
  assert all(p.read_bytes() == b"\x00not a checkpoint" for p in corrupted)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


def test_incompatible_config_is_refused(tmp_path):
  train_and_evaluate(tiny_config(3), tmp_path)
  config = tiny_config(6)
  config.model.features = (8, 8)
  with pytest.raises(CheckpointError, match="different model settings; resuming would mix"):
    train_and_evaluate(config, tmp_path)


def test_incompatible_arrays_are_refused_even_without_config_json(tmp_path):
  train_and_evaluate(tiny_config(3), tmp_path)
  (tmp_path / "config.json").unlink()
  config = tiny_config(6)
  config.model.dense_features = 24
  with pytest.raises(CheckpointError, match="cannot be restored"):
    train_and_evaluate(config, tmp_path)
