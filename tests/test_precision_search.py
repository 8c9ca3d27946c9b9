"""Numeric formats as a DNAS search dimension: costs, relaxation, derivation, retraining.

Tiny spaces on tiny inputs: compilation dominates on CPU, so each test compiles little.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import nas
from dsjax.configs import digits_dnas_precision
from dsjax.errors import ConfigError
from dsjax.models import supernet
from dsjax.models.supernet import Supernet
from dsjax.precision import apply_format
from dsjax.train import search_architecture, train_and_evaluate

FORMATS = ("float32", "bfloat16", "int8", "int4")
# Two mandatory conv_3x3 blocks at width 4 on 4x4x2 images, no stem, pooled head.
TWO_BLOCKS = nas.SearchSpace(
    min_channels=4, max_channels=4, channel_choices=1, depth_range=(2, 2), kernel_sizes=(3,),
    ops=("conv",), stem_channels=0, head="pool", precision_choices=("float32", "int8", "int4"))
TWO_BLOCKS_INPUT = (4, 4, 2)


def logits_for(space: nas.SearchSpace, formats: list[list[float]]) -> dict:
  """An arch collection with uniform op/width logits and the given format logits."""
  arch = {}
  for index in range(space.num_blocks):
    arch[f"block_{index}"] = {
        "op_logits": jnp.zeros(len(space.candidates(index))),
        "channel_logits": jnp.zeros(len(space.channels)),
        "format_logits": jnp.asarray(formats[index], jnp.float32)}
    if space.optional(index):
      arch[f"block_{index}"]["depth_logits"] = jnp.asarray([0.0, 30.0])
  return arch


def test_bitops_and_model_bytes_against_a_hand_count():
  # 4x4 outputs (stride 1), so MACs = 16 x 9 x c_in x c_out:
  #   block 0: 16*9*2*4 = 1152 MACs, 72 weights + 4 biases
  #   block 1: 16*9*4*4 = 2304 MACs, 144 weights + 4 biases
  #   head: pooled 4 -> 3, 12 MACs, 12 weights + 3 biases, at 32 bits (1024 bit-ops a MAC)
  # Derived block 0 int8, block 1 int4:
  #   bit-ops = 1152*8*8 + 2304*4*4 + 12*1024 = 73728 + 36864 + 12288 = 122880
  #   bytes = 72*8/8 + 4*4 + 144*4/8 + 4*4 + 15*4 = 72 + 16 + 72 + 16 + 60 = 236
  # Uniform formats over (32, 8, 4) bits: E[bits^2] = (1024+64+16)/3 = 368, E[bits] = 44/3
  #   bit-ops = 3456*368 + 12288 = 1284096
  #   bytes = 216*(44/3)/8 + 8*4 + 15*4 = 396 + 32 + 60 = 488
  arch = logits_for(TWO_BLOCKS, [[0.0, 30.0, 0.0], [0.0, 0.0, 30.0]])
  derived = nas.derive(arch, TWO_BLOCKS, input_shape=TWO_BLOCKS_INPUT, num_classes=3)
  assert [b["format"] for b in derived["blocks"]] == ["int8", "int4"]
  assert derived["bitops"] == 122880
  assert derived["model_bytes"] == 236
  assert derived["flops"] == 2 * (1152 + 2304 + 12)
  # Nearly one-hot logits: the expectation the search optimises is the exact cost.
  expected = nas.expected_cost(arch, TWO_BLOCKS, TWO_BLOCKS_INPUT, 3)
  assert float(expected["bitops"]) == pytest.approx(122880, rel=1e-5)
  assert float(expected["model_bytes"]) == pytest.approx(236, rel=1e-5)
  uniform = nas.expected_cost(logits_for(TWO_BLOCKS, [[0.0] * 3] * 2), TWO_BLOCKS,
                              TWO_BLOCKS_INPUT, 3)
  assert float(uniform["bitops"]) == pytest.approx(1284096, rel=1e-6)
  assert float(uniform["model_bytes"]) == pytest.approx(488, rel=1e-6)
  # Differentiable in the format logits: more int4 means fewer bit-ops.
  grad = jax.grad(lambda a: nas.expected_cost(a, TWO_BLOCKS, TWO_BLOCKS_INPUT, 3)["bitops"])(
      logits_for(TWO_BLOCKS, [[0.0] * 3] * 2))
  assert float(grad["block_1"]["format_logits"][2]) < 0 < float(
      grad["block_1"]["format_logits"][0])
  # The budgets enter the penalty and its metrics.
  penalty = nas.make_arch_penalty(TWO_BLOCKS, TWO_BLOCKS_INPUT, 3, target_bitops=122880.0,
                                  target_model_bytes=236.0, resource_weight=1.0)
  total, metrics = penalty(logits_for(TWO_BLOCKS, [[0.0] * 3] * 2))
  assert float(total) == pytest.approx(np.log(1284096 / 122880) + np.log(488 / 236), rel=1e-5)
  assert set(metrics) >= {"expected_bitops", "expected_model_bytes"}


def test_without_precision_choices_nothing_changes(tmp_path):
  plain = nas.SearchSpace(min_channels=4, max_channels=8, channel_choices=2, depth_range=(1, 2),
                          kernel_sizes=(3,), stem_channels=4)
  searched = nas.SearchSpace(**{**plain.to_dict(), "precision_choices": FORMATS})
  assert "precision_choices" not in plain.to_dict()
  images = jnp.ones((2, 8, 8, 1))
  rngs = {"params": jax.random.PRNGKey(0), "gumbel": jax.random.PRNGKey(1)}
  variables = {space: Supernet(space, 10).init(rngs, images) for space in (plain, searched)}
  arch = variables[plain]["arch"]
  assert all("format_logits" not in block for block in arch.values())
  assert all("format_logits" in block for block in variables[searched]["arch"].values())
  # The formats share the weights: the same parameter paths with or without them.
  assert (jax.tree.structure(variables[plain]["params"])
          == jax.tree.structure(variables[searched]["params"]))
  cost = nas.expected_cost(arch, plain, (8, 8, 1), 10)
  assert set(cost) == {"flops", "params"}
  with_formats = nas.expected_cost(variables[searched]["arch"], searched, (8, 8, 1), 10)
  for key in ("flops", "params"):
    assert float(cost[key]) == pytest.approx(float(with_formats[key]), rel=1e-6)
  derived = nas.derive(arch, plain, input_shape=(8, 8, 1), num_classes=10)
  assert "bitops" not in derived and all("format" not in b for b in derived["blocks"])
  assert "formats" not in nas.format_probabilities(arch, plain)
  _, metrics = nas.make_arch_penalty(plain, (8, 8, 1), 10)(arch)
  assert set(metrics) == {"expected_flops", "expected_params"}
  with pytest.raises(ConfigError, match="precision_choices"):
    nas.make_arch_penalty(plain, (8, 8, 1), 10, target_bitops=1e6)
  with pytest.raises(ConfigError, match="unknown format"):
    nas.SearchSpace(precision_choices=("int3",))


@pytest.mark.parametrize("mixing", nas.FORMAT_MIXINGS)
def test_the_relaxed_block_mixes_the_formats_of_shared_weights(mixing):
  """outputs: sum_f p_f op_f(x) (Wu et al.); operands: op(sum_f p_f Q_f(x), sum_f p_f Q_f(W))
  (EdMIPS), one convolution."""
  space = nas.SearchSpace(min_channels=4, max_channels=4, channel_choices=1, depth_range=(1, 1),
                          kernel_sizes=(3,), ops=("conv", "identity"), stem_channels=0,
                          head="none", precision_choices=FORMATS, format_mixing=mixing)
  model = Supernet(space, num_classes=4, relaxation="softmax")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4)) * 3.0
  variables = model.init(jax.random.PRNGKey(1), x)
  format_logits = jnp.asarray([0.3, -0.2, 1.0, 0.5])
  op_logits = jnp.asarray([0.7, -0.4])
  arch = {"block_0": {**variables["arch"]["block_0"], "format_logits": format_logits,
                      "op_logits": op_logits}}
  # Bias to non-zero, so it is checked to stay outside the quantization.
  params = jax.tree.map(lambda p: p, variables["params"])
  conv = params["block_0"]["conv_3x3"]["conv"]
  conv["bias"] = conv["bias"].replace_boxed(jnp.arange(4.0) * 0.1)
  got = model.apply({"params": params, "arch": arch}, x)

  kernel, bias = conv["kernel"].unbox(), conv["bias"].unbox()
  p_format, p_op = jax.nn.softmax(format_logits), jax.nn.softmax(op_logits)

  def conv(inputs, weights):
    y = jax.lax.conv_general_dilated(inputs, weights, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + bias)

  def conv_in(fmt):
    return conv(apply_format(x, fmt), apply_format(kernel, fmt, channel_axis=-1))

  if mixing == "outputs":
    mixed = sum(p_format[f] * conv_in(fmt) for f, fmt in enumerate(FORMATS))
  else:
    mixed = conv(sum(p_format[f] * apply_format(x, fmt) for f, fmt in enumerate(FORMATS)),
                 sum(p_format[f] * apply_format(kernel, fmt, channel_axis=-1)
                     for f, fmt in enumerate(FORMATS)))
  want = p_op[0] * mixed + p_op[1] * x
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # The formats do differ here: int4 is not float32.
  assert float(jnp.max(jnp.abs(conv_in("int4") - conv_in("float32")))) > 1e-2


def test_derivation_writes_formats_and_files_round_trip(tmp_path):
  arch = logits_for(TWO_BLOCKS, [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
  architecture = nas.derive(arch, TWO_BLOCKS, input_shape=TWO_BLOCKS_INPUT, num_classes=3)
  assert [b["format"] for b in architecture["blocks"]] == ["float32", "int4"]
  assert architecture["probabilities"]["block_1"]["formats"]["int4"] > 0.9
  table = nas.format_probabilities(arch, TWO_BLOCKS)
  assert "formats" in table.splitlines()[0] and "int4*:" in table.splitlines()[2]
  assert "arch/block_1/format/int4" in nas.flat_probabilities(arch, TWO_BLOCKS)
  path = nas.save_architecture(str(tmp_path), architecture)
  loaded = nas.load_architecture(path, TWO_BLOCKS)
  assert loaded == json.loads(json.dumps(architecture))
  choices = supernet.choices_from_dict(loaded)
  assert [c.format for c in choices] == ["float32", "int4"]

  def refused(edit, match):
    broken = json.loads(json.dumps(architecture))
    edit(broken)
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match=match):
      nas.load_architecture(str(tmp_path / "bad.json"), TWO_BLOCKS)

  refused(lambda a: a["blocks"][0].update(format="int3"),
          r"blocks\[0\]\.format is 'int3'; allowed \['float32', 'int8', 'int4'\]")
  refused(lambda a: a["blocks"][1].update(format="bfloat16"), r"blocks\[1\]\.format")
  # A format for a run that searches none is refused; a file without formats still loads.
  no_formats = nas.SearchSpace(**{**TWO_BLOCKS.to_dict(), "precision_choices": ()})
  with pytest.raises(ConfigError, match="searches no format"):
    nas.load_architecture(path, no_formats)
  for block in architecture["blocks"]:
    del block["format"]
  old = nas.validate_architecture(architecture, no_formats)
  assert "bitops" not in old and supernet.choices_from_dict(old)[0].format is None


# The known answer. Block 0 (stride 2, 1x1 convolution) reads only the even pixels, which
# carry the signal (N(0, 1)); the odd pixels hold values up to 1000 that no output sees. An
# int8 block 0 quantizes per tensor with scale ~1000/127 = 7.9, so the signal rounds to 0:
# only float formats keep it. Block 1 reads block 0's ReLU outputs, benign for integers.
# A bit-ops budget of 1 (always active) pulls every block to fewer bits.
KNOWN_SPACE = nas.SearchSpace(
    min_channels=8, max_channels=8, channel_choices=1, depth_range=(2, 2), kernel_sizes=(1,),
    ops=("conv",), stem_channels=0, strides=(2,), head="pool", precision_choices=FORMATS)
KNOWN_INPUT = (8, 8, 1)


def known_data(seed: int, n: int, wide: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Signal on the even pixels, label its sum's sign; `wide`: +-1000 on the odd ones."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, *KNOWN_INPUT), np.float32)
  signal = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  x[:, ::2, ::2] = signal
  if wide:
    x[:, 1::2, 1::2] = rng.uniform(-1000, 1000, size=(n, 4, 4, 1))
  return x, (signal.sum(axis=(1, 2, 3)) > 0).astype(np.int32)


@pytest.fixture(scope="module", params=nas.FORMAT_MIXINGS)
def known_search(request):
  space = dataclasses.replace(KNOWN_SPACE, format_mixing=request.param)
  model = Supernet(space, num_classes=2, relaxation="gumbel")
  penalty = nas.make_arch_penalty(space, KNOWN_INPUT, 2, target_bitops=1.0,
                                  resource_weight=0.1)
  step = jax.jit(nas.make_search_step(warmup_steps=50, arch_penalty_fn=penalty))
  steps, batch = 250, 32

  def run(seed: int, wide: bool = True) -> tuple[dict, dict]:
    x, y = known_data(seed, 2 * steps * batch, wide)
    state = nas.create_search_state(model, optax.adam(1e-2), optax.adam(5e-2), KNOWN_INPUT,
                                    seed)
    key = jax.random.PRNGKey(seed)
    for s in range(steps):
      train = slice(s * batch, (s + 1) * batch)
      val = slice((steps + s) * batch, (steps + s + 1) * batch)
      state, metrics = step(state, {"image": x[train], "label": y[train]},
                            {"image": x[val], "label": y[val]}, key)
    return nas.probabilities(state.arch, KNOWN_SPACE), metrics

  return run


def format_mass(probs: dict, block: int, kind: str) -> float:
  formats = probs[f"block_{block}"]["formats"]
  return sum(p for f, p in formats.items() if f.startswith(kind))


@pytest.mark.slow
def test_known_answer_the_wide_range_block_keeps_a_float_format(known_search):
  # Measured: P(float) of block 0 and P(int) of block 1 are both ~0.99 for these seeds.
  for seed in (0, 1, 2):
    probs, metrics = known_search(seed)
    assert format_mass(probs, 0, "float") + format_mass(probs, 0, "bfloat") > 0.9, (seed, probs)
    assert format_mass(probs, 1, "int") > 0.9, (seed, probs)
    assert float(metrics["val_loss"]) < 0.5, (seed, metrics)
  # The control: without the wide odd pixels, block 0 goes to an integer too, so it is the
  # range that kept it float, not its position.
  probs, _ = known_search(0, wide=False)
  assert format_mass(probs, 0, "int") > 0.5, probs


def test_the_retrained_network_computes_in_its_formats():
  space = nas.SearchSpace(min_channels=4, max_channels=4, channel_choices=1, depth_range=(2, 2),
                          kernel_sizes=(3,), ops=("conv",), stem_channels=4,
                          precision_choices=FORMATS)
  images = jnp.ones((2, 8, 8, 1))
  labels = jnp.zeros((2,), jnp.int32)

  def train_step_jaxpr(formats):
    choices = tuple(nas.space.BlockChoice("conv_3x3", 4, True, f) for f in formats)
    model = Supernet(space, num_classes=10, architecture=choices)
    variables = model.init(jax.random.PRNGKey(0), images)

    def loss(params):
      logits = model.apply({"params": params}, images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))

  ints = train_step_jaxpr(("int8", "int4"))
  # Rounding and clipping of kernel and input in each block.
  assert ints.count("round[") >= 4 and "name=clip" in ints
  assert "bf16" not in ints
  floats = train_step_jaxpr(("bfloat16", "float32"))
  assert "round[" not in floats and "new_dtype=bfloat16" in floats
  assert "round[" not in train_step_jaxpr((None, None))  # No format: the run's precision.


@pytest.mark.slow
def test_tiny_digits_precision_config_searches_and_retrains(tmp_path):
  config = digits_dnas_precision.get_config("tiny")
  config.logging.tensorboard = config.logging.progress_bar = config.logging.plots = False
  summary = search_architecture(config, tmp_path / "search")
  assert {"bitops", "model_bytes"} <= set(summary)
  architecture = json.loads((tmp_path / "search" / "architecture.json").read_text())
  assert all(b["format"] in FORMATS for b in architecture["blocks"])
  assert "formats" in (tmp_path / "search" / "probabilities.txt").read_text()
  records = [json.loads(line) for line in
             (tmp_path / "search" / "metrics.jsonl").read_text().splitlines()]
  assert any("expected_bitops" in r and "expected_model_bytes" in r for r in records)
  config.model.architecture = summary["architecture"]
  result = train_and_evaluate(config, tmp_path / "retrain")
  assert result["steps"] == 2
  assert result["model_bytes"] == architecture["model_bytes"]
  assert result["bitops"] == architecture["bitops"]
