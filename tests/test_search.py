"""The DNAS search runs in the trainer: on a mesh and under any precision policy."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsjax.configs import digits_dnas
from dsjax.errors import ConfigError
from dsjax.train import resolve, search_architecture

STEPS = 4


def _config(**mesh):
  """The digits DNAS config's tiny variant: 4 steps (the architecture moves from step 2)."""
  config = digits_dnas.get_config("tiny")
  config.search.steps, config.search.warmup_steps = STEPS, 1
  config.checkpoint.every_steps = STEPS
  config.logging.tensorboard = config.logging.progress_bar = False
  config.mesh.update(mesh)
  return config


def _final_state(workdir):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore((workdir / "checkpoints" / str(STEPS) / "state").absolute())


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one-device")
  return search_architecture(_config(num_devices=1), workdir), workdir


@pytest.mark.slow
@pytest.mark.all_devices
def test_a_search_on_a_data_mesh_equals_the_one_device_search(one_device, tmp_path):
  """data=4 (of 8 simulated devices): each device takes 4 of the 16 examples; the batch
  means are all-reduced, so weights, logits and both optimizer states match one device to
  float32 rounding of a different reduction order (measured: ~1e-7 relative)."""
  summary, reference = one_device
  mesh_summary = search_architecture(_config(data=4, num_devices=4), tmp_path)
  assert mesh_summary["mesh"]["data"] == 4 and summary["mesh"]["data"] == 1
  got, want = _final_state(tmp_path), _final_state(reference)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
  assert any("arch" in p for p in paths) and any("opt_state" in p for p in paths)
  for path, a, b in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=path)
  assert mesh_summary["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
  got_arch, want_arch = (json.loads((folder / "architecture.json").read_text())
                         for folder in (tmp_path, reference))
  got_probs, want_probs = got_arch.pop("probabilities"), want_arch.pop("probabilities")
  assert got_arch == want_arch  # The same derived network...
  for a, b in zip(jax.tree.leaves(got_probs), jax.tree.leaves(want_probs), strict=True):
    assert a == pytest.approx(b, rel=1e-5)  # ...from the same probabilities.


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed", "fp16"])
def test_a_search_in_reduced_precision_scales_its_loss_and_runs_the_controller(
    one_device, tmp_path, policy):
  """`mixed` (bfloat16 on CPU, with the per-layer controller) and `fp16` (dynamic loss
  scaling) search in the trainer's precision machinery: the metrics log the loss scale
  and the controller's FLOP share, and the search still derives an architecture whose
  losses stay near the float32 search's (bfloat16 keeps 8 bits: 5% of the loss)."""
  config = _config(num_devices=1)
  config.precision.policy = policy
  summary = search_architecture(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert summary["precision"] == policy and summary["skipped_steps"] == 0
  if policy == "fp16":
    assert records[0]["loss_scale"] == 2.0**15  # The dynamic scale's start.
  else:
    assert records[0]["fp16_matmul_flops_fraction"] > 0.5  # The controller's statistics.
  reference = one_device[0]
  for key in ("train_loss", "val_loss"):
    assert summary[key] == pytest.approx(reference[key], rel=0.05), key
  assert (tmp_path / "architecture.json").exists()


def test_search_settings_that_cannot_act_are_refused_before_data_loads():
  config = _config()
  config.parallel.grad_compression = "topk:0.1"
  config.train.grad_accum_steps = 2
  with pytest.raises(ConfigError) as error:
    resolve(config, search=True)
  assert "the search step exchanges its two gradients densely" in str(error.value)
  assert "train.grad_accum_steps=2: the search takes whole batches" in str(error.value)
