"""Tests of precision policies, loss scaling and skipping of non-finite steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dsjax import precision
from dsjax.errors import ConfigError
from dsjax.precision import (
    DynamicLossScale,
    NoOpLossScale,
    Policy,
    all_finite,
    dynamic_loss_scale,
    get_policy,
    loss_scale_for,
    needs_loss_scaling,
    parse_policy,
    select_tree,
)

F32, F16, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)


# --- Policy -------------------------------------------------------------------------------


def test_cast_round_trip_within_bf16_rounding():
  policy = parse_policy("p=f32,c=bf16,o=f32")
  x = jax.random.normal(jax.random.key(0), (64,), jnp.float32)
  tree = {"w": x, "nested": ({"b": x * 3},)}
  low = policy.cast_to_compute(tree)
  assert low["w"].dtype == BF16 and low["nested"][0]["b"].dtype == BF16
  back = policy.cast_to_output(low)
  assert back["w"].dtype == F32
  # bfloat16 keeps 8 significand bits: relative rounding error at most 2**-8.
  np.testing.assert_allclose(back["w"], x, rtol=2.0**-8)
  np.testing.assert_allclose(back["nested"][0]["b"], x * 3, rtol=2.0**-8)
  assert policy.cast_to_param(low)["w"].dtype == F32


def test_cast_leaves_non_float_leaves_untouched():
  policy = get_policy("fp16")
  ints, bools = jnp.arange(3, dtype=jnp.int32), jnp.array([True, False])
  key, legacy_key = jax.random.key(0), jax.random.PRNGKey(0)
  tree = {"f": np.ones(2, np.float32), "ints": ints, "pair": (bools, None),
          "keys": [key, legacy_key], "python": 1.5}
  out = policy.cast_to_compute(tree)
  assert jax.tree.structure(out, is_leaf=lambda x: x is None) == jax.tree.structure(
      tree, is_leaf=lambda x: x is None)
  assert out["f"].dtype == F16
  assert out["ints"] is ints and out["pair"][0] is bools and out["pair"][1] is None
  assert out["keys"][0] is key and out["keys"][1] is legacy_key
  assert out["python"] == 1.5
  assert policy.cast_to_compute(None) is None


def test_policy_is_hashable_and_normalises_dtypes():
  policy = Policy(jnp.float32, jnp.bfloat16, jnp.float32)
  assert policy == get_policy("bf16") and hash(policy) == hash(get_policy("bf16"))
  assert policy.compute_dtype == BF16 and isinstance(policy.compute_dtype, np.dtype)
  assert str(policy.with_output_dtype(jnp.bfloat16)) == "p=f32,c=bf16,o=bf16"
  assert str(policy) == "p=f32,c=bf16,o=f32"  # with_output_dtype made a copy
  with pytest.raises(ConfigError, match="floating dtype"):
    Policy(jnp.float32, jnp.int32, jnp.float32)


@pytest.mark.parametrize("text, canonical", [
    ("p=f32,c=bf16,o=f32", "p=f32,c=bf16,o=f32"),
    ("c=bf16", "p=f32,c=bf16,o=f32"),
    ("p=f32,c=f16,o=f32", "p=f32,c=f16,o=f32"),
    ("params=float32, compute=half, output=bfloat16", "p=f32,c=f16,o=bf16"),
    ("o=f64,c=float16", "p=f32,c=f16,o=f64"),
    ("C=BF16", "p=f32,c=bf16,o=f32"),
])
def test_parse_policy_canonical_round_trip(text, canonical):
  policy = parse_policy(text)
  assert str(policy) == canonical
  assert parse_policy(str(policy)) == policy


@pytest.mark.parametrize("name, platform, compute", [
    ("fp32", "cpu", F32), ("bf16", "gpu", BF16), ("fp16", "tpu", F16),
    ("mixed", "gpu", F16), ("mixed", "cpu", BF16), ("mixed", "tpu", BF16),
    ("p=f32,c=f16,o=f32", "tpu", F16),
])
def test_presets(name, platform, compute):
  policy = get_policy(name, platform)
  assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (F32, compute, F32)
  assert needs_loss_scaling(policy) == (compute == F16)


def test_mixed_defaults_to_backend_and_compute_dtype_unchanged():
  assert get_policy("mixed") == get_policy("mixed", jax.default_backend())
  expected = {"fp32": F32, "bf16": BF16, "fp16": F16}
  for preset, dtype in expected.items():
    assert precision.compute_dtype(preset) == dtype
  assert precision.compute_dtype("mixed", "gpu") == F16
  assert precision.compute_dtype("mixed", "cpu") == BF16
  with pytest.raises(ValueError, match="unknown precision 'fp8'"):
    precision.compute_dtype("fp8")


def test_presets_say_what_they_turn_on_not_their_names():
  assert precision.PRESETS == ("fp32", "bf16", "fp16", "mixed")
  assert [precision.get_preset(name).adaptive for name in precision.PRESETS] == [
      False, False, False, True]
  assert precision.get_preset("p=f32,c=bf16,o=f32") is None
  mixed = precision.get_preset("mixed")
  assert mixed.policy_on("gpu") == get_policy("mixed", "gpu") == parse_policy("c=f16")
  assert mixed.policy_on("cpu") == parse_policy("c=bf16")


@pytest.mark.parametrize("policy, adaptive, enabled", [
    ("mixed", None, True), ("bf16", None, False), ("fp16", None, False),
    ("c=bf16", None, False), ("fp16", True, True), ("mixed", False, False),
    ("fp32", True, False), ("p=f32,c=f32,o=f32", True, False),  # Nothing to adapt.
])
def test_controller_enabled_asks_the_preset(policy, adaptive, enabled):
  config = ml_collections.ConfigDict({"policy": policy, "adaptive": adaptive})
  assert precision.controller_enabled(config) == enabled


@pytest.mark.parametrize("text, message", [
    ("", "empty precision policy"),
    ("   ", "empty precision policy"),
    ("x=f32", "unknown key 'x'"),
    ("c=fp8", "unknown dtype 'fp8'"),
    ("c=f16,compute=bf16", "compute_dtype is given twice"),
    ("c=bf16,", "is not key=dtype"),
    ("bf16", "is not key=dtype"),
    ("fp8", "is not key=dtype"),
])
def test_bad_policy_strings(text, message):
  with pytest.raises(ConfigError, match=message) as info:
    parse_policy(text)
  assert "keys: p/params, c/compute, o/output" in str(info.value)
  assert "bf16/bfloat16" in str(info.value)
  if text != "bf16":  # a preset name, which only get_policy accepts
    with pytest.raises(ConfigError, match=message):
      get_policy(text, "cpu")


# --- Loss scaling -------------------------------------------------------------------------


def _train_step(optimizer):
  """A jitted train-like step; `poison` (0, inf or nan) is added to every gradient."""

  @jax.jit
  def step(params, opt_state, loss_scale, poison):
    def loss_fn(p):
      return loss_scale.scale(jnp.sum((p["w"] * 2.0 - 1.0) ** 2) + jnp.sum(p["b"]))

    grads = loss_scale.unscale(jax.grad(loss_fn)(params))
    grads = jax.tree.map(lambda g: g + poison, grads)
    finite = all_finite(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
    return params, opt_state, loss_scale.adjust(finite)

  return step


@pytest.mark.parametrize("make_scale", [dynamic_loss_scale, NoOpLossScale],
                         ids=["dynamic", "noop"])
def test_non_finite_step_is_skipped_bit_for_bit(make_scale):
  optimizer = optax.adam(1e-2)
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32), "b": jnp.ones(2, jnp.float32)}
  opt_state = optimizer.init(params)
  scale = make_scale()
  step = _train_step(optimizer)
  params, opt_state, scale = step(params, opt_state, scale, 0.0)
  assert int(scale.skipped_steps) == 0 and int(scale.good_steps) == 1
  for skipped, poison in enumerate([np.inf, np.nan, -np.inf], start=1):
    before_scale = float(scale.loss_scale)
    new_params, new_opt_state, scale = step(params, opt_state, scale, poison)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    jax.tree.map(np.testing.assert_array_equal, new_opt_state, opt_state)
    expected = before_scale / 2 if isinstance(scale, DynamicLossScale) else 1.0
    assert float(scale.loss_scale) == expected
    assert int(scale.skipped_steps) == skipped and int(scale.good_steps) == 0
  # A finite step after the skips still updates.
  new_params, _, scale = step(params, opt_state, scale, 0.0)
  assert not np.array_equal(new_params["w"], params["w"])
  assert int(scale.good_steps) == 1 and int(scale.skipped_steps) == 3


def test_growth_exactly_after_growth_interval():
  scale = dynamic_loss_scale(8.0, growth_interval=3)
  for good in (1, 2):
    scale = scale.adjust(jnp.array(True))
    assert float(scale.loss_scale) == 8.0 and int(scale.good_steps) == good
  scale = scale.adjust(jnp.array(True))
  assert float(scale.loss_scale) == 16.0 and int(scale.good_steps) == 0
  scale = scale.adjust(True).adjust(True).adjust(False)  # an overflow resets the run
  assert float(scale.loss_scale) == 8.0 and int(scale.good_steps) == 0
  assert int(scale.skipped_steps) == 1
  assert scale.loss_scale.dtype == F32 and scale.good_steps.dtype == jnp.int32


@pytest.mark.parametrize("finite, growth_interval, expected", [
    (False, 2000, 1.0), (True, 1, 2.0**24)], ids=["all-overflow", "all-finite"])
def test_scale_is_clamped_after_5000_steps(finite, growth_interval, expected):
  scale = dynamic_loss_scale(growth_interval=growth_interval)
  scale = jax.jit(lambda s: jax.lax.fori_loop(0, 5000, lambda i, s: s.adjust(finite), s))(
      scale)
  assert float(scale.loss_scale) == expected and np.isfinite(scale.loss_scale)
  assert int(scale.skipped_steps) == (0 if finite else 5000)


def _config(scale: DynamicLossScale) -> tuple:
  return (scale.growth_interval, scale.growth_factor, scale.backoff_factor, scale.min_scale,
          scale.max_scale)


CUSTOM = dict(growth_interval=7, growth_factor=3.0, backoff_factor=0.25, min_scale=4.0,
              max_scale=2.0**20)


def test_static_config_survives_jit_flatten_and_checkpoint(tmp_path):
  scale = dynamic_loss_scale(1024.0, **CUSTOM)
  expected = (7, 3.0, 0.25, 4.0, 2.0**20)
  assert _config(scale) == expected
  leaves, treedef = jax.tree.flatten(scale)
  assert len(leaves) == 3  # only the arrays are leaves
  assert _config(jax.tree.unflatten(treedef, leaves)) == expected

  jitted = jax.jit(lambda s: s.adjust(False))(scale)
  assert _config(jitted) == expected and float(jitted.loss_scale) == 256.0

  path = tmp_path / "loss_scale"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, jitted)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, dynamic_loss_scale(1024.0, **CUSTOM))
  assert isinstance(restored, DynamicLossScale) and _config(restored) == expected
  assert float(restored.loss_scale) == 256.0 and int(restored.skipped_steps) == 1
  # The restored min_scale still clamps.
  assert float(restored.adjust(False).adjust(False).adjust(False).loss_scale) == 4.0


def test_fp16_gradient_underflow_recovered_by_scaling():
  a, b = np.float16(1e-4), np.float16(1e-4)

  def loss_fn(w):
    # float32 master weight, float16 compute: d loss / d w = a * b ~ 1e-8, below float16's
    # smallest subnormal (6e-8), so the unscaled float16 backward pass flushes it to 0.
    w16 = w.astype(jnp.float16)
    return jnp.sum((w16 * a) * b)

  w = jnp.ones(4, jnp.float32)
  reference = np.float64(a) * np.float64(b)
  assert float(jax.grad(loss_fn)(w)[0]) == 0.0

  scale = dynamic_loss_scale(2.0**15)
  grads = scale.unscale(jax.grad(lambda w: scale.scale(loss_fn(w)))(w))
  assert grads.dtype == F32
  assert np.all(grads != 0)
  np.testing.assert_allclose(np.asarray(grads, np.float64), reference, rtol=2.0**-10)


def test_unscale_keeps_dtypes_and_scale_is_float32():
  scale = dynamic_loss_scale(4.0)
  grads = {"h": jnp.full(3, 8.0, jnp.float16), "b": jnp.full(2, 8.0, jnp.bfloat16),
           "f": jnp.full(2, 8.0, jnp.float32), "i": jnp.arange(2), "n": None}
  out = scale.unscale(grads)
  for name in ("h", "b", "f"):
    assert out[name].dtype == grads[name].dtype
    np.testing.assert_array_equal(np.asarray(out[name], np.float32), 2.0)
  assert out["i"] is grads["i"] and out["n"] is None
  scaled = scale.scale(jnp.float16(3.0))
  assert scaled.dtype == F32 and float(scaled) == 12.0
  noop = NoOpLossScale()
  assert noop.unscale(grads) is grads and float(noop.loss_scale) == 1.0


def test_all_finite_and_select_tree():
  ok = {"a": jnp.ones(3), "i": jnp.arange(3), "k": jax.random.key(0), "n": None,
        "h": jnp.ones(2, jnp.float16)}
  assert bool(all_finite(ok)) and bool(all_finite({}))
  assert not bool(all_finite({**ok, "h": jnp.array([1.0, np.inf], jnp.float16)}))
  assert not bool(all_finite({**ok, "a": jnp.array([np.nan, 0.0, 1.0])}))
  other = jax.tree.map(lambda x: x, ok)
  picked = select_tree(jnp.array(False), ok, {**other, "a": jnp.zeros(3)})
  np.testing.assert_array_equal(picked["a"], 0.0)
  assert picked["n"] is None
  with pytest.raises(ValueError, match="scalar predicate"):
    select_tree(jnp.array([True, False]), ok, ok)


def test_loss_scale_for_policies_and_config_errors():
  assert isinstance(loss_scale_for(get_policy("fp16")), DynamicLossScale)
  assert isinstance(loss_scale_for(get_policy("mixed", "gpu"), **CUSTOM), DynamicLossScale)
  for name in ("fp32", "bf16"):
    assert isinstance(loss_scale_for(get_policy(name), **CUSTOM), NoOpLossScale)
  with pytest.raises(ConfigError, match="unknown key.*growth_intervall"):
    loss_scale_for(get_policy("fp32"), growth_intervall=10)
  # Bad values fail under every policy, not only once float16 is switched on.
  with pytest.raises(ConfigError, match="backoff_factor must be in"):
    loss_scale_for(get_policy("bf16"), backoff_factor=1.5)


@pytest.mark.parametrize("config, message", [
    (dict(initial_scale=0.5), "initial_scale must be in"),
    (dict(initial_scale=2.0**30), "initial_scale must be in"),
    (dict(growth_factor=1.0), "growth_factor must be > 1"),
    (dict(backoff_factor=0.0), "backoff_factor must be in"),
    (dict(growth_interval=0), "growth_interval must be an integer >= 1"),
    (dict(growth_interval=2.5), "growth_interval must be an integer >= 1"),
    (dict(min_scale=0.0, initial_scale=1.0), "min_scale must be > 0"),
    (dict(max_scale=float("inf")), "max_scale must be a finite number"),
    (dict(max_scale=1e39), "max_scale must be in"),
])
def test_dynamic_loss_scale_validates_config(config, message):
  with pytest.raises(ConfigError, match=message):
    dynamic_loss_scale(**config)
