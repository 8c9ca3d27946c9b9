"""Checkpoint and resume: bit-identical continuation, and clear refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dsjax import config as config_lib
from dsjax import precision
from dsjax.errors import CheckpointError
from dsjax.parallel.pipeline import CircularLayout
from dsjax.train import checkpoint, train_and_evaluate
from dsjax.train.state import TrainState


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_field_added_since_the_run_resumes_at_its_default_only(tmp_path):
  """A workdir written before a config field existed (its config.json lacks the key)
  resumes while the field keeps its default, and is refused once it does not."""
  train_and_evaluate(tiny_config(3), tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["matmul_impl"] == "xla"  # The default.
  del saved["model"]["matmul_impl"], saved["optimizer"]["momentum"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  changed = tiny_config(4)
  changed.model.matmul_impl = "pallas"
  with pytest.raises(CheckpointError, match="different model settings"):
    train_and_evaluate(changed, tmp_path)
  assert train_and_evaluate(tiny_config(4), tmp_path)["steps"] == 4


def test_incompatible_arrays_are_refused_even_without_config_json(tmp_path):
  train_and_evaluate(tiny_config(3), tmp_path)
  (tmp_path / "config.json").unlink()
  config = tiny_config(6)
  config.model.dense_features = 24
  with pytest.raises(CheckpointError, match="cannot be restored"):
    train_and_evaluate(config, tmp_path)


def _bert_config(steps, pipe, repeats=1):
  """A 4-layer BERT on `pipe` pipeline stages (x `repeats` circular repeats)."""
  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
  config.model.update(hidden=16, num_layers=4, num_heads=2, mlp_dim=32, max_position=16,
                      dropout_rate=0.0)
  config.data.seq_len, config.data.vocab_size = 16, 128
  config.train.steps, config.train.batch_size = steps, 8
  config.train.eval_every_steps = config.checkpoint.every_steps = 2
  # Odd: a pipelined evaluation pads each batch to a multiple of its micro-batches.
  config.train.eval_batch_size = 63
  config.mesh.pipe, config.mesh.num_devices = pipe, pipe
  config.parallel.microbatches, config.parallel.pipeline_repeats = 2, repeats
  config.logging.progress_bar = False
  return config


@pytest.mark.slow
@pytest.mark.all_devices
def test_circular_pipeline_resumes_a_scan_layout_checkpoint(tmp_path):
  """Checkpoints hold the layer stack in the scan layout [L, ...]; a circular pipeline
  (stage-major [P, R, L/(RP), ...] in memory) restores an unpipelined run's checkpoint and
  evaluates it to the same loss."""
  scan = train_and_evaluate(_bert_config(2, pipe=1), tmp_path)
  _, saved = final_state(tmp_path)
  assert saved["params"]["encoder"]["layers"]["mlp_in"]["kernel"].shape == (4, 16, 32)
  circular = train_and_evaluate(_bert_config(2, pipe=2, repeats=2), tmp_path)
  assert circular["steps"] == 2
  # Float32 pipeline vs scan: the same sums, regrouped per microbatch.
  np.testing.assert_allclose(circular["eval_loss"], scan["eval_loss"], rtol=1e-5)
  np.testing.assert_allclose(circular["test_loss"], scan["test_loss"], rtol=1e-5)


@pytest.mark.all_devices
def test_checkpointer_writes_the_scan_layout_of_a_circular_state(tmp_path, monkeypatch):
  """Save converts a train state's stage-major [P, R, L/(RP), ...] leaves under "layers"
  (the parameters and the optimizer's momentum alike) to [L, ...]; restore converts back,
  into the target's shardings; other leaves pass through."""
  mesh = jax.make_mesh((2,), ("pipe",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  stacked = jax.sharding.NamedSharding(mesh, jax.P("pipe"))
  scan_layers = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # Layer l is row l.
  layout = CircularLayout(2, 2)
  params = {"layers": {"w": jax.device_put(layout.from_scan({"layers": scan_layers})["layers"],
                                           stacked)},
            "head": jnp.ones(2)}
  # Stage 1 runs chunks 1 and 3 (layers 1 and 3), and holds them.
  np.testing.assert_array_equal(params["layers"]["w"].addressable_shards[1].data,
                                [[[[3, 4, 5]], [[9, 10, 11]]]])
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState(step=jnp.array(3), params=params, model_state={},
                     # The momentum trace: one params-shaped tree, here -params.
                     opt_state=jax.tree.unflatten(jax.tree.structure(tx.init(params)),
                                                  [-p for p in jax.tree.leaves(params)]),
                     rng=jnp.zeros(2, jnp.uint32),
                     loss_scale=precision.loss_scale_for(precision.get_policy("fp32")),
                     grad_sync=None, pending_grads=None, apply_fn=None, tx=tx)
  # As in a trainer's state, every array lives on the mesh.
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  state = jax.tree.map(lambda x: x if x.sharding == stacked else jax.device_put(x, replicated),
                       state)
  checkpointer = checkpoint.Checkpointer(tmp_path / "checkpoints", max_to_keep=2,
                                         async_save=False, layout=layout)
  conversions = []  # Layout conversions traced: once per direction, not per save.
  to_scan = CircularLayout._leaf_to_scan
  monkeypatch.setattr(CircularLayout, "_leaf_to_scan",
                      lambda self, x: conversions.append(x) or to_scan(self, x))
  checkpointer.save(1, state, {})
  checkpointer.save(2, state, {})
  checkpointer.wait()
  assert len(conversions) == 2  # The parameter and its momentum, traced once.
  _, saved = final_state(tmp_path)
  np.testing.assert_array_equal(saved["params"]["layers"]["w"], scan_layers)
  np.testing.assert_array_equal(saved["params"]["head"], np.ones(2))
  momentum = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved["opt_state"])
              if "layers" in jax.tree_util.keystr(path)]
  assert len(momentum) == 1
  np.testing.assert_array_equal(momentum[0], -scan_layers)
  restored, _ = checkpointer.restore(1, state)
  assert_trees_equal(checkpointer.restore(2, state)[0], restored)
  checkpointer.close()
  assert_trees_equal(restored, state)
  assert restored.params["layers"]["w"].sharding == stacked
  shardings = {jax.tree_util.keystr(path): leaf.sharding
               for path, leaf in jax.tree_util.tree_leaves_with_path(restored.opt_state)}
  assert [s for key, s in shardings.items() if "layers" in key] == [stacked]
