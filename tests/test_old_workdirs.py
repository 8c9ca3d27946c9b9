"""Workdirs written before the search ran in the trainer (commit 58650f5) still restore and
resume, and continue exactly as that code continued them (tests/fixtures/workdirs_58650f5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import pytest

from dsjax.configs import digits_cnn, digits_dnas
from dsjax.train import search_architecture, train_and_evaluate

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "workdirs_58650f5"
EXPECTED = FIXTURES / "expected"


def _copy(name: str, tmp_path: Path) -> Path:
  workdir = tmp_path / name
  shutil.copytree(FIXTURES / name, workdir)
  return workdir


def _as_written(config, workdir: Path):
  """The fixture's command line, extended to 4 steps, with its saved seed."""
  config.seed = json.loads((workdir / "config.json").read_text())["seed"]
  config.checkpoint.every_steps, config.checkpoint.async_save = 2, False
  config.logging.tensorboard = False
  return config


def _last_record(workdir: Path) -> dict:
  return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_a_train_workdir_of_the_previous_code_resumes_as_that_code_resumed_it(tmp_path):
  """A mixed-precision run checkpointed at step 2 (with its controller state) resumes to
  step 4 with the metrics the old code gave: the step's program is unchanged, so to float
  rounding of a different compile at most (1e-6 relative; they agree to all digits here)."""
  workdir = _copy("train", tmp_path)
  config = _as_written(digits_cnn.get_config("tiny"), workdir)
  config.precision.policy, config.train.steps = "mixed", 4
  summary = train_and_evaluate(config, workdir)
  want = json.loads((EXPECTED / "train_summary_step4.json").read_text())
  assert summary["steps"] == want["steps"] == 4
  for key in ("eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
    assert summary[key] == pytest.approx(want[key], rel=1e-6), key
  got, expected = _last_record(workdir), json.loads((EXPECTED / "train_metrics_step4.json")
                                                    .read_text())
  for key in ("loss", "accuracy", "grad_norm", "param_norm", "update_norm", "loss_scale",
              "fp16_matmul_flops_fraction"):
    assert got[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.slow
def test_a_search_workdir_of_the_previous_code_resumes_in_the_trainer(tmp_path):
  """A search stopped at step 2 by the old, separate search loop (its state had
  `weight_opt_state` and no loss scale) resumes in the trainer's loop to step 4 and
  derives the architecture, probabilities and losses the old loop did."""
  workdir = _copy("search", tmp_path)
  config = _as_written(digits_dnas.get_config("tiny"), workdir)
  config.search.steps = 4
  summary = search_architecture(config, workdir)
  assert summary["start_step"] == 2 and summary["steps"] == 4
  architecture = json.loads((workdir / "architecture.json").read_text())
  want = json.loads((EXPECTED / "search_architecture_step4.json").read_text())
  # The same derived network; its recorded probabilities to float rounding (the fixture
  # was written without the test suite's XLA flags: ~1e-9 apart).
  got_probs, want_probs = architecture.pop("probabilities"), want.pop("probabilities")
  # The old code derived the zero op for kept block 0; since DARTS' rule (22a0762) a kept
  # block takes its most probable other op, here sep_conv_3x3, so its cost fields differ.
  assert (want["blocks"][0]["op"], want["blocks"][0]["kept"]) == ("zero", True)
  ops = {k: v for k, v in want_probs["block_0"]["ops"].items() if k != "zero"}
  assert max(ops, key=ops.get) == "sep_conv_3x3"
  assert (architecture["blocks"][0]["op"], architecture["blocks"][0]["kernel_size"]) == (
      "sep_conv", 3)
  # The search space gained `format_mixing` since (the default, "outputs").
  assert architecture["search_space"].pop("format_mixing") == "outputs"
  for arch in (architecture, want):
    arch["blocks"][0].update(op=None, kernel_size=None)
    arch.pop("flops"), arch.pop("params")
  assert architecture == want
  assert jax.tree.structure(got_probs) == jax.tree.structure(want_probs)
  for got, expected in zip(jax.tree.leaves(got_probs), jax.tree.leaves(want_probs), strict=True):
    assert got == pytest.approx(expected, rel=1e-6)
  assert ((workdir / "probabilities.txt").read_text()
          == (EXPECTED / "search_probabilities_step4.txt").read_text())
  got, expected = _last_record(workdir), json.loads((EXPECTED / "search_metrics_step4.json")
                                                    .read_text())
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-6), key
