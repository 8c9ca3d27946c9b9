"""Tests of dsjax.precision.plan: per-layer plans and the LayerPrecision models hand layers."""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import nn as dsnn
from dsjax import precision
from dsjax.nn import Dense
from dsjax.precision import LayerPrecision, PrecisionPlan


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.0, shape), jnp.float32)


def test_plan_choices_and_immutability():
  plan = PrecisionPlan()
  assert plan.choice("a/b") == "half" and plan.promoted() == ()
  promoted = plan.promote("enc/layer_1/attention").promote("enc/layer_0/mlp")
  assert plan.promoted() == ()  # unchanged
  assert promoted.promoted() == ("enc/layer_0/mlp", "enc/layer_1/attention")
  assert promoted.choice("enc/layer_0/mlp") == "fp32"
  assert promoted.choice("enc/layer_0/mlp/fc") == "half"  # exact paths, no inheritance
  demoted = promoted.demote("enc/layer_0/mlp")
  assert demoted.promoted() == ("enc/layer_1/attention",)
  assert demoted.choice("enc/layer_0/mlp") == "half"
  assert PrecisionPlan(default="fp32").choice("anything") == "fp32"


def test_plan_hash_equality_and_validation():
  a = PrecisionPlan((("x", "fp32"), ("y", "half")))
  b = PrecisionPlan().demote("y").promote("x")
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  assert a != a.demote("x")
  with pytest.raises(ValueError, match="precision choice"):
    PrecisionPlan((("x", "bf16"),))
  with pytest.raises(ValueError, match="precision choice"):
    PrecisionPlan(default="float32")
  with pytest.raises(ValueError, match="precision choice"):
    PrecisionPlan.from_dict({"layers": {"x": "FP32"}})
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.default = "fp32"


def test_plan_dict_round_trip_through_json():
  plan = PrecisionPlan().promote("a/b").demote("c").promote("d")
  data = json.loads(json.dumps(plan.to_dict()))
  assert data == {"default": "half", "layers": {"a/b": "fp32", "c": "half", "d": "fp32"}}
  assert PrecisionPlan.from_dict(data) == plan
  assert PrecisionPlan.from_dict({}) == PrecisionPlan()


def test_plan_as_static_field_shares_the_jit_cache():
  @functools.partial(jax.jit, static_argnums=0)
  def run(model, variables, x):
    return model.apply(variables, x)

  x = _rand((2, 3))
  first = Dense(4, precision=LayerPrecision(jnp.bfloat16, PrecisionPlan().promote("")))
  second = Dense(4, precision=LayerPrecision(jnp.bfloat16, PrecisionPlan((("", "fp32"),))))
  variables = first.init(jax.random.key(0), x)
  assert run(first, variables, x).dtype == jnp.float32
  assert run(second, variables, x).dtype == jnp.float32
  assert run._cache_size() == 1
  assert run(Dense(4, precision=LayerPrecision(jnp.bfloat16, PrecisionPlan())), variables,
             x).dtype == jnp.bfloat16
  assert run._cache_size() == 2


def test_plan_lives_in_precision_only():
  from dsjax.precision import plan as plan_module  # noqa: PLC0415

  assert precision.PrecisionPlan is plan_module.PrecisionPlan
  assert not hasattr(dsnn, "PrecisionPlan") and not hasattr(dsnn, "layer_dtype")
  assert (precision.HALF, precision.FP32, precision.CHOICES) == ("half", "fp32", ("half", "fp32"))
  with pytest.raises(ImportError):
    __import__("dsjax.nn.plan")


def test_layer_precision_is_frozen_hashable_and_normalises_its_dtype():
  plan = PrecisionPlan().promote("fc")
  a = LayerPrecision(jnp.bfloat16, plan, "pallas")
  b = LayerPrecision(np.dtype("bfloat16"), PrecisionPlan((("fc", "fp32"),)), "pallas")
  assert a == b and hash(a) == hash(b) and isinstance(a.compute_dtype, np.dtype)
  assert LayerPrecision() == LayerPrecision(jnp.float32, None, "xla")
  assert a.replace(matmul_impl="xla") == LayerPrecision(jnp.bfloat16, plan)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.plan = None


class _TwoLayers(nn.Module):
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, x):
    return Dense(3, precision=self.precision, name="fc")(Dense(4, precision=self.precision,
                                                                name="first")(x))


def test_layer_precision_gives_each_layer_its_dtype_by_path():
  x = _rand((2, 5))
  half = _TwoLayers(LayerPrecision(jnp.float16))
  variables = half.init(jax.random.key(0), x)
  assert half.apply(variables, x).dtype == jnp.float16
  promoted = half.clone(precision=half.precision.replace(plan=PrecisionPlan().promote("fc")))
  assert promoted.apply(variables, x).dtype == jnp.float32
  _, captured = promoted.apply(variables, x, capture_intermediates=True,
                               mutable=["intermediates"])
  outputs = captured["intermediates"]
  assert outputs["first"]["__call__"][0].dtype == jnp.float16
  assert outputs["fc"]["__call__"][0].dtype == jnp.float32
