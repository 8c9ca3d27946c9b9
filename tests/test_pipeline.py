"""Tests of dsjax.parallel.pipeline: GPipe against the plain layer scan.

The reference is `Pipeline(num_stages=1)`, an `nn.scan` over the same stacked parameters;
every pipelined configuration must reproduce its outputs and gradients in float32. Shapes
are tiny (hidden 8, 8 layers, batch 8) so each configuration compiles in well under a second.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from dsjax.errors import ConfigError
from dsjax.measure import hlo
from dsjax.parallel.pipeline import CircularLayout, Pipeline, bubble_fraction

HIDDEN, LAYERS, BATCH, SEQ = 8, 8, 8, 2
RULES = (("layers", "pipe"), ("stages", "pipe"), ("batch", "data"), ("replica", "data"))
# XLA:CPU compiles dominate this file's run time; LLVM optimisation of tiny programs only
# costs time here (about a third of each compile).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


class TinyLayer(nn.Module):
  """x + dropout(tanh(Dense(x)) * mask): a residual MLP with a per-example mask."""

  hidden: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    h = nn.Dense(
        self.hidden,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp",)))(x)
    # An activation constraint inside the layer: under the stage vmap it must keep the
    # stage axis sharded (spmd_axis_name), not replicate it.
    h = nn.with_logical_constraint(jnp.tanh(h) * mask, ("batch", None, "mlp"))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return x + h


def _pipeline(num_stages=1, num_microbatches=1, remat=False, num_repeats=1, **kwargs):
  return Pipeline(TinyLayer(HIDDEN, **kwargs), num_layers=LAYERS, num_stages=num_stages,
                  num_microbatches=num_microbatches, remat=remat, num_repeats=num_repeats)


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, HIDDEN))
  mask = (jax.random.uniform(jax.random.key(2), (BATCH, SEQ, 1)) > 0.3).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(3), (BATCH, SEQ, HIDDEN))
  boxed = jit(_pipeline().init)(jax.random.key(0), x, mask)
  return x, mask, weights, boxed


@pytest.fixture(scope="module")
def expected(setup):
  """Outputs and gradients of the unpipelined scan: the reference for every test."""
  x, mask, weights, boxed = setup
  return jit(_step(_pipeline(), weights))(nn.unbox(boxed)["params"], x, mask)


def _step(model, weights):
  """(outputs, d loss/d params, d loss/d x) for a weighted-sum loss."""

  def loss(params, x, mask):
    out = model.apply({"params": params}, x, mask)
    return jnp.sum(out * weights), out

  def step(params, x, mask):
    (_, out), (grad_params, grad_x) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, x, mask)
    return out, grad_params, grad_x

  return step


def _bytes_with_loops_once(compiled):
  """Collective bytes of `compiled` with every loop body counted once: equal to the real
  count for a collective kind only if none of its instructions sits inside a loop."""
  return hlo.collective_bytes(re.sub(r'"known_trip_count":\{"n":"\d+"\}', "",
                                     compiled.as_text()))


def _assert_close(actual, expected, tol=1e-5):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=tol, rtol=tol),
               actual, expected)


def test_parameter_layout_is_the_layer_scan(setup):
  x, mask, _, boxed = setup
  leaves = jax.tree.leaves_with_path(
      boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  layout = {jax.tree_util.keystr(path): (v.value.shape, v.names) for path, v in leaves}
  assert layout == {
      "['params']['layers']['Dense_0']['bias']": ((LAYERS, HIDDEN), ("layers", "mlp")),
      "['params']['layers']['Dense_0']['kernel']":
          ((LAYERS, HIDDEN, HIDDEN), ("layers", "embed", "mlp")),
  }
  # Init goes through the scan whatever num_stages is: same tree, same values.
  pipelined = jit(_pipeline(4, 4).init)(jax.random.key(0), x, mask)
  _assert_close(nn.unbox(pipelined), nn.unbox(boxed), tol=0)


def test_circular_parameter_layout(setup):
  """R > 1 stores [P, R, L/(RP), ...] with the stage axis first: the scan's values, chunk
  r * P + s at [s, r], and `CircularLayout` converts both ways exactly."""
  x, mask, _, boxed = setup
  circular = jit(_pipeline(4, 4, num_repeats=2).init)(jax.random.key(0), x, mask)
  kernel = circular["params"]["layers"]["Dense_0"]["kernel"]
  assert kernel.value.shape == (4, 2, 1, HIDDEN, HIDDEN)
  assert kernel.names == ("stages", None, None, "embed", "mlp")
  scan_kernel = nn.unbox(boxed)["params"]["layers"]["Dense_0"]["kernel"]
  # Stage 1, repeat 1 runs chunk 1 * 4 + 1 = 5: layer 5 of 8.
  np.testing.assert_array_equal(kernel.value[1, 1, 0], scan_kernel[5])
  layout = CircularLayout(4, 2)
  _assert_close(layout.to_scan(nn.unbox(circular)), nn.unbox(boxed), tol=0)
  _assert_close(layout.from_scan(nn.unbox(boxed)), nn.unbox(circular), tol=0)
  with pytest.raises(ConfigError, match="not in the circular layout of 2 stages x 2 repeats"):
    CircularLayout(2, 2).to_scan(nn.unbox(circular))
  with pytest.raises(ConfigError, match="does not split into 3 pipeline stages x 2"):
    CircularLayout(3, 2).from_scan(nn.unbox(boxed))


@pytest.mark.parametrize("num_stages,num_microbatches,remat,num_repeats", [
    (2, 2, False, 1), (2, 4, False, 1), (4, 4, False, 1), (4, 8, True, 1),
    # Circular: 2 stages x 2 repeats of 2-layer chunks (M = P, each microbatch re-enters
    # stage 0 right after leaving the last); 2 stages x 4 repeats with M > P (results wait
    # in the buffer); 4 stages x 2 repeats with remat.
    (2, 2, False, 2), (2, 4, False, 4), (4, 4, True, 2)])
def test_pipeline_matches_scan(setup, expected, num_stages, num_microbatches, remat,
                               num_repeats):
  x, mask, weights, boxed = setup
  model = _pipeline(num_stages, num_microbatches, remat=remat, num_repeats=num_repeats)
  layout = CircularLayout(num_stages, num_repeats)  # R = 1: stored in the scan layout.
  params = nn.unbox(boxed)["params"]
  if num_repeats > 1:
    params = layout.from_scan(params)
  out, grad_params, grad_x = jit(_step(model, weights))(params, x, mask)
  if num_repeats > 1:
    grad_params = layout.to_scan(grad_params)
  _assert_close((out, grad_params, grad_x), expected)


def test_dropout_is_deterministic_and_active(setup, expected):
  x, mask, _, boxed = setup
  params = nn.unbox(boxed)["params"]
  model = _pipeline(4, 4, dropout_rate=0.5)

  run = jit(lambda key: model.apply({"params": params}, x, mask, train=True,
                                         rngs={"dropout": key}))
  first = run(jax.random.key(7))
  np.testing.assert_array_equal(first, run(jax.random.key(7)))
  assert not np.allclose(first, run(jax.random.key(8)))
  assert not np.allclose(first, expected[0])  # the train=False output


@pytest.mark.parametrize("num_repeats", [1, 2])
def test_sharded_pipeline_on_mesh(setup, expected, num_repeats):
  """4 stages on pipe x 2-way data. Each pipe device holds the parameters its stage runs
  (with 2 circular repeats, chunks s and s + 4), so no parameter moves between pipe
  devices; inside the schedule loop only activations shift between stages. All-reduces
  (the gradient over data, the inputs' gradient and the outputs over pipe) run once per
  step, outside the loop, not once per schedule step."""
  x, mask, weights, boxed = setup
  model = _pipeline(4, 4, num_repeats=num_repeats)
  layout = CircularLayout(4, num_repeats)
  if num_repeats > 1:
    boxed = jit(model.init)(jax.random.key(0), x, mask)
  params = nn.unbox(boxed)["params"]

  mesh = jax.make_mesh((4, 2), ("pipe", "data"), axis_types=(AxisType.Auto,) * 2)
  param_shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(jax.eval_shape(lambda: boxed)), mesh, RULES)["params"]
  batch_sharding = NamedSharding(mesh, jax.P("data"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    step = jit(_step(model, weights),
               in_shardings=(param_shardings, batch_sharding, batch_sharding),
               out_shardings=(batch_sharding, param_shardings, batch_sharding))
    sharded = jax.device_put(params, param_shardings)
    compiled = step.lower(sharded, x, mask).compile()
    out, grad_params, grad_x = compiled(sharded, jax.device_put(x, batch_sharding),
                                        jax.device_put(mask, batch_sharding))

  if num_repeats > 1:
    grad_params = layout.to_scan(grad_params)
  _assert_close((out, grad_params, grad_x), expected)
  kernel = sharded["layers"]["Dense_0"]["kernel"]
  local = (LAYERS // 4, HIDDEN, HIDDEN) if num_repeats == 1 else (1, 2, 1, HIDDEN, HIDDEN)
  assert kernel.addressable_shards[0].data.shape == local
  moved = hlo.collective_bytes(compiled)
  once = _bytes_with_loops_once(compiled)
  assert moved["all-gather"] == moved["all-to-all"] == 0, moved
  assert moved["collective-permute"] > once["collective-permute"] > 0
  assert moved["all-reduce"] == once["all-reduce"] > 0, (moved, once)


def test_fsdp_weights_are_gathered_once_per_step(setup, expected):
  """pipe=2 x fsdp=2 x data=2, with remat, and `replica -> data + fsdp` ("gather once"):
  each replica's copy of the stage weights is gathered from its FSDP shards before the
  schedule and its gradient reduced after it, so no collective but the stage shift runs
  inside the loop."""
  x, mask, weights, boxed = setup
  rules = (("layers", "pipe"), ("stages", "pipe"), ("embed", "fsdp"),
           ("batch", ("data", "fsdp")), ("replica", ("data", "fsdp")))
  mesh = jax.make_mesh((2, 2, 2), ("pipe", "fsdp", "data"), axis_types=(AxisType.Auto,) * 3)
  param_shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(jax.eval_shape(lambda: boxed)), mesh, rules)["params"]
  batch_sharding = NamedSharding(mesh, jax.P(("data", "fsdp")))
  sharded = jax.device_put(nn.unbox(boxed)["params"], param_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit(_step(_pipeline(2, 2, remat=True), weights),
               in_shardings=(param_shardings, batch_sharding, batch_sharding),
               out_shardings=(batch_sharding, param_shardings, batch_sharding))
    compiled = step.lower(sharded, x, mask).compile()
    actual = compiled(sharded, jax.device_put(x, batch_sharding),
                      jax.device_put(mask, batch_sharding))

  _assert_close(actual, expected)
  assert sharded["layers"]["Dense_0"]["kernel"].addressable_shards[0].data.shape == (
      LAYERS // 2, HIDDEN // 2, HIDDEN)
  moved = hlo.collective_bytes(compiled)
  once = _bytes_with_loops_once(compiled)
  for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all"):
    assert moved[kind] == once[kind], (kind, moved, once)
  assert moved["all-gather"] + moved["reduce-scatter"] + moved["all-reduce"] > 0


@pytest.mark.parametrize("kwargs,batch,message", [
    ({"num_stages": 3}, BATCH, "8 layers do not split into 3 pipeline stages"),
    ({"num_stages": 2, "num_microbatches": 3}, BATCH, "does not split into 3 microbatches"),
    ({"num_stages": 2, "num_microbatches": 0}, BATCH, "num_microbatches must be at least 1"),
    ({"num_stages": 2, "num_repeats": 3}, BATCH, "2 stages x 3 circular repeats"),
    ({"num_stages": 4, "num_microbatches": 2, "num_repeats": 2}, BATCH,
     "at least as many microbatches as stages"),
    ({"num_stages": 2, "num_repeats": 0}, BATCH, "num_repeats must be at least 1"),
])
def test_config_errors(kwargs, batch, message):
  x = jnp.zeros((batch, SEQ, HIDDEN))
  # Init runs the plain scan on any batch (trainers initialise on one example); the
  # micro-batch split is checked when the pipeline runs.
  variables = jax.eval_shape(lambda: _pipeline(num_stages=2).init(jax.random.key(0), x,
                                                                   x[..., :1]))
  with pytest.raises(ConfigError, match=message):
    jax.eval_shape(lambda: _pipeline(**kwargs).init(jax.random.key(0), x, x[..., :1]))
    jax.eval_shape(lambda: _pipeline(**kwargs).apply(variables, x, x[..., :1]))


def test_bubble_fraction():
  assert bubble_fraction(1, 4) == 0.0
  assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert bubble_fraction(4, 16) == pytest.approx(3 / 19)
  assert bubble_fraction(2, 1) == pytest.approx(1 / 2)
  assert bubble_fraction(4, 4, 2) == pytest.approx(3 / 11)
  with pytest.raises(ConfigError):
    bubble_fraction(0, 4)
