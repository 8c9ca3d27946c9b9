"""Measured figures against analytic counts: FLOPs, collective bytes, memory, MFU, trace, AUC."""

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax import measure

WIDTHS = (256, 512, 512, 128)


def _mlp_params():
  keys = jax.random.split(jax.random.PRNGKey(0), len(WIDTHS) - 1)
  return [{"w": jax.random.normal(k, (i, o)) / np.sqrt(i), "b": jnp.zeros(o)}
          for k, i, o in zip(keys, WIDTHS[:-1], WIDTHS[1:], strict=True)]


def _loss(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return jnp.mean((x @ params[-1]["w"] + params[-1]["b"]) ** 2)


def test_flops_match_the_analytic_count():
  """A dense layer's forward is 2*B*in*out FLOPs; the backward is two more matmuls of
  the same size (dx for all but the first layer, dW for all), so about 6*B*sum(in*out).
  Bias adds, tanh and the loss are O(B*width): well under the 5% allowed."""
  batch = 512
  x = jnp.ones((batch, WIDTHS[0]))
  params = _mlp_params()
  matmul = sum(i * o for i, o in zip(WIDTHS[:-1], WIDTHS[1:], strict=True))
  forward = jax.jit(_loss).lower(params, x).compile()
  assert measure.compiled_flops(forward) == pytest.approx(2 * batch * matmul, rel=0.05)
  backward = jax.jit(jax.value_and_grad(_loss)).lower(params, x).compile()
  first = WIDTHS[0] * WIDTHS[1]  # No gradient w.r.t. the input x is taken.
  expected = 2 * batch * matmul + 2 * batch * matmul + 2 * batch * (matmul - first)
  assert measure.compiled_flops(backward) == pytest.approx(expected, rel=0.05)


def test_data_parallel_all_reduce_moves_the_gradient_bytes():
  """Batch sharded over 8 devices, params replicated: XLA all-reduces every gradient
  once, each of the 8 devices contributing its float32 gradient (factor 8)."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = _mlp_params()

  def sgd_step(params, x):
    grads = jax.grad(_loss)(params, x)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  compiled = jax.jit(sgd_step, in_shardings=(replicated, sharded),
                     out_shardings=replicated).lower(params, jnp.ones((64, WIDTHS[0]))).compile()
  moved = measure.collective_bytes(compiled)
  param_bytes = sum(p.size * 4 for p in jax.tree.leaves(params))
  assert moved["all-reduce"] == 8 * param_bytes
  assert moved["total"] == 8 * param_bytes
  assert measure.tree_bytes(params) == param_bytes


def test_collective_bytes_parses_async_pairs_and_every_kind():
  text = """
  %ag = f32[8,128]{1,0} all-gather(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %rs = bf16[16]{0} reduce-scatter(%q), replica_groups=[2,4]<=[8], to_apply=%add
  %ars = (f32[1024]{0}, f32[512]{0}) all-reduce-start(%g, %h), replica_groups={{0,1}}
  %ard = (f32[1024]{0}, f32[512]{0}) all-reduce-done(%ars)
  %cps = (s32[4,4]{1,0}, s32[4,4]{1,0}, u32[], u32[]) collective-permute-start(%r),\
    source_target_pairs={{0,1},{1,0}}
  %cpd = s32[4,4]{1,0} collective-permute-done(%cps)
  %a2a = (f16[2,8]{1,0}, f16[2,8]{1,0}) all-to-all(%s, %t), replica_groups={{0,1}}
  %mul = f32[1024]{0} multiply(%ard, %ard)
  """
  moved = measure.collective_bytes(text)
  assert moved["all-gather"] == 8 * 128 * 4  # 8 devices x their 128-float operand.
  assert moved["reduce-scatter"] == 16 * 2 * 4 * 4  # Operand 4x the result, 4 devices.
  assert moved["all-reduce"] == (1024 + 512) * 4 * 2  # Combined async pair, counted once.
  assert moved["collective-permute"] == 16 * 4 * 2  # Not the u32 context scalars.
  assert moved["all-to-all"] == 2 * 2 * 8 * 2 * 2
  assert moved["total"] == sum(v for k, v in moved.items() if k != "total")


def test_memory_report_and_mfu():
  params = _mlp_params()
  compiled = jax.jit(jax.grad(_loss)).lower(params, jnp.ones((32, WIDTHS[0]))).compile()
  report = measure.memory_report(compiled, params, {"mu": params})
  param_bytes = sum(p.size * 4 for p in jax.tree.leaves(params))
  assert report["params_bytes"] == param_bytes and report["opt_state_bytes"] == param_bytes
  assert report["peak_bytes"] >= report["argument_bytes"] >= param_bytes
  peak, source = measure.device_peak_flops()
  assert peak > 0 and source == "measured:float32-matmul"  # CPU: not in the table.
  assert measure.mfu(peak * 0.5, 1.0, peak) == pytest.approx(0.5)
  assert measure.mfu(0.0, 1.0, peak) == 0.0


def test_transformer_flops_cross_check_and_the_scan_blind_spot():
  """XLA's count of a 1-layer BERT forward is the analytic matmul count plus elementwise
  work (softmax, GELU, LayerNorm: under 10% at this width). A scanned layer stack is
  counted once whatever its length, which is why MFU uses the analytic count."""
  from dsjax.models import bert

  def xla_flops(layers):
    # scan_unroll=1: a loop of one layer per iteration (the default unrolls every layer).
    model = bert.Bert(vocab_size=4096, hidden=64, num_layers=layers, num_heads=4, mlp_dim=256,
                      max_position=32, dropout_rate=0.0, scan_unroll=1)
    ids = jnp.ones((8, 32), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    return measure.compiled_flops(jax.jit(model.apply).lower(params, ids).compile())

  analytic = 8 * 32 * measure.transformer_flops_per_token(
      num_layers=1, hidden=64, mlp_dim=256, seq_len=32, vocab_size=4096)
  one = xla_flops(1)
  assert analytic <= one <= 1.1 * analytic
  assert xla_flops(3) == pytest.approx(one, rel=0.01)  # The while loop body, once.


def test_communication_share_from_a_trace(tmp_path):
  """A data-parallel step traced on 8 devices: the all-reduce shows up as a share of the
  XLA instruction time, in (0, 1)."""
  from dsjax.measure import trace
  from dsjax.profile import report

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = _mlp_params()
  step = jax.jit(jax.grad(_loss), in_shardings=(replicated, sharded), out_shardings=replicated)
  x = jnp.ones((64, WIDTHS[0]))
  jax.block_until_ready(step(params, x))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      jax.block_until_ready(step(params, x))
  result = trace.communication_share(tmp_path)
  assert 0 < result["share"] < 1
  assert result["by_kind"]["all-reduce"] == result["collective_s"] > 0
  assert trace.communication_share(tmp_path / "empty") == {}
  # The same trace ranked by instruction: shares sum to one, three runs of each op, and
  # the all-reduce holds the collective time measured above.
  ops = trace.op_breakdown(tmp_path, top=1000)
  assert sum(row["share"] for row in ops["ops"]) == pytest.approx(1.0)
  assert ops["op_seconds"] == pytest.approx(result["instruction_s"])
  reduce_s = sum(r["seconds"] for r in ops["op_kinds"] if r["name"].startswith("all-reduce"))
  assert reduce_s == pytest.approx(result["collective_s"])
  assert "all-reduce" in report.format_breakdown(ops)
  assert sum(ops["classes"].values()) == pytest.approx(ops["op_seconds"])
  assert ops["classes"]["matmul"] > 0  # The dots (CPU names them dot/ynn_fusion).
  assert trace.op_breakdown(tmp_path / "empty") == {}


def test_kernel_classes_from_h200_kernel_names():
  """Names as an H200 trace records them (docs/gpu/profile_mixed_h200*.txt)."""
  from dsjax.measure import trace

  classes = {name: trace.kernel_class(name) for name in (
      "nvjet_sm90_hss_128x128_64x6_2x1_v_bz_NNT", "sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n",
      "gemm_fusion_dot_29", "memcpy128", "loop_dynamic_update_slice_fusion_30", "copy.1",
      "loop_convert_fusion", "convert_bitcast_fusion", "triton_softmax_8", "loop_add_fusion_1",
      "convolution.3")}
  assert classes == {
      "nvjet_sm90_hss_128x128_64x6_2x1_v_bz_NNT": "matmul",
      "sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n": "matmul", "gemm_fusion_dot_29": "matmul",
      "memcpy128": "copy", "loop_dynamic_update_slice_fusion_30": "copy", "copy.1": "copy",
      "loop_convert_fusion": "other", "convert_bitcast_fusion": "other",
      "triton_softmax_8": "other", "loop_add_fusion_1": "other", "convolution.3": "matmul"}


def test_collectives_inside_loops_count_once_per_iteration():
  """A scan of 5 steps whose carry is a sum over a data-sharded batch all-reduces in every
  step: 5 executions of the loop body's all-reduce; nested trip counts multiply."""
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def loop(x):
    def body(carry, _):
      return jnp.tanh(carry + jnp.sum(x * carry, axis=0)), None
    return jax.lax.scan(body, jnp.ones(x.shape[1:]), None, length=5)[0]

  compiled = jax.jit(loop, in_shardings=sharded, out_shardings=replicated).lower(
      jnp.ones((8, 16))).compile()
  assert measure.collective_bytes(compiled)["all-reduce"] == 5 * 2 * 16 * 4

  text = textwrap.dedent("""
  %inner (p: f32[4]) -> f32[4] {
    %ar = f32[4]{0} all-reduce(%p), replica_groups={{0,1}}, to_apply=%add
  }
  %outer (p: f32[4]) -> f32[4] {
    %w = f32[4]{0} while(%p), body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  }
  ENTRY %main (p: f32[4]) -> f32[4] {
    %w = f32[4]{0} while(%p), body=%outer, backend_config={"known_trip_count":{"n":"2"}}
    %ag = f32[8]{0} all-gather(%w), replica_groups={{0,1}}, dimensions={0}
  }
  """)
  moved = measure.collective_bytes(text)
  assert moved["all-reduce"] == 2 * 3 * 4 * 4 * 2
  assert moved["all-gather"] == 8 * 4


def test_roc_auc_weights_and_single_class():
  labels = np.array([0, 0, 1, 1, 0, 1])
  scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.7])
  assert measure.roc_auc(labels, scores) == pytest.approx(5 / 9)
  # Zero-weight (padding) examples are ignored, whatever their label and score.
  padded = measure.roc_auc(np.r_[labels, 0, 0], np.r_[scores, 5.0, 5.0], np.r_[np.ones(6), 0, 0])
  assert padded == pytest.approx(5 / 9)
  assert math.isnan(measure.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert math.isnan(measure.roc_auc([0, 1], [0.1, 0.2], [1.0, 0.0]))
