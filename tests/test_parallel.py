"""Mesh, logical sharding rules, sharded init and data/tensor/FSDP-parallel equivalence."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import data, models
from dsjax.errors import ConfigError
from dsjax.measure import tree_bytes
from dsjax.parallel import mesh as mesh_lib
from dsjax.parallel import sharding
from dsjax.parallel.compression import parse_compression
from dsjax.train import Task, create_train_state, make_train_step
from dsjax.train.optim import build_optimizer
from dsjax.train.step import StepCache

TASK = Task("classification")


def test_parse_mesh_defaults_data_to_the_rest():
  assert mesh_lib.parse_mesh("model=2") == {"pipe": 1, "data": -1, "fsdp": 1, "model": 2}
  assert mesh_lib.parse_mesh("data=2,model=2,pipe=2") == {"pipe": 2, "data": 2, "fsdp": 1,
                                                          "model": 2}
  assert mesh_lib.resolve_shape(mesh_lib.parse_mesh("fsdp=-1,model=2"), 8)["fsdp"] == 4


@pytest.mark.parametrize("spec, devices, message", [
    ("data=3", 8, "has 3 devices but there are 8"),
    ("tensor=2", 8, "unknown axis 'tensor'"),
    ("data=x", 8, "must be an integer"),
    ("data=-1,model=-1", 8, "at most one -1"),
    ("model=3", 8, "multiple of 3 devices, but there are 8"),
    ("model=2,model=4", 8, "given twice"),
])
def test_bad_meshes_name_the_problem(spec, devices, message):
  with pytest.raises(ConfigError, match=message):
    mesh_lib.resolve_shape(mesh_lib.parse_mesh(spec), devices)


def test_rules_overrides_and_errors():
  rules = sharding.parse_rules("embed=model,mlp=none,batch=data+fsdp")
  assert rules[:3] == (("embed", "model"), ("mlp", None), ("batch", ("data", "fsdp")))
  with pytest.raises(ConfigError, match="unknown mesh axis 'tensor'"):
    sharding.parse_rules("mlp=tensor")
  with pytest.raises(ConfigError, match="not logical=mesh_axis"):
    sharding.parse_rules("mlp")


def test_indivisible_batch_is_refused():
  mesh = mesh_lib.make_mesh({"data": 4, "model": 2})
  with pytest.raises(ConfigError, match="does not split over the mesh's data x fsdp=4"):
    sharding.check_batch(mesh, 30, "train.batch_size", "set --batch-size")


def _setup(mesh_sizes, devices=None, steps=3, accum=1, batch_size=32, compression=None):
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (8,), 64
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
  dataset = data.get_dataset(config.data)
  model = models.get_spec("cnn-digits").build(config.model, dataset.num_classes, np.float32)
  tx, lr = build_optimizer(config.optimizer, steps)
  mesh = mesh_lib.make_mesh(mesh_sizes, devices)
  rules = sharding.parse_rules()
  compression = compression and parse_compression(compression)
  runtime = StepCache(lambda stats, density: make_train_step(
      TASK, accum, lr, grad_compression=compression), lambda dtype, plan: model, np.float32,
      mesh, rules)
  with runtime.context():
    state = create_train_state(model, tx, dataset.input_shape, 0, mesh=mesh, rules=rules,
                               grad_compression=compression)
  return dataset, runtime, state, mesh


def _train(mesh_sizes, devices=None, steps=3, accum=1, batch_size=32, compression=None):
  dataset, runtime, state, mesh = _setup(mesh_sizes, devices, steps, accum, batch_size,
                                         compression)
  batches = data.BatchIterator(dataset.splits["train"], batch_size, seed=0)
  losses = []
  for step in range(steps):
    batch = sharding.global_batch(batches.batch(step), sharding.batch_sharding(mesh),
                                  batch_size)
    state, metrics = runtime.run(state, batch, jax.random.fold_in(state.rng, step))
    losses.append(float(metrics["loss"]))
  if compression:
    return np.array(losses), jax.device_get(state.params), runtime.comm_bytes()
  return np.array(losses), jax.device_get(state.params)


def test_params_are_born_sharded_as_the_rules_say():
  _, _, state, mesh = _setup({"fsdp": 2, "model": 4})
  kernel = state.params["hidden"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  whole = kernel.size * kernel.dtype.itemsize
  assert kernel.addressable_shards[0].data.nbytes == whole // 8
  # The classifier's 10 outputs do not split 4 ways: replicated, not an error.
  assert state.params["classifier"]["kernel"].sharding.spec[1] is None
  # Convolutions too: [h, w, in, out] with out (8 channels) on model; the 1 input
  # channel does not split over fsdp. The bias follows the output channels.
  conv = state.params["conv0_0"]
  assert conv["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, None, None, "model")
  assert conv["bias"].sharding.spec == jax.sharding.PartitionSpec("model")
  # Adam/SGD state mirrors the params' sharding (FSDP shards optimizer state too).
  assert tree_bytes(state.params) < sum(x.nbytes for x in jax.tree.leaves(state.params))
  del mesh


@pytest.fixture(scope="module")
def reference():
  return _train({}, jax.devices()[:1])


@pytest.mark.parametrize("mesh_sizes", [
    {"data": 8}, {"data": 2, "model": 4}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "model": 2},
], ids=lambda sizes: ",".join(f"{k}={v}" for k, v in sizes.items()))
def test_parallel_training_matches_one_device(reference, mesh_sizes):
  losses, params = _train(mesh_sizes)
  ref_losses, ref_params = reference
  # Same math, different summation order across devices: float32 rounding only.
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_on_a_mesh_matches_one_device(reference):
  losses, params = _train({"data": 4, "model": 2}, accum=2)
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _bert_losses(mesh_sizes, devices=None, steps=2):
  """Two SGD steps of a 4-layer BERT (no dropout) on `mesh_sizes`: losses and params."""
  from dsjax.train import tasks

  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
  # Stacked layers on every mesh (a pipeline stacks them anyway): one parameter layout
  # to compare, with the layer axis that `pipe` shards.
  config.model.update(hidden=32, num_layers=4, num_heads=4, mlp_dim=64, max_position=32,
                      dropout_rate=0.0, scan_layers=True)
  config.data.seq_len, config.data.vocab_size = 16, 256
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.5
  dataset = data.get_dataset(config.data)
  task = tasks.make_task("mlm", config.data, dataset.metadata)
  mesh = mesh_lib.make_mesh(mesh_sizes, devices)
  stages = mesh.shape["pipe"]
  model = models.get_spec("bert-tiny").build(config.model, dataset.num_classes, np.float32)
  model = model.clone(num_stages=stages, num_microbatches=2 * stages)
  tx, lr = build_optimizer(config.optimizer, steps)
  rules = sharding.parse_rules()
  runtime = StepCache(lambda stats, density: make_train_step(task, 1, lr),
                      lambda dtype, plan: model, np.float32, mesh, rules)
  with runtime.context():
    state = create_train_state(model, tx, task.example_batch(dataset.splits["train"]), 0,
                               task=task, mesh=mesh, rules=rules)
  batches = data.BatchIterator(dataset.splits["train"], 16, seed=0)
  losses = []
  for step in range(steps):
    batch = sharding.global_batch(batches.batch(step), sharding.batch_sharding(mesh), 16)
    state, metrics = runtime.run(state, batch, jax.random.fold_in(state.rng, step))
    losses.append(float(metrics["loss"]))
  return np.array(losses), state.params


@pytest.fixture(scope="module")
def bert_reference():
  return _bert_losses({}, jax.devices()[:1])


@pytest.mark.parametrize("mesh_sizes", [
    {"data": 2, "model": 4}, {"data": 2, "model": 2, "pipe": 2}, {"fsdp": 4, "model": 2},
], ids=lambda sizes: ",".join(f"{k}={v}" for k, v in sizes.items()))
@pytest.mark.slow
def test_bert_trains_the_same_on_tensor_pipeline_and_fsdp_meshes(bert_reference, mesh_sizes):
  losses, params = _bert_losses(mesh_sizes)
  ref_losses, ref_params = bert_reference
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(jax.device_get(params)),
                       jax.tree.leaves(jax.device_get(ref_params)), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
  # Sharding is real: attention heads split on `model`, layers on `pipe`.
  query = params["encoder"]["layers"]["attention"]["query"]["kernel"]  # [L, embed, heads, kv]
  spec = query.sharding.spec
  if mesh_sizes.get("model", 1) > 1:
    assert spec[2] == "model"
  if mesh_sizes.get("pipe", 1) > 1:
    assert spec[0] == "pipe"
    assert query.addressable_shards[0].data.shape[0] == 4 // mesh_sizes["pipe"]


@pytest.mark.slow
def test_bert_on_data_fsdp_model_needs_no_full_rematerialization(bert_reference, capfd):
  """data x fsdp x model: the embedding lookup gathers the table's features (sharded on
  fsdp, like the batch) first, so XLA's partitioner never falls back to replicating it
  (it prints "Involuntary full rematerialization" when it does) and the step matches one
  device."""
  losses, _ = _bert_losses({"data": 2, "fsdp": 2, "model": 2}, steps=1)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  np.testing.assert_allclose(losses, bert_reference[0][:1], rtol=2e-5)


@pytest.mark.slow
def test_resnet_with_batch_norm_trains_the_same_with_channels_on_model():
  """Conv kernels, biases and BatchNorm scales carry logical axes: on data x model the
  output channels (and BatchNorm's per-channel statistics) are split over `model`, and
  two SGD steps equal one device's."""
  import ml_collections

  spec = models.get_spec("resnet20")
  fields = ml_collections.ConfigDict({**spec.defaults, "stage_sizes": (1, 1), "widths": (4, 8)})
  model = spec.build(fields, 10, np.float32)
  config = config_lib.base_config()
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
  tx, lr = build_optimizer(config.optimizer, 2)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}

  def train(mesh_sizes, devices=None):
    mesh = mesh_lib.make_mesh(mesh_sizes, devices)
    rules = sharding.parse_rules()
    runtime = StepCache(lambda stats, density: make_train_step(TASK, 1, lr),
                        lambda dtype, plan: model, np.float32, mesh, rules)
    with runtime.context():
      state = create_train_state(model, tx, (8, 8, 3), 0, mesh=mesh, rules=rules)
    losses = []
    for step in range(2):
      sharded = sharding.global_batch(batch, sharding.batch_sharding(mesh), 8)
      state, metrics = runtime.run(state, sharded, jax.random.fold_in(state.rng, step))
      losses.append(float(metrics["loss"]))
    return state, np.array(losses)

  state, losses = train({"data": 2, "model": 2}, jax.devices()[:4])
  scale = state.params["stage2_block1"]["bn1"]["scale"]
  assert scale.sharding.spec == jax.sharding.PartitionSpec("model")
  assert state.params["stem_conv"]["kernel"].sharding.spec[-1] == "model"
  ref_state, ref_losses = train({}, jax.devices()[:1])
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)),
                       jax.tree.leaves(jax.device_get(ref_state.params)), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_circular_pipeline_config():
  """`parallel.pipeline_repeats` reaches the model; repeats that do not divide the layers
  per stage, or fewer microbatches than stages, stop with one clear error from `resolve`,
  before any data loads."""
  from dsjax.train import resolve

  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
  config.model.num_layers, config.train.batch_size = 4, 8
  config.mesh.pipe, config.mesh.data = 2, 1
  devices = jax.devices()[:2]
  config.parallel.pipeline_repeats = 3
  with pytest.raises(ConfigError, match="does not split into mesh pipe=2 stages x "
                     "parallel.pipeline_repeats=3"):
    resolve(config, devices)
  config.parallel.pipeline_repeats, config.parallel.microbatches = 2, 1
  with pytest.raises(ConfigError, match="needs parallel.microbatches >= mesh pipe=2, got 1"):
    resolve(config, devices)
  config.parallel.microbatches = 2
  model = resolve(config, devices).build_model(64, np.float32)
  assert (model.num_stages, model.num_microbatches, model.num_repeats) == (2, 2, 2)
  config.parallel.pipeline_repeats = 0
  with pytest.raises(ConfigError, match="parallel.pipeline_repeats must be >= 1"):
    config_lib.validate(config)


def test_local_accumulation_exchanges_gradients_once_per_step(reference):
  """`grad_compression=local` on data=8 with 4 micro-batches: each replica accumulates its
  own gradients and the replicas all-reduce once per step (XLA's path all-reduces in every
  micro-batch), with the one-device result."""
  losses, params, moved = _train({"data": 8}, accum=4, compression="local")
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  gradient_bytes = 8 * 4 * sum(p.size for p in jax.tree.leaves(params))  # 8 replicas, f32.
  assert gradient_bytes <= moved < 2 * gradient_bytes
