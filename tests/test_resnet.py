"""Tests of ResNet-20, the float32-statistics BatchNorm, and the crop/flip augmentation.

References are plain numpy in float64. Variables are built with `jax.eval_shape` and
filled from numpy rather than by running the initialisers: XLA:CPU compiles
`jax.random.normal` anew for every shape, in seconds. Half-precision tolerances use the
unit roundoff u: bfloat16 2^-8 ≈ 3.9e-3, float16 2^-11 ≈ 4.9e-4.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import config as config_lib
from dsjax import precision
from dsjax.data.augment import apply_crop_flip, random_crop_flip, sample_crop_flip
from dsjax.models import registry
from dsjax.models.resnet import ResNet
from dsjax.nn import STATS
from dsjax.nn.norm import BatchNorm
from dsjax.precision import LayerPrecision, PrecisionPlan
from dsjax.train.state import TrainState
from dsjax.train.step import make_train_step
from dsjax.train.tasks import Task

UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}
HALF = [jnp.bfloat16, jnp.float16]
EPS = 1e-5
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet.py"
TINY = {"stage_sizes": (1, 1), "widths": (4, 8)}  # one plain and one stride-2 block
# XLA:CPU spends most of a ResNet compile in LLVM optimisation (a tiny ResNet's backward
# pass: ~7 s at the default level, ~2.5 s at 0); the HLO, and so the arithmetic, is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _fill(path, shape_dtype, rng):
  """What the initialisers give, drawn by numpy: He-normal kernels, BN scale 1/bias 0."""
  name = path[-1].key
  shape, dtype = shape_dtype.shape, shape_dtype.dtype
  if name == "kernel":
    std = np.sqrt(2.0 / np.prod(shape[:-1]))
    return jnp.asarray(rng.normal(0.0, std, shape), dtype)
  if name in ("scale", "var"):
    return jnp.ones(shape, dtype)
  return jnp.zeros(shape, dtype)


def _variables(model, input_shape, seed=0):
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros(input_shape, jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda p, s: _fill(p, s, rng), nn.unbox(shapes))


def _bn_variables(features, seed=0, mean=None, var=None):
  rng = np.random.default_rng(seed)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
                     "bias": jnp.asarray(rng.normal(0.0, 1.0, features), jnp.float32)},
          "batch_stats": {
              "mean": jnp.asarray(rng.normal(0.0, 1.0, features) if mean is None else mean,
                                  jnp.float32),
              "var": jnp.asarray(rng.uniform(0.5, 2.0, features) if var is None else var,
                                 jnp.float32)}}


def _channels_data(shape, seed=0, loc=3.0, scale=2.0):
  """Float32 data whose channels (last axis) have different means and spreads."""
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  return (rng.normal(0.0, 1.0, shape) * scale * rng.uniform(0.5, 2.0, channels)
          + loc * rng.normal(0.0, 1.0, channels)).astype(np.float32)


def _run(module, variables, *args, **kwargs):
  """`module.apply` under jit: one (fast) compile rather than one per eager op."""
  return jax.jit(functools.partial(module.apply, **kwargs),
                 compiler_options=FAST_COMPILE)(variables, *args)


def _numpy_bn(x, scale, bias, mean, var):
  return (x - mean) / np.sqrt(var + EPS) * scale + bias


# ---------------------------------------------------------------- ResNet-20 architecture


def _expected_params(stage_sizes, widths, in_channels=3, num_classes=10):
  """Counts a CIFAR ResNet's parameters by hand from its architecture.

  Bias-free 3x3 convolutions, a BN scale and bias per channel, option-A (parameter-free)
  shortcuts, and a dense classifier with bias.
  """
  conv3 = lambda c_in, c_out: 3 * 3 * c_in * c_out
  bn = lambda c: 2 * c  # scale and bias
  total = conv3(in_channels, widths[0]) + bn(widths[0])
  channels = widths[0]
  for blocks, width in zip(stage_sizes, widths, strict=True):
    for _ in range(blocks):
      total += conv3(channels, width) + bn(width) + conv3(width, width) + bn(width)
      channels = width
  return total + channels * num_classes + num_classes


def test_resnet20_parameter_count():
  model = ResNet()  # (3, 3, 3) blocks at (16, 32, 64) channels
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(nn.unbox(shapes["params"])))
  # 432 + 32 (stem) + 6*(2304 + 32) (stage 1) + (4608 + 5*9216 + 6*64) (stage 2)
  # + (18432 + 5*36864 + 6*128) (stage 3) + 650 (classifier).
  assert count == _expected_params((3, 3, 3), (16, 32, 64)) == 269_722
  assert abs(count - 0.27e6) / 0.27e6 < 0.01  # "0.27M" in He et al., Table 6
  # 19 batch norms (stem + 2 per block): one float32 mean and var per channel.
  stats = jax.tree.leaves(shapes["batch_stats"])
  assert len(stats) == 2 * 19 and all(s.dtype == jnp.float32 for s in stats)
  assert sum(s.size for s in stats) == 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
  # Option A: every parameter is a conv kernel, BN scale/bias, or the classifier.
  conv_kernels = [s.shape for s in jax.tree.leaves(nn.unbox(shapes["params"]))
                  if len(s.shape) == 4]
  assert len(conv_kernels) == 19 and all(k[:2] == (3, 3) for k in conv_kernels)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_resnet20_output_shape_and_dtype(dtype):
  # Shapes and dtypes only (no compile): logits float32, statistics float32 in any dtype.
  model = ResNet(precision=LayerPrecision(dtype))
  images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             images)
  logits, state = jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=["batch_stats", STATS]), variables,
      images)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state["batch_stats"]))
  # Every conv and batch norm sows precision statistics for the adaptive controller.
  assert set(state[STATS]) == {"stem_conv", "stem_bn", "classifier"} | {
      f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)}
  assert set(state[STATS]["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2"}
  eval_logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  assert eval_logits.shape == (4, 10) and eval_logits.dtype == jnp.float32


def _numpy_conv3x3(x, kernel):
  """Stride-1 3x3 convolution with one pixel of zero padding, NHWC x HWIO, float64."""
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))


def test_tiny_resnet_bfloat16_batch_stats_are_float32_and_accurate():
  dtype = jnp.bfloat16
  images = _channels_data((4, 8, 8, 3), loc=0.0, scale=1.0)
  model = ResNet(**TINY, precision=LayerPrecision(dtype))
  variables = _variables(model, images.shape)
  logits, state = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                          compiler_options=FAST_COMPILE)(variables, images)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
  # The stem's batch norm sees the bfloat16 stem conv output; its statistics follow the
  # float64 ones to within the rounding of the conv's inputs, kernel and output (~3u).
  conv = _numpy_conv3x3(_f64(images), _f64(variables["params"]["stem_conv"]["kernel"]))
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  stats = jax.tree.map(_f64, state["batch_stats"]["stem_bn"])
  u, scale = UNIT_ROUNDOFF[dtype], np.abs(conv).max(axis=(0, 1, 2))
  np.testing.assert_array_less(np.abs(stats["mean"] - 0.1 * mean), 0.1 * 3 * u * scale)
  np.testing.assert_array_less(np.abs(stats["var"] - (0.9 + 0.1 * var)),
                               0.1 * 2 * 3 * u * scale * np.sqrt(var) + 1e-6)
  # Every running average moved from its initial value.
  init = jax.tree.leaves(variables["batch_stats"])
  assert all(not np.allclose(a, b)
             for a, b in zip(init, jax.tree.leaves(state["batch_stats"]), strict=True))


def test_eval_mode_output_depends_only_on_each_example():
  model = ResNet(**TINY)
  images = _channels_data((4, 8, 8, 3), loc=0.0, scale=1.0)
  variables = _variables(model, images.shape)
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.25, variables["batch_stats"])
  others = images.copy()
  others[1:] = _channels_data((3, 8, 8, 3), seed=1, loc=5.0, scale=3.0)
  # Both batches in one compiled program: vmap over the two.
  apply = jax.jit(jax.vmap(functools.partial(model.apply, variables, train=False)),
                  compiler_options=FAST_COMPILE)
  a, b = apply(np.stack([images, others]))
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[1:], b[1:])


def test_registry_entry_and_config_file():
  spec = registry.get_spec("resnet20")
  assert (spec.dataset, spec.config_file, spec.task) == ("cifar10", "cifar10_resnet.py",
                                                         "classification")
  assert spec.defaults == {"stage_sizes": (3, 3, 3), "widths": (16, 32, 64),
                           "matmul_impl": "xla"}
  defaults = config_lib.with_model_defaults(config_lib.base_config(), "resnet20").model
  assert list(spec.check(defaults)) == []
  bad = config_lib.with_model_defaults(config_lib.base_config(), "resnet20").model
  bad.stage_sizes, bad.widths, bad.matmul_impl = (3, 0), (32, 16, 8), "cuda"
  problems = " ".join(spec.check(bad))
  for word in ("stage_sizes", "non-decreasing", "same length", "matmul_impl"):
    assert word in problems
  model = spec.build(defaults, 10, jnp.bfloat16, PrecisionPlan())
  assert isinstance(model, ResNet) and model.widths == (16, 32, 64)
  assert model.precision.compute_dtype == jnp.bfloat16

  module_spec = importlib.util.spec_from_file_location(CONFIG.stem, CONFIG)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for arg in (None, "tiny"):
    config = module.get_config(arg)
    config_lib.validate(config)
    assert config.model.name == "resnet20" and config.data.name == "cifar10"
    assert config.data.augment is True
    assert (config.optimizer.name, config.optimizer.learning_rate,
            config.optimizer.schedule, config.optimizer.weight_decay) == (
                "momentum", 0.1, "cosine", 5e-4)
  assert config.train.batch_size == 8 and config.train.steps == 2
  assert module.get_config().train.batch_size == 128


def test_sgd_steps_lower_the_loss():
  """The real train step: batch_stats are model state, updated every step."""
  model_config = config_lib.with_model_defaults(config_lib.base_config(), "resnet20").model
  model_config.update(TINY)
  model = registry.get_spec("resnet20").build(model_config, 10, jnp.float32)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(0.0, 1.0, (8, 8, 8, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  variables = _variables(model, (1, 8, 8, 3))
  params = variables.pop("params")
  tx = optax.sgd(0.05, momentum=0.9)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                     opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)),
                     loss_scale=precision.NoOpLossScale(), grad_sync=None, pending_grads=None,
                     apply_fn=model.apply, tx=tx)
  step = jax.jit(make_train_step(Task("classification"), 1, lambda s: 0.05),
                 compiler_options=FAST_COMPILE)
  first_stats = state.model_state
  losses = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  # Memorising one batch: the loss falls at every step (momentum 0.9, small steps).
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.7 * losses[0], losses
  new_stats = jax.tree.leaves(state.model_state["batch_stats"])
  assert all(s.dtype == jnp.float32 for s in new_stats)
  assert all(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(first_stats["batch_stats"]), new_stats, strict=True))


# ---------------------------------------------------------------- BatchNorm


def test_batch_norm_train_normalises_and_updates_running_stats():
  x = _channels_data((6, 3, 3, 5))
  variables = _bn_variables(5)
  bn = BatchNorm(momentum=0.8)
  y, state = _run(bn, variables, x, use_running_average=False, mutable=["batch_stats"])
  ref = _f64(x)
  mean, var = ref.mean(axis=(0, 1, 2)), ref.var(axis=(0, 1, 2))  # biased, as normalised
  params = jax.tree.map(_f64, variables["params"])
  np.testing.assert_allclose(_f64(y), _numpy_bn(ref, params["scale"], params["bias"], mean,
                                                var), rtol=1e-5, atol=1e-5)
  old = jax.tree.map(_f64, variables["batch_stats"])
  new = state["batch_stats"]
  assert new["mean"].dtype == new["var"].dtype == jnp.float32
  np.testing.assert_allclose(_f64(new["mean"]), 0.8 * old["mean"] + 0.2 * mean, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(_f64(new["var"]), 0.8 * old["var"] + 0.2 * var, rtol=1e-6)

  # Without scale and bias, each channel of the output has mean 0 and variance 1.
  plain = BatchNorm(use_scale=False, use_bias=False)
  y, state = _run(plain, {"batch_stats": variables["batch_stats"]}, x,
                  use_running_average=False, mutable=["batch_stats"])
  y = _f64(y)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(y.var(axis=(0, 1, 2)), var / (var + EPS), rtol=1e-5)
  np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)
  # A second step moves the averages again from where the first left them (momentum 0.9).
  x2 = _channels_data((6, 3, 3, 5), seed=1)
  _, state2 = _run(plain, state, x2, use_running_average=False, mutable=["batch_stats"])
  mean2, var2 = _f64(x2).mean(axis=(0, 1, 2)), _f64(x2).var(axis=(0, 1, 2))
  first = jax.tree.map(_f64, state["batch_stats"])
  np.testing.assert_allclose(_f64(state2["batch_stats"]["mean"]),
                             0.9 * first["mean"] + 0.1 * mean2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_f64(state2["batch_stats"]["var"]),
                             0.9 * first["var"] + 0.1 * var2, rtol=1e-6)


def test_batch_norm_init_creates_float32_stats_without_updating():
  bn = BatchNorm(param_dtype=jnp.bfloat16, precision=LayerPrecision(jnp.float16))
  variables = jax.jit(functools.partial(bn.init, use_running_average=False))(
      jax.random.key(0), jnp.full((2, 4), 7.0, jnp.float16))
  assert variables["params"]["scale"].dtype == jnp.bfloat16
  stats = variables["batch_stats"]
  assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
  np.testing.assert_array_equal(stats["mean"], 0.0)
  np.testing.assert_array_equal(stats["var"], 1.0)
  assert STATS not in variables


def test_batch_norm_variance_is_two_pass():
  # |mean| / std = 1e4: E[x²] - E[x]² in float32 would lose every digit of the variance.
  x = (1000.0 + 0.1 * np.random.default_rng(0).normal(size=(64, 3))).astype(np.float32)
  _, state = _run(BatchNorm(), _bn_variables(3, mean=0.0, var=0.0), x,
                  use_running_average=False, mutable=["batch_stats"])
  ref = _f64(x)
  np.testing.assert_allclose(_f64(state["batch_stats"]["var"]) / 0.1, ref.var(axis=0),
                             rtol=1e-3)
  np.testing.assert_allclose(_f64(state["batch_stats"]["mean"]) / 0.1, ref.mean(axis=0),
                             rtol=2e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_batch_norm_half_compute_keeps_float32_statistics(dtype):
  x32 = _channels_data((8, 4, 4, 6), loc=20.0, scale=4.0)
  x_half = jnp.asarray(x32, dtype)  # as a half-precision conv would hand it over
  variables = _bn_variables(6)

  def run(compute_dtype, x):
    return _run(BatchNorm(precision=LayerPrecision(compute_dtype)), variables, x,
                use_running_average=False, mutable=["batch_stats"])

  y, state = run(dtype, x_half)
  assert y.dtype == dtype
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
  # Same (rounded) inputs in a float32 layer: the statistics are the same float32 numbers.
  _, same_inputs = run(jnp.float32, x_half.astype(jnp.float32))
  for name in ("mean", "var"):
    np.testing.assert_allclose(state["batch_stats"][name], same_inputs["batch_stats"][name],
                               rtol=1e-6)
  # Against the float32 run on unrounded inputs: only the input rounding differs.
  y32, ref = run(jnp.float32, x32)
  # Rounding moves each input by at most u|x|: the mean by at most u max|x|, the variance
  # by at most about 2 u max|x| std. Running averages take a tenth of either.
  u = UNIT_ROUNDOFF[dtype]
  bound = u * np.abs(x32).max(axis=(0, 1, 2))
  std = x32.std(axis=(0, 1, 2))
  for name, tol in (("mean", 0.1 * bound), ("var", 0.1 * (2 * bound * std + bound**2))):
    np.testing.assert_array_less(
        np.abs(_f64(state["batch_stats"][name]) - _f64(ref["batch_stats"][name])), tol)
  np.testing.assert_allclose(_f64(y), _f64(y32), atol=8 * u * np.abs(_f64(y32)).max())


def test_batch_norm_float16_statistics_do_not_overflow():
  # Squares of ~300 exceed float16's 65504: a float16 variance would be inf.
  x = jnp.asarray(300.0 + 50.0 * np.random.default_rng(0).normal(size=(32, 4)), jnp.float16)
  y, state = _run(BatchNorm(precision=LayerPrecision(jnp.float16)),
                  _bn_variables(4, mean=0.0, var=1.0),
                  x, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == jnp.float16 and np.all(np.isfinite(_f64(y)))
  ref = _f64(x)
  np.testing.assert_allclose((_f64(state["batch_stats"]["var"]) - 0.9) / 0.1, ref.var(axis=0),
                             rtol=1e-4)


def test_batch_norm_eval_uses_running_stats_per_example():
  x = _channels_data((5, 2, 2, 3))
  variables = _bn_variables(3)
  bn = BatchNorm()
  y = _run(bn, variables, x, use_running_average=True)  # batch_stats need not be mutable
  v = jax.tree.map(_f64, variables)
  np.testing.assert_allclose(_f64(y), _numpy_bn(_f64(x), v["params"]["scale"],
                                                v["params"]["bias"], v["batch_stats"]["mean"],
                                                v["batch_stats"]["var"]), rtol=1e-5, atol=1e-5)
  for i in range(len(x)):
    np.testing.assert_allclose(_run(bn, variables, x[i:i + 1], use_running_average=True)[0],
                               y[i], rtol=1e-6, atol=1e-6)
  _, state = _run(bn, variables, x, use_running_average=True, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])


def test_batch_norm_cross_replica_statistics():
  x = _channels_data((8, 3, 3, 4))
  variables = _bn_variables(4)
  whole_y, whole = _run(BatchNorm(), variables, x, use_running_average=False,
                        mutable=["batch_stats"])
  sharded = jax.jit(jax.vmap(
      lambda shard: BatchNorm(axis_name="replica").apply(
          variables, shard, use_running_average=False, mutable=["batch_stats"]),
      axis_name="replica"), compiler_options=FAST_COMPILE)
  y, states = sharded(x.reshape(2, 4, 3, 3, 4))  # two replicas of four examples
  for name in ("mean", "var"):
    for replica in range(2):
      np.testing.assert_allclose(states["batch_stats"][name][replica],
                                 whole["batch_stats"][name], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y.reshape(x.shape), whole_y, rtol=1e-5, atol=1e-5)


def test_batch_norm_plan_stats_and_param_axes():
  x = jnp.asarray(_channels_data((4, 2, 2, 3)), jnp.bfloat16)
  variables = _bn_variables(3)
  promoted = BatchNorm(precision=LayerPrecision(jnp.bfloat16, PrecisionPlan().promote("")))
  y, mutated = _run(promoted, variables, x, use_running_average=False,
                    mutable=["batch_stats", STATS])
  assert y.dtype == jnp.float32
  assert set(mutated[STATS]) == {"max_abs", "nonfinite", "input_nonfinite", "matmul_flops"}
  np.testing.assert_allclose(mutated[STATS]["max_abs"][0], np.abs(_f64(y)).max(), rtol=1e-6)

  plain = jax.eval_shape(functools.partial(BatchNorm().init, use_running_average=False),
                         jax.random.key(0), x)
  assert not isinstance(plain["params"]["scale"], nn.Partitioned)
  boxed = jax.eval_shape(
      functools.partial(BatchNorm(param_axis="conv_out").init, use_running_average=False),
      jax.random.key(0), x)
  for name in ("scale", "bias"):
    assert boxed["params"][name].names == ("conv_out",)


# ---------------------------------------------------------------- augmentation


def _numpy_crop_flip(images, offsets, flips, padding):
  images, offsets, flips = np.asarray(images), np.asarray(offsets), np.asarray(flips)
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = np.empty_like(images)
  for i in range(n):
    r, c = offsets[i]
    crop = padded[i, r:r + h, c:c + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


@functools.partial(jax.jit, static_argnames="padding", compiler_options=FAST_COMPILE)
def _augment_all_ways(rng, images, padding=4):
  """The draws, their application, and the composed function: one compiled program."""
  offsets, flips = sample_crop_flip(rng, images.shape[0], padding=padding)
  return (offsets, flips, apply_crop_flip(images, offsets, flips, padding=padding),
          random_crop_flip(rng, images, padding=padding))


def test_crop_flip_matches_numpy():
  images = np.random.default_rng(0).normal(size=(16, 8, 6, 3)).astype(np.float32)
  offsets, flips, applied, composed = _augment_all_ways(jax.random.key(3), images)
  assert offsets.shape == (16, 2) and offsets.dtype == jnp.int32
  assert flips.shape == (16,) and flips.dtype == jnp.bool_
  want = _numpy_crop_flip(images, offsets, flips, 4)
  np.testing.assert_array_equal(applied, want)
  np.testing.assert_array_equal(composed, want)  # random_crop_flip makes the same draws
  np.testing.assert_array_equal(_augment_all_ways(jax.random.key(3), images)[3], want)
  assert not np.array_equal(_augment_all_ways(jax.random.key(4), images)[3], want)
  # Eagerly, outside jit, the result is the same.
  np.testing.assert_array_equal(apply_crop_flip(images, offsets, flips), want)


def test_crop_flip_keeps_shape_and_dtype():
  values = np.random.default_rng(0).integers(1, 200, (4, 32, 32, 3))
  batches = [jnp.asarray(values, dtype) for dtype in (jnp.float32, jnp.bfloat16, jnp.uint8)]
  outs = jax.jit(lambda rng, xs: [random_crop_flip(rng, x) for x in xs],
                 compiler_options=FAST_COMPILE)(jax.random.key(0), batches)
  for images, out in zip(batches, outs, strict=True):
    assert out.shape == images.shape and out.dtype == images.dtype
    # Every output pixel is an input pixel or padding zero.
    assert set(np.unique(np.asarray(out, np.float32))) <= set(
        np.unique(np.asarray(images, np.float32))) | {0.0}
  # Same draws whatever the dtype: the crops agree.
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[2], np.float32))


def test_crop_flip_draw_statistics():
  draw = jax.jit(sample_crop_flip, static_argnums=1, static_argnames="padding")
  offsets, flips = draw(jax.random.key(1), 20_000, padding=4)
  assert abs(float(np.mean(flips)) - 0.5) < 0.02  # 5.7 sigma
  counts = np.bincount(np.asarray(offsets).ravel(), minlength=9)
  assert len(counts) == 9 and counts.min() > 0.8 * counts.mean()  # uniform on 0..8
  # The draws are per example: row and column offsets are not tied to each other.
  assert np.mean(offsets[:, 0] == offsets[:, 1]) < 0.2


def test_crop_flip_rejects_bad_inputs():
  with pytest.raises(ValueError, match="NHWC"):
    random_crop_flip(jax.random.key(0), jnp.zeros((4, 8, 8)))
  with pytest.raises(ValueError, match="padding"):
    random_crop_flip(jax.random.key(0), jnp.zeros((4, 8, 8, 3)), padding=-1)
