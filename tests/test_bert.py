"""BERT: shapes, precision, masking, errors, axis names (Hugging Face reader: test_bert_hf.py)."""

import collections
import importlib.util
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.errors import ConfigError
from dsjax.models import bert, layer_stack, registry
from dsjax.precision import LayerPrecision

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bert_tiny_hf"  # scripts/make_bert_fixture.py


def _tiny(**overrides):
  fields = {"vocab_size": 64, "hidden": 16, "num_layers": 2, "num_heads": 2, "mlp_dim": 32,
            "max_position": 16, **overrides}
  return bert.Bert(**fields)


def _ids(shape, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _random_variables(module, ids, seed=0):
  """Random parameters in `module.init`'s layout, without compiling init (slow on XLA:CPU)."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), ids))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.normal(0.0, 0.1, leaf.shape) + (path[-1].key == "scale")
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def bert_tiny():
  """The registered bert-tiny (vocabulary 64), random parameters, float32 logits."""
  spec = registry.get_spec("bert-tiny")
  module = spec.build(ml_collections.ConfigDict(spec.defaults), 64, jnp.float32)
  ids = _ids((2, 8), 64)
  variables = _random_variables(module, ids)
  return module, variables, ids, jax.jit(module.apply)(variables, ids)


# ------------------------------------------------------------ the module


def test_logits_shape_and_dtype_with_default_mask_and_types(bert_tiny):
  *_, logits = bert_tiny
  assert logits.shape == (2, 8, 64) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()


def test_bfloat16_compute_gives_finite_float32_logits_close_to_float32(bert_tiny):
  module, variables, ids, full = bert_tiny
  half = jax.jit(module.clone(precision=LayerPrecision(jnp.bfloat16)).apply)(variables, ids)
  assert half.dtype == jnp.float32 and np.isfinite(half).all()
  # bfloat16 keeps 8 significant bits (~0.4% per rounding), rounded a few times per layer.
  np.testing.assert_allclose(half, full, atol=0.05 * np.abs(full).max(), rtol=0)


def test_bert_base_has_110m_parameters():
  spec = registry.get_spec("bert-base")
  module = spec.build(ml_collections.ConfigDict(spec.defaults), 30522, jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  assert abs(count - 110e6) / 110e6 < 0.01, count


def test_params_carry_logical_axis_names():
  module = _tiny()
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(shapes)["params"]
  names = {name for spec in jax.tree.leaves(specs) for name in spec if name}
  assert names >= {"layers", "heads", "kv", "mlp", "vocab", "embed"}
  layers = specs["encoder"]["layers"]
  P = jax.sharding.PartitionSpec
  assert layers["attention"]["query"]["kernel"] == P("layers", "embed", "heads", "kv")
  assert layers["attention"]["out"]["kernel"] == P("layers", "heads", "kv", "embed")
  assert layers["mlp_in"]["kernel"] == P("layers", "embed", "mlp")
  assert specs["word_embeddings"]["embedding"] == P("vocab", "embed")


def test_activation_constraints_are_a_no_op_without_rules_and_apply_inside_scan():
  x = jnp.ones((2, 3, 4))
  assert nn.with_logical_constraint(x, bert.ACTIVATION_AXES) is x
  module, ids = _tiny(), _ids((8, 4), 64)
  variables = jax.eval_shape(module.init, jax.random.key(0), ids)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
    text = jax.jit(module.apply).lower(variables, ids).as_text()
  # Every layer's activation constraints, inside the scanned body too.
  assert text.count("sharding_constraint") >= 4


def _primitive_counts(jaxpr):
  """How often each primitive occurs in `jaxpr` and its sub-jaxprs (a loop body once)."""
  counts = collections.Counter()
  for equation in jaxpr.eqns:
    counts[equation.primitive.name] += 1
    for param in equation.params.values():
      for sub in param if isinstance(param, tuple | list) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          counts += _primitive_counts(inner)
  return counts


def _primitives(jaxpr):
  return set(_primitive_counts(jaxpr))


def test_train_mode_draws_dropout_and_remat_checkpoints_the_layers():
  # Traced, not compiled: the backward pass compiles slowly on XLA:CPU.
  module, ids = _tiny(dropout_rate=0.5), _ids((2, 6), 64)
  params = _random_variables(module, ids)["params"]

  def primitives(model, train):
    loss = lambda p: model.apply({"params": p}, ids, train=train,
                                 rngs={"dropout": jax.random.key(1)}).sum()
    return _primitives(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)

  assert "random_bits" in primitives(module, train=True)
  assert "random_bits" not in primitives(module, train=False)
  remat = {"remat2", "checkpoint"}  # jax.checkpoint's primitive, by jax version.
  assert not remat & primitives(module, train=True)
  assert remat & primitives(module.clone(remat=True), train=True)


def test_scan_unroll_keeps_parameters_and_logits():
  """`scan_unroll`: the same stacked parameters and the same logits with the scan's loop
  unrolled (both layers in one iteration; 0, the default, unrolls every layer) as with
  one layer per iteration."""
  module, ids = _tiny(dropout_rate=0.0), _ids((2, 6), 64)
  variables = _random_variables(module, ids)
  looped = module.clone(scan_unroll=1)
  assert "unroll=1" in str(jax.make_jaxpr(looped.apply)(variables, ids))
  want = jax.jit(looped.apply)(variables, ids)
  for unrolled in (module.clone(scan_unroll=2), module):
    shapes = nn.unbox(jax.eval_shape(unrolled.init, jax.random.key(0), ids))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
    assert "unroll=2" in str(jax.make_jaxpr(unrolled.apply)(variables, ids))
    np.testing.assert_allclose(jax.jit(unrolled.apply)(variables, ids), want, rtol=1e-5,
                               atol=1e-5)


def test_unscanned_layers_compute_what_the_scan_computes():
  """scan_layers=False: layers_0, layers_1 hold the scan's [layers, ...] slices
  (layer_stack's from_scan; to_scan inverts it), and give the same logits and gradients,
  with remat too. (Dropout masks follow the module paths, so they differ between layouts.)"""
  module, ids = _tiny(), _ids((2, 6), 64)
  variables = _random_variables(module, ids)
  flat = module.clone(scan_layers=False)
  shapes = nn.unbox(jax.eval_shape(flat.init, jax.random.key(0), ids))
  layout = layer_stack.UnstackedLayout(2)
  unstacked = {"params": layout.from_scan(variables["params"])}
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, unstacked)
  assert set(shapes["params"]["encoder"]) == {"layers_0", "layers_1"}
  restacked = layout.to_scan(unstacked["params"])
  jax.tree.map(np.testing.assert_array_equal, restacked, variables["params"])
  np.testing.assert_allclose(jax.jit(flat.apply)(unstacked, ids),
                             jax.jit(module.apply)(variables, ids), rtol=1e-5, atol=1e-5)

  def loss(model, params):
    return jnp.mean(jax.nn.log_softmax(model.apply({"params": params}, ids))[..., 0])

  want = jax.grad(lambda p: loss(module, p))(variables["params"])
  for model in (flat, flat.clone(remat=True)):
    got = jax.grad(lambda p, m=model: loss(m, p))(unstacked["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 layout.to_scan(got), want)
  assert "scan" not in str(jax.make_jaxpr(flat.apply)(unstacked, ids))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_keeps_parameters_and_logits(dtype):
  """attention_impl="jax" (`jax.nn.dot_product_attention`, XLA here; "cudnn" is the same
  call on a GPU) against the explicit path, with padded rows: the same parameters, and
  logits equal to float32 rounding (rtol 1e-5) or to a few bfloat16 roundings of the
  O(1) logits (atol 0.05: u = 2^-8, ten-odd roundings per layer, two layers)."""
  module, ids = _tiny(dropout_rate=0.0, precision=LayerPrecision(dtype)), _ids((2, 6), 64)
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.int32)
  variables = _random_variables(module, ids)
  fused = module.clone(attention_impl="jax", attention_dropout_rate=0.0)
  shapes = nn.unbox(jax.eval_shape(fused.init, jax.random.key(0), ids))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
  got = jax.jit(fused.apply)(variables, ids, mask)
  want = jax.jit(module.apply)(variables, ids, mask)
  tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == jnp.float32 else {"atol": 5e-2}
  np.testing.assert_allclose(got, want, **tolerance)


def test_attention_dropout_rate_is_separate_from_the_residual_dropout():
  """Dropout draws (traced, not compiled): the embeddings and, per layer, the attention
  weights and two residual branches; attention_dropout_rate=0 drops one per layer, and
  None (-1 in the config) follows dropout_rate."""
  module, ids = _tiny(dropout_rate=0.5), _ids((2, 6), 64)
  params = _random_variables(module, ids)["params"]

  def draws(model):
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, train=True,
                                                 rngs={"dropout": jax.random.key(1)}))(params)
    return _primitive_counts(jaxpr.jaxpr)["random_bits"]

  assert draws(module) == 1 + 3  # One scan body.
  assert draws(module.clone(attention_dropout_rate=0.0)) == 1 + 2
  assert draws(module.clone(dropout_rate=0.0, attention_dropout_rate=0.5)) == 1


def test_mlm_positions_give_the_full_logits_at_those_positions(bert_tiny):
  """`mlm_positions` runs the head on the gathered positions only: its logits are the
  full head's at those positions (float32 rounding), and the call without it is
  unchanged (export calls the module with ids, mask and types only)."""
  module, variables, ids, full = bert_tiny
  positions = jnp.asarray([[0, 3, 3], [7, 1, 0]], jnp.int32)
  mask, types = jnp.ones_like(ids), jnp.zeros_like(ids)
  gathered = jax.jit(lambda v, p: module.apply(v, ids, mask, types, train=False,
                                               mlm_positions=p))(variables, positions)
  assert gathered.shape == (2, 3, 64) and gathered.dtype == jnp.float32
  want = np.take_along_axis(np.asarray(full), np.asarray(positions)[..., None], axis=1)
  np.testing.assert_allclose(gathered, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(jax.jit(module.apply)(variables, ids, mask, types), full)


def test_sequence_longer_than_max_position_is_a_config_error():
  with pytest.raises(ConfigError, match="max_position"):
    _tiny().init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


# ------------------------------------------------------------ registry and configs


def test_registered_models():
  for name, (layers, hidden) in {"bert-tiny": (2, 128), "bert-mini": (4, 256),
                                 "bert-base": (12, 768)}.items():
    spec = registry.get_spec(name)
    assert (spec.task, spec.dataset) == ("mlm", "text")
    assert (spec.defaults["num_layers"], spec.defaults["hidden"]) == (layers, hidden)
  assert registry.get_spec("bert-base").config_file == "bert_base.py"
  spec = registry.get_spec("bert-tiny")
  assert list(spec.check(ml_collections.ConfigDict(spec.defaults))) == []
  bad = ml_collections.ConfigDict({**spec.defaults, "num_heads": 3, "matmul_impl": "cuda",
                                   "dropout_rate": 1.0, "scan_unroll": -1})
  problems = " ".join(spec.check(bad))
  assert "divisible" in problems and "matmul_impl" in problems and "dropout_rate" in problems
  assert "scan_unroll must be >= 0 (0: every layer" in problems
  unscanned = ml_collections.ConfigDict({**spec.defaults, "scan_layers": False,
                                         "scan_unroll": 2})
  assert "scan_layers=False has none" in " ".join(spec.check(unscanned))
  # Fused attention has no attention-weight dropout, which by default follows dropout_rate.
  fused = ml_collections.ConfigDict({**spec.defaults, "attention_impl": "cudnn"})
  assert "add --config.model.attention_dropout_rate=0" in " ".join(spec.check(fused))
  fused.attention_dropout_rate = 0.0
  assert list(spec.check(fused)) == []
  fused.attention_impl, fused.attention_dropout_rate = "flash", 1.5
  problems = " ".join(spec.check(fused))
  assert "attention_impl must be one of explicit, jax, cudnn" in problems
  assert "attention_dropout_rate must be in [0, 1) or -1" in problems


@pytest.mark.parametrize("name", ["bert_tiny.py", "bert_base.py"])
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_configs_validate(name, arg):
  path = ROOT / "configs" / name
  spec = importlib.util.spec_from_file_location(path.stem, path)
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  config = config_module.get_config(arg)
  config_lib.validate(config)
  assert config.data.name == "text"
  assert config.data.seq_len <= config.model.max_position


def init_from_config(tmp_path):
  """The Hugging Face fixture copied with a 99-word vocab.txt, and a 1-step bert-tiny run
  that starts from it with a learning rate too small to move the weights.

  Returns:
    `(folder, config)`.
  """
  folder = tmp_path / "hf"
  shutil.copytree(FIXTURE, folder)
  words = [f"w{i}" for i in range(99 - 5)]
  (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               *words]) + "\n")
  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
  config.data.seq_len, config.data.cache_dir = 32, str(tmp_path)
  config_lib.make_tiny(config, batch_size=8)
  config.train.steps, config.train.init_from = 1, str(folder)
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 1e-12
  config.optimizer.weight_decay = 0.0
  return folder, config


@pytest.mark.slow
def test_init_from_starts_training_from_the_hugging_face_weights(tmp_path):
  """The Hugging Face (stacked) weights load into bert's separate layers (the default),
  and its checkpoint holds them stacked again, unchanged by a step at lr 1e-12."""
  from test_checkpoint import final_state

  from dsjax.train import train_and_evaluate

  folder, config = init_from_config(tmp_path)
  assert config.model.scan_layers is False
  summary = train_and_evaluate(config, tmp_path / "run")
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["hidden"] == 32 and saved["data"]["vocab_file"].endswith("vocab.txt")
  assert summary["steps"] == 1
  _, state = final_state(tmp_path / "run")
  _, variables = bert.from_pretrained(folder)
  for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(variables["params"]),
                       strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6)  # One step at lr 1e-12 moves nothing.


def test_precision_plans_follow_the_layer_layout():
  """A controller state saved with stacked layers spreads to every separate layer, and
  separate layers fold back keeping any fp32 promotion; other paths are untouched."""
  stacked = {"plan": {"default": "half", "layers": {"encoder/layers/mlp_out": "fp32",
                                                     "mlm_dense": "fp32"}},
             "stable": {"encoder/layers/mlp_in": 3}, "promotions": {}, "events": ["e"]}
  apart = layer_stack.precision_state_for(stacked, 2, stacked=False)
  assert apart["plan"]["layers"] == {"encoder/layers_0/mlp_out": "fp32",
                                     "encoder/layers_1/mlp_out": "fp32", "mlm_dense": "fp32"}
  assert apart["stable"] == {"encoder/layers_0/mlp_in": 3, "encoder/layers_1/mlp_in": 3}
  assert apart["events"] == ["e"]
  apart["plan"]["layers"]["encoder/layers_0/mlp_out"] = "half"
  apart["stable"]["encoder/layers_1/mlp_in"] = 1
  back = layer_stack.precision_state_for(apart, 2, stacked=True)
  assert back["plan"]["layers"] == {"encoder/layers/mlp_out": "fp32", "mlm_dense": "fp32"}
  assert back["stable"] == {"encoder/layers/mlp_in": 1}
  assert layer_stack.precision_state_for(back, 2, stacked=True) == back


@pytest.mark.slow
def test_checkpoints_keep_the_scan_layout_whichever_the_layers(tmp_path):
  """A run with separate layers (the default) checkpoints the scan's stacked layout
  (params and Adam moments), and resumes with scan_layers=True to the parameters of an
  uninterrupted separate-layers run (no dropout: both layouts compute the same, to float32
  rounding, rtol 1e-5). (--init-from into separate layers: the test below.)"""
  from test_checkpoint import final_state

  from dsjax.train import train_and_evaluate

  def config(steps, scan_layers):
    config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
    config.model.update(hidden=16, num_heads=2, mlp_dim=32, max_position=16,
                        dropout_rate=0.0, scan_layers=scan_layers)
    config.data.seq_len, config.data.vocab_size = 16, 128
    config.data.cache_dir = str(tmp_path / "cache")
    config_lib.make_tiny(config, batch_size=8)
    config.train.steps = steps
    config.logging.tensorboard = config.logging.progress_bar = False
    return config

  assert config(1, False).model.scan_layers is False  # The default, set here explicitly.
  train_and_evaluate(config(1, False), tmp_path / "resumed")
  _, saved = final_state(tmp_path / "resumed")
  assert "layers" in saved["params"]["encoder"] and "layers_0" not in saved["params"]["encoder"]
  assert saved["params"]["encoder"]["layers"]["mlp_in"]["kernel"].shape == (2, 16, 32)
  train_and_evaluate(config(2, True), tmp_path / "resumed")
  train_and_evaluate(config(2, False), tmp_path / "straight")
  _, resumed = final_state(tmp_path / "resumed")
  _, straight = final_state(tmp_path / "straight")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               resumed["params"], straight["params"])


def test_init_from_refuses_models_without_a_pretrained_format(tmp_path):
  from dsjax.train import train_and_evaluate

  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.train.init_from = str(FIXTURE)
  with pytest.raises(ConfigError, match="has no pretrained format; models that load one: bert"):
    train_and_evaluate(config, tmp_path)
