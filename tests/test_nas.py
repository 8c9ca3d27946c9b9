"""DNAS: known-answer search, resource response, bilevel separation, second-order
gradient, derivation and architecture files.

Compilation dominates on CPU, so every search shares one model, one pair of optimizers
(equal static state, so one compiled step serves all seeds) and tiny 8x8 inputs.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dsjax import nas
from dsjax.errors import ConfigError
from dsjax.models import supernet
from dsjax.models.supernet import Supernet

INPUT = (8, 8, 2)
TEACHER_CHANNELS = 4
WEIGHT_TX = optax.adam(1e-2)
ARCH_TX = optax.adam(3e-2)
# One block choosing among zero/identity/conv1x1/conv3x3/conv5x5 at the teacher's width;
# head "none": the block's feature map is regressed onto the teacher's.
KNOWN_ANSWER_SPACE = nas.SearchSpace(
    min_channels=TEACHER_CHANNELS, max_channels=TEACHER_CHANNELS, channel_choices=1,
    depth_range=(1, 1), kernel_sizes=(1, 3, 5), ops=("zero", "identity", "conv"),
    stem_channels=0, head="none")
# Two blocks (the second optional), widths 1..4, kernels 1 and 3.
RESOURCE_SPACE = nas.SearchSpace(
    min_channels=1, max_channels=TEACHER_CHANNELS, channel_choices=4, depth_range=(1, 2),
    kernel_sizes=(1, 3), ops=("conv", "identity"), stem_channels=0, head="none")
# Every op family, a stem, a stride and a pooled classifier head.
FULL_SPACE = nas.SearchSpace(
    min_channels=4, max_channels=8, channel_choices=3, depth_range=(2, 4), kernel_sizes=(3, 5),
    stem_channels=4, strides=(1, 2), head="pool")


def teacher_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Random images and relu(conv3x3(image)) of a fixed random 3x3 teacher, in numpy."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *INPUT)).astype(np.float32)
  w = rng.normal(size=(3, 3, INPUT[-1], TEACHER_CHANNELS)).astype(np.float32) / np.sqrt(18)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h = sum(padded[:, i:i + 8, j:j + 8] @ w[i, j] for i in range(3) for j in range(3))
  return x, np.maximum(h, 0).astype(np.float32)


def search(step, model, seed: int, steps: int, batch: int = 32):
  """Runs `steps` bilevel steps on fresh teacher batches; returns the final state, metrics."""
  n = steps * batch
  x, y = teacher_data(seed, 2 * n)
  state = nas.create_search_state(model, WEIGHT_TX, ARCH_TX, INPUT, seed)
  key = jax.random.PRNGKey(seed)
  for s in range(steps):
    train = {"image": x[s * batch:(s + 1) * batch], "target": y[s * batch:(s + 1) * batch]}
    val = {"image": x[n + s * batch:n + (s + 1) * batch],
           "target": y[n + s * batch:n + (s + 1) * batch]}
    state, metrics = step(state, train, val, key)
  return state, metrics


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))


@pytest.mark.slow
def test_known_answer_search_picks_the_teachers_conv3x3():
  # Gumbel-softmax (FBNet): each sampled op must fit on its own, so the weights cannot
  # compensate a small mixing weight (with a plain softmax, zero absorbs the mass). The
  # log-FLOPs penalty (a budget of 1 FLOP: always active) breaks the conv3/conv5 tie, as
  # conv5 contains conv3.
  model = Supernet(KNOWN_ANSWER_SPACE, num_classes=TEACHER_CHANNELS, relaxation="gumbel")
  penalty = nas.make_arch_penalty(KNOWN_ANSWER_SPACE, INPUT, TEACHER_CHANNELS,
                                  target_flops=1.0, resource_weight=0.05)
  warmup = 100
  step = jax.jit(nas.make_search_step(loss_fn=nas.regression_loss, warmup_steps=warmup,
                                      arch_penalty_fn=penalty))
  initial = nas.create_search_state(model, WEIGHT_TX, ARCH_TX, INPUT, 0)
  warm, metrics = search(step, model, seed=0, steps=warmup)
  assert leaves_equal(warm.arch, initial.arch)  # Warm-up: the architecture is frozen.
  assert float(metrics["arch_active"]) == 0.0
  for seed in (0, 1, 2):
    state, metrics = search(step, model, seed, steps=400)
    probs = nas.probabilities(state.arch, KNOWN_ANSWER_SPACE)["block_0"]["ops"]
    block = nas.derive(state.arch, KNOWN_ANSWER_SPACE, input_shape=INPUT,
                       num_classes=TEACHER_CHANNELS)["blocks"][0]
    assert (block["op"], block["kernel_size"]) == ("conv", 3), (seed, probs)
    assert probs["conv_3x3"] > 0.5, (seed, probs)
    assert float(metrics["val_loss"]) < 0.05


@pytest.mark.slow
def test_a_tight_flops_budget_gives_a_smaller_architecture():
  model = Supernet(RESOURCE_SPACE, num_classes=TEACHER_CHANNELS, relaxation="gumbel")
  derived = {}
  for budget in (0.0, 1500.0):
    penalty = nas.make_arch_penalty(RESOURCE_SPACE, INPUT, TEACHER_CHANNELS,
                                    target_flops=budget, resource_weight=0.5)
    step = jax.jit(nas.make_search_step(loss_fn=nas.regression_loss, warmup_steps=100,
                                        arch_penalty_fn=penalty))
    state, _ = search(step, model, seed=0, steps=300)
    derived[budget] = nas.derive(state.arch, RESOURCE_SPACE, input_shape=INPUT,
                                 num_classes=TEACHER_CHANNELS)
  free, tight = derived[0.0], derived[1500.0]
  assert tight["flops"] <= 1500 < free["flops"], (free["blocks"], tight["blocks"])
  assert tight["params"] < free["params"]


@pytest.mark.slow
def test_weight_and_arch_updates_touch_only_their_own_trees():
  model = Supernet(RESOURCE_SPACE, num_classes=TEACHER_CHANNELS, relaxation="gumbel")
  state = nas.create_search_state(model, WEIGHT_TX, ARCH_TX, INPUT, 0)
  param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state.params)]
  assert state.arch and not [p for p in param_paths if "logits" in p]
  x, y = teacher_data(0, 8)
  batch = {"image": x, "target": y}
  penalty = nas.make_arch_penalty(RESOURCE_SPACE, INPUT, TEACHER_CHANNELS, target_flops=1e3,
                                  resource_weight=0.1, param_free_weight=0.1)
  weight_update = jax.jit(nas.make_weight_update(loss_fn=nas.regression_loss))
  arch_update = jax.jit(nas.make_arch_update(loss_fn=nas.regression_loss, order=2,
                                             unroll_lr=0.1, arch_penalty_fn=penalty))
  key = jax.random.PRNGKey(1)

  after_weights, _ = weight_update(state, batch, key)
  assert leaves_equal(after_weights.arch, state.arch)
  assert leaves_equal(after_weights.arch_opt_state, state.arch_opt_state)
  assert not leaves_equal(after_weights.params, state.params)

  after_arch, metrics = arch_update(state, batch, batch, key)
  assert leaves_equal(after_arch.params, state.params)
  assert leaves_equal(after_arch.opt_state, state.opt_state)
  assert not leaves_equal(after_arch.arch, state.arch)
  assert np.isfinite(float(metrics["penalty"])) and float(metrics["expected_flops"]) > 1e3


@pytest.mark.slow
def test_second_order_arch_gradient_matches_finite_differences():
  # Smooth activations: with ReLU the unrolled weights jump wherever a pre-activation
  # crosses 0, and a finite difference measures those jumps rather than the derivative.
  space = nas.SearchSpace(min_channels=2, max_channels=4, channel_choices=2, depth_range=(1, 2),
                          kernel_sizes=(1, 3), ops=("conv", "identity", "zero"),
                          stem_channels=0, head="pool", activation="silu")
  model = Supernet(space, num_classes=3)
  state = nas.create_search_state(model, optax.sgd(0.1), ARCH_TX, INPUT, 0)
  rng = np.random.default_rng(0)
  state = state.replace(arch=jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), state.arch))

  def batch():
    return {"image": jnp.asarray(rng.normal(size=(16, *INPUT)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 3, 16), jnp.int32)}

  train, val, xi, key = batch(), batch(), 1.0, jax.random.PRNGKey(0)

  def loss(params, arch, data):
    logits = model.apply({"params": params, "arch": arch}, data["image"], train=True)
    return nas.classification_loss(logits, data)[0]

  @jax.jit
  def unrolled_objective(arch):
    inner = jax.grad(loss)(state.params, arch, train)
    params = jax.tree.map(lambda w, g: w - xi * g, state.params, inner)
    return loss(params, arch, val)

  second = jax.jit(lambda s: nas.arch_gradient(s, train, val, key, order=2, unroll_lr=xi)[0])
  first = jax.jit(lambda s: nas.arch_gradient(s, train, val, key, order=1)[0])
  g2, g1 = second(state), first(state)
  # Same derivative, by autodiff through the unrolled step: equal to float32 rounding.
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(jax.jit(jax.grad(unrolled_objective))(
      state.arch)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
  # Central difference along the gradient direction. The objective (~1.1) is float32, so
  # rounding contributes ~4 ulp / (2 eps) ~ 1e-5 to a slope of ~3e-3 (0.3%), truncation
  # O(eps^2) less; 2% is loose against both yet tight against dropping the Hessian term.
  norm = np.sqrt(sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(g2)))
  direction = jax.tree.map(lambda g: g / norm, g2)
  eps = 3e-2
  shifted = lambda sign: unrolled_objective(
      jax.tree.map(lambda a, d: a + sign * eps * d, state.arch, direction))
  finite = (float(shifted(1.0)) - float(shifted(-1.0))) / (2 * eps)
  along = lambda g: sum(float(jnp.vdot(a, d)) for a, d in zip(
      jax.tree.leaves(g), jax.tree.leaves(direction), strict=True))
  assert along(g2) == pytest.approx(finite, rel=2e-2)
  assert abs(along(g1) - finite) > 0.1 * abs(finite)  # The mixed term matters here.


def forced_arch(space: nas.SearchSpace, picks: list[tuple[str, int, bool]]):
  """Arch logits that make each block choose (candidate, channels, kept) with p ~ 1."""
  arch = {}
  for index, (op, channels, kept) in enumerate(picks):
    candidates = space.candidates(index)
    block = {"op_logits": 40.0 * jax.nn.one_hot(candidates.index(op), len(candidates)),
             "channel_logits": 40.0 * jax.nn.one_hot(space.channels.index(channels),
                                                     len(space.channels))}
    if space.optional(index):
      block["depth_logits"] = 40.0 * jax.nn.one_hot(int(kept), 2)
    arch[f"block_{index}"] = block
  return arch


def test_derived_architecture_round_trips_and_counts_its_params(tmp_path):
  assert FULL_SPACE.channels == (4, 6, 8)
  picks = [("sep_conv_5x5", 8, True), ("conv_3x3", 4, True), ("identity", 6, True),
           ("zero", 4, False)]
  arch = forced_arch(FULL_SPACE, picks)
  architecture = nas.derive(arch, FULL_SPACE, input_shape=INPUT, num_classes=10)
  assert [(b["op"], b["kernel_size"], b["channels"], b["kept"])
          for b in architecture["blocks"]] == [
              ("sep_conv", 5, 8, True), ("conv", 3, 4, True), ("identity", None, 6, True),
              ("zero", None, 4, False)]
  assert architecture["depth"] == 3
  # The relaxed expectation at a (nearly) one-hot architecture is the exact cost.
  expected = jax.jit(lambda a: nas.expected_cost(a, FULL_SPACE, INPUT, 10))(arch)
  assert float(expected["flops"]) == pytest.approx(architecture["flops"], rel=1e-4)
  assert float(expected["params"]) == pytest.approx(architecture["params"], rel=1e-4)

  path = nas.save_architecture(str(tmp_path), architecture)
  assert path.endswith("architecture.json")
  loaded = nas.load_architecture(path, FULL_SPACE)
  assert loaded == json.loads(json.dumps(architecture))
  model_config = {"backbone": {"type": "DNAS", **FULL_SPACE.to_dict()}, "architecture": path}
  model = supernet.build_supernet(model_config, 10, jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, *INPUT)))
  assert set(variables) == {"params"}  # No arch collection in the derived network.
  assert supernet.count_params(variables["params"]) == loaded["params"]
  assert "block_3" not in variables["params"] and "block_2" not in variables["params"]
  table = nas.format_probabilities(arch, FULL_SPACE)
  assert "sep_conv_5x5 1.00" in table and "8*:1.00" in table


@pytest.mark.parametrize("edit, field", [
    (lambda a: a["blocks"][0].update(op="maxpool"), "blocks[0].op"),
    (lambda a: a["blocks"][1].update(channels=64), "blocks[1].channels"),
    (lambda a: a["blocks"][0].update(kernel_size=7), "blocks[0].kernel_size"),
    (lambda a: a["blocks"][1].update(op="identity"), "blocks[1].op"),  # Strided block.
    (lambda a: a["blocks"].pop(), "blocks"),
    (lambda a: a.update(depth=4), "depth"),
    (lambda a: a["blocks"][0].update(kept=False), "blocks[0].kept"),
    (lambda a: a["search_space"].update(strides=[2]), "search_space.strides"),
    (lambda a: a.update(format="something-else"), "format"),
])
def test_invalid_architecture_files_raise_config_errors(tmp_path, edit, field):
  architecture = {
      "format": "dsjax-dnas-architecture", "version": 1, "search_space": FULL_SPACE.to_dict(),
      "input_shape": list(INPUT), "num_classes": 10, "depth": 3,
      "blocks": [{"op": "conv", "kernel_size": 3, "channels": 8, "kept": True},
                 {"op": "sep_conv", "kernel_size": 5, "channels": 4, "kept": True},
                 {"op": "identity", "kernel_size": None, "channels": 6, "kept": True},
                 {"op": "zero", "kernel_size": None, "channels": 4, "kept": False}]}
  nas.validate_architecture(json.loads(json.dumps(architecture)), FULL_SPACE)  # Valid as is.
  edit(architecture)
  path = tmp_path / "architecture.json"
  path.write_text(json.dumps(architecture))
  with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
    nas.load_architecture(str(path), FULL_SPACE)


def test_unreadable_architecture_files_and_bad_search_spaces(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    nas.load_architecture(str(tmp_path / "missing.json"), FULL_SPACE)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not readable JSON"):
    nas.load_architecture(str(tmp_path / "bad.json"), FULL_SPACE)
  with pytest.raises(ConfigError, match="optional block"):
    nas.SearchSpace(depth_range=(1, 3), strides=(1, 2))
  with pytest.raises(ConfigError, match="unknown DNAS search-space key"):
    nas.from_config({"type": "DNAS", "max_channel": 32})
  assert nas.from_config({"type": "DNAS", "depth_range": [1, 2]}).depth_range == (1, 2)


def test_relaxations():
  logits = jnp.asarray([[0.5, 2.0, -1.0]])
  key = jax.random.PRNGKey(0)
  relaxed = jax.jit(lambda z, k: [nas.relax(z, m, 0.5, k) for m in nas.RELAXATIONS])
  soft, gumbel, hard = relaxed(logits, key)
  np.testing.assert_allclose(soft, jax.nn.softmax(logits / 0.5), rtol=1e-6)
  np.testing.assert_allclose(gumbel.sum(-1), 1.0, rtol=1e-6)
  assert set(np.asarray(hard).ravel().tolist()) <= {0.0, 1.0} and float(hard.sum()) == 1.0
  # Straight-through: the one-hot forward still passes the soft sample's gradient.
  grad = jax.jit(jax.grad(lambda z: nas.relax(z, "hard_gumbel", 0.5, key)[0, 0]))(logits)
  assert float(jnp.abs(grad).sum()) > 0


def test_a_kept_block_never_derives_the_zero_op():
  """DARTS' rule: zero, however probable, would cut the chain; the next op is taken."""
  space = nas.SearchSpace(min_channels=4, max_channels=4, channel_choices=1, depth_range=(1, 2),
                          kernel_sizes=(3,), ops=("conv", "identity", "zero"), stem_channels=0,
                          head="pool")
  arch = forced_arch(space, [("zero", 4, True), ("zero", 4, False)])
  arch["block_0"]["op_logits"] = jnp.asarray([1.0, 2.0, 5.0])  # conv, identity, zero.
  blocks = nas.derive(arch, space, input_shape=INPUT, num_classes=10)["blocks"]
  assert [(b["op"], b["kept"]) for b in blocks] == [("identity", True), ("zero", False)]


