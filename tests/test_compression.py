"""Compressed gradient exchange (dsjax.parallel.compression) and overlap flags, on 8 CPU devices.

Tolerances: each exchanged entry goes through at most a few float32 additions per step
(residual + gradient, a replica-ordered sum of 8 values, a division by 8), so one step is
exact to a few ulp of values of size ~1. The error-feedback invariants add T steps of 8
replicas, about T * 10 roundings of sums of size <= ~10: <= 50 * 6e-8 * 10 = 3e-5, so
atol 1e-4 is a float32 bound, not a fudge; the measured worst case is printed.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.errors import ConfigError
from dsjax.measure import collective_bytes
from dsjax.parallel import compression as comp
from dsjax.parallel import overlap

REPLICAS = 8
SMALL = {"w": (64, 40), "b": (40,)}  # w (2560 entries) is compressed, b (40) goes dense.


@functools.cache
def _mesh():
  return jax.make_mesh((REPLICAS,), ("data",), axis_types=(AxisType.Explicit,))


def _sharded(tree):
  return jax.device_put(tree, NamedSharding(_mesh(), P("data")))


def _params(shapes):
  return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}


def _grads(shapes, seed):
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal((REPLICAS, *shape)).astype(np.float32)
          for name, shape in shapes.items()}


@functools.cache
def _step(compression, density=None):
  """Jitted exchange over the 8-device data axis: ([8, ...] grads, state) -> outputs."""
  def body(grads, state):
    local = jax.tree.map(lambda g: g[0], grads)
    return comp.exchange(local, state, compression, axis_name="data", step=0, density=density)

  return jax.jit(jax.shard_map(body, mesh=_mesh(), in_specs=(P("data"), P("data")),
                               out_specs=(P(), P("data"), P())))


def _init(shapes, compression):
  # Born sharded, as a trainer makes it: one compiled program, not one per eager op.
  make = functools.partial(comp.init_state, _params(shapes), compression, REPLICAS)
  return jax.jit(make, out_shardings=NamedSharding(_mesh(), P("data")))()


def _run(compression, shapes, grads_per_step):
  """Runs the exchange over several steps; returns the outputs of every step."""
  state = _init(shapes, compression)
  outputs = []
  for grads in grads_per_step:
    mean, state, stats = _step(compression)(_sharded(grads), state)
    outputs.append((jax.tree.map(np.asarray, mean), state, jax.tree.map(float, stats)))
  return outputs


def _reference_topk(compression, shapes, grads_per_step):
  """NumPy DGC: clipping, momentum correction, top-k, momentum factor masking."""
  residual = {k: np.zeros((REPLICAS, *s), np.float32) for k, s in shapes.items()}
  momentum = {k: np.zeros((REPLICAS, *s), np.float32) for k, s in shapes.items()}
  means = []
  for grads in grads_per_step:
    grads = {k: g.copy() for k, g in grads.items()}
    if compression.clip_norm:
      for r in range(REPLICAS):
        norm = math.sqrt(sum(float(np.sum(g[r].astype(np.float64) ** 2))
                             for g in grads.values()))
        scale = min(1.0, compression.clip_norm / math.sqrt(REPLICAS) / norm)
        for g in grads.values():
          g[r] *= np.float32(scale)
    mean = {}
    for name, g in grads.items():
      n = g[0].size
      if compression.momentum:
        momentum[name] = np.float32(compression.momentum) * momentum[name] + g
        v = residual[name] + momentum[name]
      else:
        v = residual[name] + g
      if n < compression.min_size:
        mean[name] = v.mean(0)
        continue
      k = math.ceil(compression.density * n)
      total = np.zeros(n, np.float32)
      for r in range(REPLICAS):
        flat = v[r].reshape(-1)
        sent = np.argsort(-np.abs(flat), kind="stable")[:k]
        total[sent] += flat[sent]
        flat[sent] = 0.0
        momentum[name][r].reshape(-1)[sent] = 0.0
      residual[name] = v
      mean[name] = (total / REPLICAS).reshape(g.shape[1:])
    means.append(mean)
  return means, residual


def _assert_error_feedback(outputs, grads_per_step, atol=1e-4):
  """(sum of applied means) * 8 + (sum of final residuals) == sum of all local gradients."""
  residual = outputs[-1][1].residual
  worst = 0.0
  for name in grads_per_step[0]:
    applied = sum(out[0][name] for out in outputs) * REPLICAS
    kept = np.asarray(residual[name]).sum(0)
    true = sum(g[name].sum(0) for g in grads_per_step)
    np.testing.assert_allclose(applied + kept, true, rtol=0, atol=atol)
    worst = max(worst, float(np.max(np.abs(applied + kept - true))))
  print(f"error-feedback invariant: worst |error| {worst:.2e} (atol {atol:g})")


def test_none_is_the_mean_and_topk_full_density_equals_it():
  grads = _grads(SMALL, seed=0)
  (none_mean, _, none_stats), = _run(comp.parse_compression("none"), SMALL, [grads])
  (full_mean, _, full_stats), = _run(comp.parse_compression("topk:1.0"), SMALL, [grads])
  for name, g in grads.items():
    np.testing.assert_allclose(none_mean[name], g.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full_mean[name], none_mean[name], rtol=1e-6, atol=1e-6)
  total = REPLICAS * (64 * 40 + 40)
  assert none_stats == {"sent": total, "total": total, "overflow": 0.0}
  assert full_stats == none_stats


def test_topk_matches_reference_and_keeps_error_feedback_invariant():
  compression = comp.parse_compression("topk:0.05")  # k = 128; 8 * 128 < 2560: all-gather.
  steps = [_grads(SMALL, seed=10 + t) for t in range(5)]
  outputs = _run(compression, SMALL, steps)
  means, residual = _reference_topk(compression, SMALL, steps)
  for out, mean in zip(outputs, means, strict=True):
    for name in SMALL:
      np.testing.assert_allclose(out[0][name], mean[name], rtol=1e-5, atol=1e-5)
    assert out[2] == {"sent": REPLICAS * (128 + 40), "total": REPLICAS * (2560 + 40),
                      "overflow": 0.0}
  np.testing.assert_allclose(outputs[-1][1].residual["w"], residual["w"], atol=1e-5)
  assert not np.any(np.asarray(outputs[-1][1].residual["b"]))
  _assert_error_feedback(outputs, steps)


def test_topk_momentum_correction_and_local_clipping_match_reference():
  compression = comp.parse_compression("topk:0.05,momentum=0.9,clip_norm=20")
  steps = [_grads(SMALL, seed=20 + t) for t in range(3)]
  outputs = _run(compression, SMALL, steps)
  means, _ = _reference_topk(compression, SMALL, steps)
  for out, mean in zip(outputs, means, strict=True):
    for name in SMALL:
      np.testing.assert_allclose(out[0][name], mean[name], rtol=1e-5, atol=1e-5)
  assert outputs[-1][1].momentum["w"].shape == (REPLICAS, 64, 40)


def test_topk_traffic_from_compiled_hlo():
  shapes = {"w": (256, 392), "b": (392,)}  # 100,744 entries; b is sent dense.
  sharding = NamedSharding(_mesh(), P("data"))

  def abstract(tree):  # Compiling needs only shapes and shardings.
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)

  grads = abstract(_params({k: (REPLICAS, *s) for k, s in shapes.items()}))
  measured = {}
  for spec in ("none", "topk:0.01", "topk:0.001"):
    compression = comp.parse_compression(spec)
    make = functools.partial(comp.init_state, _params(shapes), compression, REPLICAS)
    state = abstract(jax.eval_shape(make))
    compiled = _step(compression).lower(grads, state).compile()
    measured[spec] = collective_bytes(compiled)
    if spec == "none":
      # XLA:CPU has no async collectives: no start/done pairs at all.
      assert not any(overlap.async_collective_pairs(compiled.as_text()).values())
  dense = measured["none"]["total"]
  # Operand bytes x participants: each of the 8 replicas puts its whole gradient in.
  assert dense == REPLICAS * 4 * (256 * 392 + 392)
  for spec, density in (("topk:0.01", 0.01), ("topk:0.001", 0.001)):
    k = math.ceil(density * 256 * 392)
    assert measured[spec]["all-gather"] == REPLICAS * k * (4 + 4)  # f32 values, s32 indices.
    assert measured[spec]["all-reduce"] == REPLICAS * 4 * 392  # only the small leaf.
  ratio, ratio_fine = (measured[s]["total"] / dense for s in ("topk:0.01", "topk:0.001"))
  print(f"HLO collective bytes vs none: topk:0.01 {ratio:.4f}, topk:0.001 {ratio_fine:.4f}")
  # Each replica puts in k (value, index) pairs, 2k words, against n words dense: about
  # 2 x density, plus the small leaf sent dense.
  assert ratio <= 1 / 20
  assert ratio_fine <= 2 * 0.001 + 392 / (256 * 392) + 1e-4


def test_threshold_sends_entries_above_t_and_counts_overflow():
  compression = comp.parse_compression("threshold:1.0")  # capacity 1%: 21 slots of 2048.
  shapes = {"v": (2048,)}
  rng = np.random.default_rng(3)
  g = rng.uniform(-0.4, 0.4, (REPLICAS, 2048)).astype(np.float32)
  above_counts = [0, 5, 21, 22, 30, 10, 40, 21]
  above = []
  for r, count in enumerate(above_counts):
    where = np.sort(rng.choice(2048, count, replace=False))
    g[r, where] = rng.choice([-1, 1], count) * rng.uniform(1.5, 3.0, count)
    above.append(where)
  (mean, state, stats), = _run(compression, shapes, [{"v": g}])
  expected_total = np.zeros(2048, np.float32)
  residual = np.asarray(state.residual["v"])
  for r, where in enumerate(above):
    sent = where[:21]  # The first entries above T, in index order, fill the 21 slots.
    expected_total[sent] += g[r, sent]
    np.testing.assert_array_equal(residual[r, sent], 0.0)
    unsent = np.setdiff1d(np.arange(2048), sent)
    np.testing.assert_array_equal(residual[r, unsent], g[r, unsent])
  np.testing.assert_allclose(mean["v"], expected_total / REPLICAS, rtol=1e-6, atol=1e-7)
  assert stats["overflow"] == sum(max(c - 21, 0) for c in above_counts) == 29
  assert stats["sent"] == sum(min(c, 21) for c in above_counts)
  assert stats["total"] == REPLICAS * 2048


def test_powersgd_low_rank_mean_is_exact_and_error_feedback_holds():
  compression = comp.parse_compression("powersgd:4")
  # low (64x48) is compressed: (64 + 48) * 4 < 3072; full (4x300) has rank 4 = full, so
  # sending P and Q would cost more than the matrix, and it goes dense; b is 1-D.
  shapes = {"low": (64, 48), "full": (4, 300), "b": (48,)}
  rng = np.random.default_rng(4)
  first = _grads(shapes, seed=5)
  basis = rng.standard_normal((64, 4)).astype(np.float32)
  mixes = rng.standard_normal((REPLICAS, 4, 48)).astype(np.float32)
  first["low"] = np.einsum("ij,rjk->rik", basis, mixes)  # One rank-4 column space for all.
  steps = [first] + [_grads(shapes, seed=6 + t) for t in range(3)]
  outputs = _run(compression, shapes, steps)
  mean, state, stats = outputs[0]
  for name in shapes:
    np.testing.assert_allclose(mean[name], first[name].mean(0), rtol=1e-4, atol=1e-4)
  assert stats["sent"] == REPLICAS * ((64 + 48) * 4 + 4 * 300 + 48)
  assert [q.shape for q in state.q] == [(REPLICAS, 48, 4)]  # Only "low" has a Q factor.
  later = outputs[1][0]["low"]
  assert np.linalg.norm(later - steps[1]["low"].mean(0)) > 1e-2  # Rank 4 of rank 48: lossy.
  _assert_error_feedback(outputs, steps)


def test_density_warmup_schedule():
  compression = comp.parse_compression("topk:0.001,warmup_steps=100")
  assert [comp.density_at(compression, s) for s in (0, 24, 25, 50, 75, 99, 100, 10**6)] == [
      0.25, 0.25, 0.0625, 0.015625, 0.004, 0.004, 0.001, 0.001]
  assert comp.density_at(comp.parse_compression("topk:0.1,warmup_steps=8"), 3) == 0.1
  assert comp.density_at(comp.parse_compression("threshold:1e-3,capacity=0.02"), 5) == 0.02
  assert comp.density_at(comp.parse_compression("powersgd:2"), 0) == 1.0
  assert comp.density_at(comp.parse_compression("topk:0.01"), 0) == 0.01


def test_warmup_with_traced_step_asks_for_a_static_density():
  compression = comp.parse_compression("topk:0.01,warmup_steps=10")
  state = _init(SMALL, compression)

  def body(grads, state, step):
    local = jax.tree.map(lambda g: g[0], grads)
    return comp.exchange(local, state, compression, axis_name="data", step=step[0])

  fn = jax.shard_map(body, mesh=_mesh(), in_specs=P("data"), out_specs=(P(), P("data"), P()))
  args = _sharded((_grads(SMALL, seed=0), np.zeros(REPLICAS, np.int32)))
  with pytest.raises(ConfigError, match="density_at"):
    jax.eval_shape(fn, args[0], state, args[1])


def test_parse_compression():
  assert comp.parse_compression("none") == comp.Compression()
  assert comp.parse_compression(" topk:0.01 ") == comp.Compression(mode="topk", density=0.01)
  assert comp.parse_compression("threshold:1e-3,capacity=0.05,min_size=10") == (
      comp.Compression(mode="threshold", threshold=1e-3, capacity=0.05, min_size=10))
  assert comp.parse_compression("powersgd:4").rank == 4
  custom = comp.parse_compression("topk:0.001,momentum=0.9,clip_norm=1,warmup_steps=50")
  assert (custom.momentum, custom.clip_norm, custom.warmup_steps) == (0.9, 1.0, 50)
  bad = ["", "topk", "topk:0", "topk:1.5", "topk:abc", "threshold:-1", "powersgd:0",
         "powersgd:1.5", "none:3", "gzip:2", "topk:0.1,foo=1", "topk:0.1,capacity=0.1",
         "powersgd:2,momentum=0.9", "topk:0.1,momentum=1", "topk:0.1,min_size=1,min_size=2",
         "none,warmup_steps=3"]
  for spec in bad:
    with pytest.raises(ConfigError, match=r"topk:<density in \(0, 1\]>"):
      comp.parse_compression(spec)
  with pytest.raises(ConfigError):
    comp.Compression(mode="topk", density=2.0)


def test_overlap_flags_per_backend():
  gpu = overlap.overlap_flags("gpu", True)
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu
  assert any("pipelined_all_reduce" in f for f in gpu)
  assert overlap.overlap_flags("cuda", True) == gpu
  assert overlap.overlap_flags("gpu", False) == []
  assert overlap.overlap_flags("cpu", True) == []
  assert all(f.startswith("--xla_tpu") or f.startswith("--xla_enable")
             for f in overlap.overlap_flags("tpu", True))
  assert overlap.overlap_env_var("tpu") == "LIBTPU_INIT_ARGS"
  with pytest.raises(ConfigError, match="backend"):
    overlap.overlap_flags("fpga", True)


def test_gpu_overlap_flags_are_known_to_installed_jaxlib():
  # XLA aborts on an unknown flag; jaxlib parses the GPU flags even on a CPU-only install.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(overlap.overlap_flags("gpu", True)))
  result = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]


def test_apply_overlap_flags_is_idempotent(monkeypatch):
  monkeypatch.setattr(overlap, "_backends_initialized", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                     "--xla_gpu_enable_latency_hiding_scheduler=false")
  added = overlap.apply_overlap_flags("gpu", True)
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in added  # The user's wins.
  first = os.environ["XLA_FLAGS"]
  assert overlap.apply_overlap_flags("gpu", True) == []
  assert os.environ["XLA_FLAGS"] == first
  assert len(first.split()) == len(set(first.split())) == 2 + len(added)
  monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
  assert overlap.apply_overlap_flags("tpu", True) == overlap.overlap_flags("tpu", True)
  assert "xla_tpu" not in os.environ["XLA_FLAGS"]
  assert overlap.apply_overlap_flags("gpu", False) == []
  monkeypatch.setattr(overlap, "_backends_initialized", lambda: True)
  with pytest.raises(ConfigError, match="before the first JAX computation"):
    overlap.apply_overlap_flags("gpu", True)


def test_async_collective_pairs_on_synthetic_hlo():
  hlo = """
  %all-reduce-start.1 = f32[8]{0} all-reduce-start(f32[8]{0} %p0), to_apply=%add
  %all-reduce-done.1 = f32[8]{0} all-reduce-done(f32[8]{0} %all-reduce-start.1)
  %all-reduce-start.2 = f32[4]{0} all-reduce-start(f32[4]{0} %p1), to_apply=%add
  %all-reduce-done.2 = f32[4]{0} all-reduce-done(f32[4]{0} %all-reduce-start.2)
  %ags = (f32[1,4]{1,0}, f32[8,4]{1,0}) all-gather-start(f32[1,4]{1,0} %p2), dimensions={0}
  %agd = f32[8,4]{1,0} all-gather-done((f32[1,4]{1,0}, f32[8,4]{1,0}) %ags)
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(f32[8]{0} %p0)
  %rs-start = ((f32[8]{0}), f32[1]{0}) async-start(f32[8]{0} %p0), calls=%rs
  %rs-done = f32[1]{0} async-done(((f32[8]{0}), f32[1]{0}) %rs-start)
  %ar = f32[8]{0} all-reduce(f32[8]{0} %p0), to_apply=%add
  """
  pairs = overlap.async_collective_pairs(hlo)
  assert pairs["all-reduce"] == 2 and pairs["all-gather"] == 1 and pairs["async"] == 1
  assert pairs["collective-permute"] == 0  # A start without its done is no pair.
  assert pairs["reduce-scatter"] == pairs["all-to-all"] == 0
