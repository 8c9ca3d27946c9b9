"""DNAS ops, each declared once: its module, cost formulas and derived form agree."""

import jax
import jax.numpy as jnp
import pytest

from dsjax import nas
from dsjax.errors import ConfigError
from dsjax.models import supernet
from dsjax.nas import ops


def _count(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def test_an_op_without_a_cost_formula_cannot_be_declared():
  flops = lambda k, c_in, c_out, out_hw: 0 * c_out
  params = lambda k, c_in, c_out, batch_norm: 0 * c_out
  with pytest.raises(ValueError, match="op 'pool' declares no flops formula"):
    ops.OpSpec("pool", lambda op, x, k, train: x, params=params)
  with pytest.raises(ValueError, match="op 'pool' declares no params formula"):
    ops.OpSpec("pool", lambda op, x, k, train: x, flops=flops)
  with pytest.raises(ValueError, match="registered twice"):
    ops.register_op(ops.OpSpec("conv", lambda op, x, k, train: x, flops=flops, params=params))


def test_an_unknown_op_is_an_error_not_zero_flops():
  with pytest.raises(ConfigError, match="unknown DNAS op 'pool'; known ops: conv, sep_conv, "
                                        "identity, zero"):
    nas.op_cost("pool", 8, 8, 16)
  with pytest.raises(ConfigError, match="ops must be a non-empty subset"):
    nas.SearchSpace(ops=("conv", "pool"))


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("candidate", ["conv_3x3", "sep_conv_5x5", "identity", "zero"])
def test_each_ops_params_formula_counts_its_module(candidate, batch_norm):
  x = jnp.ones((1, 6, 6, 3))
  variables = jax.eval_shape(ops.Op(candidate, 8, batch_norm=batch_norm).init,
                             jax.random.key(0), x)
  _, params = nas.op_cost(candidate, 3, 8, 36, batch_norm)
  assert params == _count(variables.get("params", {}))


def test_derived_form_round_trips_and_follows_the_declaration():
  for candidate in ("conv_3x3", "sep_conv_5x5", "identity", "zero"):
    family, kernel = ops.op_family(candidate), ops.op_kernel(candidate)
    assert ops.candidate_name(family, kernel) == candidate
  assert [ops.get_op(name).param_free for name in ops.known_ops()] == [False, False, True, True]
  strided = nas.SearchSpace(kernel_sizes=(3,), strides=(2,), depth_range=(1, 2))
  assert strided.candidates(0) == ("conv_3x3", "sep_conv_3x3", "zero")  # No strided identity.
  assert strided.candidates(1) == ("conv_3x3", "sep_conv_3x3", "identity", "zero")


def test_a_new_op_is_one_declaration(monkeypatch):
  """Declared once, an op is a candidate, a supernet module, a cost and a derived form."""
  monkeypatch.setattr(ops, "_REGISTRY", dict(ops._REGISTRY))

  def build(op, x, kernel, train):
    pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1),
                                   (1, op.stride, op.stride, 1), "SAME")
    return ops.fit_channels(pooled, op.features)

  ops.register_op(ops.OpSpec(
      "max_pool", build, flops=lambda k, c_in, c_out, out_hw: 0 * c_out,
      params=lambda k, c_in, c_out, batch_norm: 0 * c_out, param_free=True))
  space = nas.SearchSpace(min_channels=4, max_channels=4, channel_choices=1, depth_range=(1, 1),
                          kernel_sizes=(3,), ops=("conv", "max_pool"), stem_channels=0)
  assert space.candidates(0) == ("conv_3x3", "max_pool_3x3")
  model = supernet.Supernet(space, num_classes=3, relaxation="softmax")
  images = jnp.ones((2, 6, 6, 4))
  variables = model.init(jax.random.key(0), images)
  assert set(variables["params"]["block_0"]) == {"conv_3x3"}  # The pool has no parameters.
  assert model.apply(variables, images).shape == (2, 3)
  arch = jax.tree.map(lambda logits: logits.at[-1].set(5.0), variables["arch"])
  derived = nas.derive(arch, space, input_shape=(6, 6, 4), num_classes=3)
  assert derived["blocks"][0]["op"] == "max_pool" and derived["blocks"][0]["kernel_size"] == 3
  assert derived["flops"] == 2 * 4 * 3  # The head alone: the pool costs nothing.
  assert float(nas.param_free_probability(arch, space)) > 0.99