def test_latency_table_and_expected_latency():
  space = nas.SearchSpace(min_channels=2, max_channels=4, channel_choices=2, depth_range=(1, 2),
                          kernel_sizes=(1,), ops=("conv", "zero"), stem_channels=0, head="pool")
  table = nas.measure_latency_table(space, INPUT, batch_size=2, repeats=2)
  assert sorted(table) == ["block_0/conv_1x1", "block_0/zero", "block_1/conv_1x1", "block_1/zero"]
  assert all(seconds > 0 for seconds in table.values())
  arch = forced_arch(space, [("conv_1x1", 4, True), ("zero", 2, False)])
  latency, grads = jax.jit(jax.value_and_grad(
      lambda a: nas.expected_latency(a, space, table)))(arch)
  assert float(latency) == pytest.approx(table["block_0/conv_1x1"], rel=1e-3)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def conv_bias_paths(params) -> tuple[list[str], bool]:
  """Returns the conv modules (4-d kernel) with a "bias" leaf, and whether BatchNorms exist."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  modules = {path.rpartition("/")[0] for path in flat}
  convs = [m for m in sorted(modules)
           if len(flat.get(f"{m}/kernel", np.empty(())).shape) == 4 and f"{m}/bias" in flat]
  has_bn = any(f"{m}/scale" in flat and f"{m}/bias" in flat for m in modules)
  return convs, has_bn


def batch_norm_params(variables) -> dict[str, list[str]]:
  """Returns each BatchNorm (a module with running statistics) -> its param leaf names."""
  stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
  params = traverse_util.flatten_dict(nn.unbox(variables["params"]), sep="/")
  modules = {path.rpartition("/")[0] for path in stats}
  assert sorted(stats) == sorted(f"{m}/{leaf}" for m in modules for leaf in ("mean", "var"))
  return {m: sorted(p.rpartition("/")[2] for p in params if p.rpartition("/")[0] == m)
          for m in sorted(modules)}


@pytest.mark.slow
def test_batch_norm_ops_search_derive_and_count(tmp_path):
  """`batch_norm=True`: every conv op (and the stem) normalises before its activation.
  The supernet's BatchNorms are affine-free (DARTS' search), the derived network's learn
  scale and bias. A search step updates the running statistics (in its weight step), the
  relaxed cost at a one-hot architecture equals the derived one, and the derived network
  has exactly the parameters its JSON states (BatchNorm scales and biases included)."""
  space = dataclasses.replace(FULL_SPACE, batch_norm=True, depth_range=(2, 3),
                              kernel_sizes=(3,))
  model = Supernet(space, num_classes=10)
  state = nas.create_search_state(model, WEIGHT_TX, ARCH_TX, INPUT, 0)
  stats = state.model_state["batch_stats"]
  assert "stem_bn" in stats and "bn" in stats["block_0"]["conv_3x3"]
  # Search: running mean/var but no scale or bias, in the stem and every conv op.
  search_bns = batch_norm_params({"params": state.params, **state.model_state})
  assert "stem_bn" in search_bns and "block_1/sep_conv_3x3/bn" in search_bns
  assert all(leaves == [] for leaves in search_bns.values())
  assert conv_bias_paths(state.params) == ([], False)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, *INPUT)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  step = jax.jit(nas.make_search_step())
  after, metrics = step(state, batch, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["val_loss"])) and np.isfinite(float(metrics["train_loss"]))
  assert not leaves_equal(after.model_state, state.model_state)

  picks = [("sep_conv_3x3", 8, True), ("conv_3x3", 4, True), ("identity", 6, False)]
  arch = forced_arch(space, picks)
  architecture = nas.derive(arch, space, input_shape=INPUT, num_classes=10)
  expected = jax.jit(lambda a: nas.expected_cost(a, space, INPUT, 10))(arch)
  assert float(expected["params"]) == pytest.approx(architecture["params"], rel=1e-4)
  path = nas.save_architecture(str(tmp_path), architecture)
  model_config = {"backbone": {"type": "DNAS", **space.to_dict()}, "architecture": path}
  derived = supernet.build_supernet(model_config, 10, jnp.float32)
  variables = jax.jit(derived.init)(jax.random.PRNGKey(0), jnp.zeros((2, *INPUT)))
  assert set(variables) == {"params", "batch_stats"}
  assert supernet.count_params(variables["params"]) == architecture["params"]
  # BatchNorm cancels a conv bias, so the convs it follows have none; without it they do.
  assert conv_bias_paths(variables["params"]) == ([], True)
  # The derived network's BatchNorms (stem and kept conv ops) learn scale and bias.
  assert batch_norm_params(variables) == {
      m: ["bias", "scale"]
      for m in ("block_0/sep_conv_3x3/bn", "block_1/conv_3x3/bn", "stem_bn")}
  plain = Supernet(dataclasses.replace(space, batch_norm=False), num_classes=10,
                   architecture=supernet.choices_from_dict(architecture))
  plain_params = jax.eval_shape(plain.init, jax.random.PRNGKey(0),
                                jnp.zeros((2, *INPUT)))["params"]
  assert conv_bias_paths(plain_params) == (
      ["block_0/sep_conv_3x3/pointwise", "block_1/conv_3x3/conv", "stem"], False)
  without = {**model_config, "backbone": {**model_config["backbone"], "batch_norm": False}}
  with pytest.raises(ConfigError, match="search_space.batch_norm"):
    supernet.build_supernet(without, 10, jnp.float32)
