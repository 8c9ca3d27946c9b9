"""Compressed data-parallel gradient exchange with error feedback.

Deep Gradient Compression (Lin et al., 2018) and PowerSGD (Vogels et al., 2019) as plain
functions that a train step calls inside `jax.shard_map` over the data axis. Nothing in JAX
or optax offers top-k sparsification with error feedback, so the exchange is written here
with explicit collectives; its traffic is read back from the compiled HLO with
`dsjax.measure.collective_bytes`.

Conventions:
  * `grads` passed to `exchange` is this replica's local gradient pytree, leaves shaped like
    the params (no replica axis).
  * Every `CompressionState` array has a leading replica axis: `[num_replicas, *shape]`
    outside shard_map. Shard that axis on the data axis (`P("data")` for every leaf, e.g.
    one `P("data")` as the prefix spec of the whole state); inside shard_map each replica then
    sees `[1, *shape]`, its own slice, and `exchange` reads and writes row 0.
  * `mean_grads` and `stats` are identical on every replica (out spec `P()`); the new state
    is per replica (out spec `P("data")`).

The collective that carries a leaf is whichever moves fewer bytes for the same result: a
sparse leaf is all-gathered as `(values, int32 indices)` while `num_replicas * k < n`, and
otherwise its masked dense tensor is all-reduced (ring all-reduce sends about `2n` elements
per replica, an all-gather of `k` pairs about `2 * num_replicas * k`). Either way the same
entries are sent and the same remainder stays in the residual.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsjax.errors import ConfigError

# "local": the dense mean too, but exchanged once per step by the replicas (after
# gradient accumulation) instead of by XLA in every micro-batch.
DENSE_MODES = ("none", "local")
MODES = (*DENSE_MODES, "topk", "threshold", "powersgd")
# DGC's warm-up densities (75%, 93.75%, 98.4375%, 99.6% sparsity), then the target.
WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.004)
_KNOBS = ("min_size", "momentum", "clip_norm", "warmup_steps", "capacity", "error_feedback")
_FORMS = ("use none, local, topk:<density in (0, 1]>, threshold:<T > 0> or powersgd:<rank >= 1>, "
          "optionally followed by ,key=value knobs from min_size, momentum, clip_norm, "
          "warmup_steps and capacity (e.g. topk:0.001,momentum=0.9,warmup_steps=1000)")


@dataclasses.dataclass(frozen=True)
class Compression:
  """How gradients are exchanged between data-parallel replicas.

  Attributes:
    mode: "none" (dense mean, XLA's all-reduce), "local" (dense mean, one exchange per
      step after local gradient accumulation), "topk", "threshold" or "powersgd".
    density: topk: fraction of each leaf's entries sent per step.
    threshold: threshold: entries with |v| > threshold are sent.
    rank: powersgd: rank of the P/Q factors.
    min_size: leaves with fewer elements are exchanged dense (biases, norms).
    momentum: DGC momentum correction factor (topk/threshold); 0 disables. When on, the
      exchanged update already holds the momentum: use an optimizer without momentum.
    clip_norm: DGC local gradient clipping: each replica clips its gradient's global norm
      to clip_norm / sqrt(num_replicas) before accumulating; 0 disables.
    warmup_steps: DGC density warm-up (topk/threshold): densities 25%, 6.25%, 1.5625%,
      0.4% over four equal stages of warmup_steps, never below the target; 0 disables.
    capacity: threshold: static fraction of each leaf's entries that fits in the send
      buffer, filled with the first entries above the threshold in index order (an O(n)
      prefix-sum packing, no top-k); those that do not fit stay in the residual and are
      counted as overflow. The default, 1%, bounds traffic as topk:0.01 does.
    error_feedback: keep what was not sent and add it to the next step's gradient
      (`error_feedback=0` drops it: the ablation that shows why it matters).
  """

  mode: str = "none"
  density: float = 1.0
  threshold: float = 0.0
  rank: int = 0
  min_size: int = 1024
  momentum: float = 0.0
  clip_norm: float = 0.0
  warmup_steps: int = 0
  capacity: float = 0.01
  error_feedback: bool = True

  def __post_init__(self):
    problem = _validate(dataclasses.asdict(self))
    if problem:
      raise ConfigError(f"Invalid gradient compression ({problem}); {_FORMS}.")


def _validate(fields: dict[str, Any]) -> str | None:
  """The first problem of a set of Compression fields, or None."""
  c = {f.name: f.default for f in dataclasses.fields(Compression)} | fields
  mode = c["mode"]
  if mode not in MODES:
    return f"unknown mode {mode!r}"
  if mode == "topk" and not 0.0 < c["density"] <= 1.0:
    return f"topk density {c['density']} is not in (0, 1]"
  if mode == "threshold" and not c["threshold"] > 0.0:
    return f"threshold {c['threshold']} is not > 0"
  if mode == "powersgd" and c["rank"] < 1:
    return f"powersgd rank {c['rank']} is not >= 1"
  if c["min_size"] < 1:
    return f"min_size {c['min_size']} is not >= 1"
  if not 0.0 <= c["momentum"] < 1.0:
    return f"momentum {c['momentum']} is not in [0, 1)"
  if c["momentum"] and mode not in ("topk", "threshold"):
    return "momentum correction applies to topk and threshold only"
  if c["clip_norm"] < 0.0:
    return f"clip_norm {c['clip_norm']} is negative"
  if c["warmup_steps"] < 0:
    return f"warmup_steps {c['warmup_steps']} is negative"
  if c["warmup_steps"] and mode not in ("topk", "threshold"):
    return "warmup_steps applies to topk and threshold only"
  if not 0.0 < c["capacity"] <= 1.0:
    return f"capacity {c['capacity']} is not in (0, 1]"
  return None


def parse_compression(spec: str) -> Compression:
  """Parses `MODE[:VALUE][,key=value...]`, e.g. `topk:0.01` or `threshold:1e-3,capacity=0.02`.

  Args:
    spec: `none`, `topk:<density>`, `threshold:<T>` or `powersgd:<rank>`, optionally
      followed by `,key=value` knobs (min_size, momentum, clip_norm, warmup_steps, capacity).

  Returns:
    The Compression.

  Raises:
    ConfigError: the spec is malformed; the message lists the valid forms.
  """
  def fail(problem: str) -> ConfigError:
    return ConfigError(f"Invalid gradient compression spec {spec!r} ({problem}); {_FORMS}.")

  head, *knobs = [part.strip() for part in str(spec).strip().split(",")]
  mode, colon, value = (part.strip() for part in head.partition(":"))
  fields: dict[str, Any] = {"mode": mode}
  try:
    if mode in DENSE_MODES:
      if colon:
        raise fail(f"{mode} takes no value")
    elif mode in ("topk", "threshold", "powersgd"):
      if not value:
        raise fail(f"{mode} needs a value")
      key = {"topk": "density", "threshold": "threshold", "powersgd": "rank"}[mode]
      fields[key] = int(value) if key == "rank" else float(value)
    else:
      raise fail(f"unknown mode {mode!r}")
    for knob in knobs:
      key, equals, value = (part.strip() for part in knob.partition("="))
      if key not in _KNOBS or not equals:
        raise fail(f"unknown knob {knob!r}")
      if key in fields:
        raise fail(f"knob {key!r} given twice")
      if key == "error_feedback":
        fields[key] = {"0": False, "1": True}[value]
      else:
        fields[key] = int(value) if key in ("min_size", "warmup_steps") else float(value)
  except (ValueError, KeyError) as error:
    raise fail(f"not a number (error_feedback is 0 or 1): {error}") from None
  if "capacity" in fields and mode != "threshold":
    raise fail("capacity applies to threshold only")
  problem = _validate(fields)
  if problem:
    raise fail(problem)
  return Compression(**fields)


def density_at(compression: Compression, step: int) -> float:
  """Fraction of a sparse leaf's entries sent at `step`, with DGC's warm-up.

  The trainer compiles one step per distinct value (the number of entries sent is static)
  and passes it to `exchange(..., density=...)`: at most five compilations.

  Args:
    compression: the compression.
    step: the (Python int) training step.

  Returns:
    topk: the density; threshold: the send-buffer capacity; other modes: 1.0.
  """
  if compression.mode == "topk":
    target = compression.density
  elif compression.mode == "threshold":
    target = compression.capacity
  else:
    return 1.0
  step = operator.index(step)
  if compression.warmup_steps == 0 or step >= compression.warmup_steps:
    return target
  stage = max(step, 0) * len(WARMUP_DENSITIES) // compression.warmup_steps
  return max(WARMUP_DENSITIES[stage], target)


class CompressionState(NamedTuple):
  """Per-replica exchange state; every array is `[num_replicas, ...]` (see module doc).

  Attributes:
    residual: error-feedback residuals, shaped like the params (None for the dense modes).
    momentum: DGC momentum buffers like the params, or None when momentum is off.
    q: PowerSGD warm-start factors: a tuple with one `[num_replicas, last_dim, rank]` array
      per compressed leaf, in `jax.tree.leaves(params)` order (leaves sent dense have none:
      zero-size placeholders crash XLA:CPU in jax 0.11.2); None for other modes.
  """

  residual: Any = None
  momentum: Any = None
  q: Any = None


def _powersgd_dims(shape: tuple[int, ...], c: Compression) -> tuple[int, int, int] | None:
  """(rows, cols, rank) of a leaf PowerSGD compresses, or None where dense is no dearer."""
  n = math.prod(shape)
  if len(shape) < 2 or n < c.min_size:
    return None
  rows, cols = n // shape[-1], shape[-1]
  rank = min(c.rank, rows, cols)
  return (rows, cols, rank) if (rows + cols) * rank < n else None


def init_state(params: Any, compression: Compression, num_replicas: int, *,
               seed: int = 0) -> CompressionState:
  """Zero residuals (and momentum, PowerSGD Q factors) for every replica.

  Call it under `jax.jit(..., out_shardings=...)` with the replica axis sharded on the data
  axis so the state is born sharded.

  Args:
    params: the parameter pytree (arrays or ShapeDtypeStructs).
    compression: the compression.
    num_replicas: size of the data axis.
    seed: seed of the PowerSGD initial Q, the same on every replica.

  Returns:
    The CompressionState, each array with a leading `[num_replicas]` axis.
  """
  if int(num_replicas) < 1:
    raise ConfigError(f"num_replicas is {num_replicas}; pass the size of the data axis (>= 1).")
  if compression.mode in DENSE_MODES:
    return CompressionState()

  def zeros(leaf):
    return jnp.zeros((num_replicas, *leaf.shape), jnp.float32)

  residual = jax.tree.map(zeros, params)
  momentum = jax.tree.map(zeros, params) if compression.momentum else None
  q = None
  if compression.mode == "powersgd":
    # NumPy draws: no device work or compilation per leaf, and a small constant under jit.
    rng = np.random.default_rng(seed)
    factors = []
    for leaf in jax.tree.leaves(params):
      dims = _powersgd_dims(tuple(leaf.shape), compression)
      if dims is not None:
        start = rng.standard_normal((dims[1], dims[2])).astype(np.float32)
        factors.append(jnp.broadcast_to(jnp.asarray(start), (num_replicas, *start.shape)))
    q = tuple(factors)
  return CompressionState(residual=residual, momentum=momentum, q=q)


def _axis_size(axis_name: Any) -> int:
  size = getattr(lax, "axis_size", None)
  return int(size(axis_name)) if size else int(lax.psum(1, axis_name))


_GATHER_TAKES_TO = "to" in inspect.signature(lax.all_gather).parameters


def _all_gather_invariant(x: jax.Array, axis_name: Any) -> jax.Array:
  """All-gather whose result is typed as replicated (the same on every replica)."""
  if _GATHER_TAKES_TO:
    return lax.all_gather(x, axis_name, to="invarying")
  return lax.all_gather(x, axis_name)


def _gathered_mean(values: jax.Array, indices: jax.Array, n: int, axis_name: Any,
                   replicas: int) -> jax.Array:
  """Mean over replicas of sparse vectors sent as (values, indices); indices >= n are empty."""
  all_values = _all_gather_invariant(values, axis_name)
  all_indices = _all_gather_invariant(indices, axis_name)

  # One scatter per replica, in replica order: indices are unique within a replica, so the
  # sum is deterministic and bit-identical on every replica (no atomics on duplicates).
  def add(replica, total):
    return total.at[all_indices[replica]].add(all_values[replica], mode="drop",
                                              unique_indices=True)

  total = lax.fori_loop(0, replicas, add, jnp.zeros((n,), jnp.float32))
  return total / replicas


def _select(v: jax.Array, c: Compression, slots: int):
  """(values, indices, sent, overflow) of the entries of flat `v` that are sent.

  topk: the `slots` largest |v|. threshold: the first `slots` entries (in index order) with
  |v| > threshold; the rest above it overflow. Unused slots carry distinct indices >= n,
  which every scatter drops.
  """
  n = v.shape[0]
  if c.mode == "topk":
    _, indices = lax.top_k(jnp.abs(v), slots)
    indices = indices.astype(jnp.int32)
    return v[indices], indices, slots, None
  above = jnp.abs(v) > c.threshold
  # Packing by prefix sum is O(n), unlike a top-k: slot = rank among entries above T.
  slot = jnp.cumsum(above, dtype=jnp.int32) - 1
  keep = above & (slot < slots)
  slot = jnp.where(keep, slot, slots)
  values = jnp.zeros((slots,), jnp.float32).at[slot].set(v, mode="drop")
  indices = (n + jnp.arange(slots, dtype=jnp.int32)).at[slot].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  sent = jnp.sum(keep, dtype=jnp.int32)
  return values, indices, sent, jnp.sum(above, dtype=jnp.int32) - sent


def _exchange_leaf(g, residual, momentum, q, c: Compression, density: float, axis_name: Any,
                   replicas: int):
  """Exchanges one leaf; returns (mean, residual, momentum, q, sent, overflow)."""
  shape, n = g.shape, g.size
  if momentum is not None:
    momentum = c.momentum * momentum[0] + g
    v = residual[0] + momentum
  else:
    v = residual[0] + g
  dims = _powersgd_dims(shape, c) if c.mode == "powersgd" else None
  sparse = c.mode in ("topk", "threshold") and n >= c.min_size
  if not sparse and dims is None:
    # Dense: send everything; with momentum this is plain momentum SGD (nothing to mask).
    new_momentum = None if momentum is None else momentum[None]
    return (lax.pmean(v, axis_name), jnp.zeros((1, *shape), jnp.float32), new_momentum, q,
            n, None)

  if dims is not None:
    rows, cols, rank = dims
    matrix = v.reshape(rows, cols)
    highest = lax.Precision.HIGHEST
    p = lax.pmean(jnp.matmul(matrix, q[0], precision=highest), axis_name)
    p, _ = jnp.linalg.qr(p)
    new_q = lax.pmean(jnp.matmul(matrix.T, p, precision=highest), axis_name)
    approx = jnp.matmul(p, new_q.T, precision=highest)
    return (approx.reshape(shape), (matrix - approx).reshape(1, *shape), None, new_q[None],
            (rows + cols) * rank, None)

  flat = v.reshape(-1)
  slots = min(max(math.ceil(density * n), 1), n)
  values, indices, sent, overflow = _select(flat, c, slots)
  if replicas * slots < n:
    mean = _gathered_mean(values, indices, n, axis_name, replicas)
  else:
    dense = jnp.zeros((n,), jnp.float32).at[indices].set(values, mode="drop")
    mean = lax.pmean(dense, axis_name)
  new_residual = flat.at[indices].set(0.0, mode="drop").reshape(1, *shape)
  if momentum is not None:  # Momentum factor masking: sent entries restart their momentum.
    momentum = momentum.reshape(-1).at[indices].set(0.0, mode="drop").reshape(1, *shape)
  return mean.reshape(shape), new_residual, momentum, q, sent, overflow


def _resolve_density(c: Compression, step: Any, density: float | None) -> float:
  if c.mode not in ("topk", "threshold"):
    return 1.0
  if density is not None:
    if not 0.0 < float(density) <= 1.0:
      raise ConfigError(f"exchange density {density} is not in (0, 1]; pass density_at(...).")
    return float(density)
  if c.warmup_steps == 0:
    return density_at(c, 0) if c.mode == "threshold" else c.density
  try:
    step = operator.index(step)
  except TypeError:  # A traced step (TracerIntegerConversionError is a TypeError).
    raise ConfigError("Density warm-up needs a static density, but step is not a Python "
                      "int; pass density=density_at(compression, step) computed outside "
                      "jit.") from None
  return density_at(c, step)


def _clip_local(grads: Any, max_norm: float) -> Any:
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda g: g * scale, grads)


def exchange(grads: Any, state: CompressionState, compression: Compression, *,
             axis_name: Any, step: Any, density: float | None = None,
             ) -> tuple[Any, CompressionState, dict[str, jax.Array]]:
  """Averages gradients over `axis_name` with compression and error feedback.

  Call inside `jax.shard_map` over `axis_name`. Per leaf: leaves with fewer than min_size
  elements (and, for PowerSGD, 1-D leaves and matrices whose rank-r factors would be no
  smaller than the matrix) are averaged densely; topk sends the k = ceil(density
  * n) largest |v| of v = residual + gradient (with momentum correction: u = m * u + g,
  v = residual + u); threshold sends the entries with |v| > T that fit the send buffer;
  powersgd sends rank-r factors; what is not sent stays in the residual.

  Args:
    grads: this replica's local gradients (pytree, param-shaped leaves).
    state: this replica's slice of the CompressionState (leaves `[1, ...]`).
    compression: the compression.
    axis_name: the data-parallel mesh axis.
    step: the training step, a Python int; read only for density warm-up when `density`
      is None (it may be traced otherwise).
    density: overrides the topk density / threshold capacity, e.g. `density_at(c, step)`.

  Returns:
    `(mean_grads, new_state, stats)`: float32 mean gradients, identical on every replica;
    the replica's new state slice; stats `{"sent", "total", "overflow"}`: float32 scalars
    summed over leaves and replicas (entries sent, entries in the gradients, entries above
    the threshold that did not fit the send buffer).
  """
  replicas = _axis_size(axis_name)
  density = _resolve_density(compression, step, density)
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
  if compression.clip_norm:
    grads = _clip_local(grads, compression.clip_norm / math.sqrt(replicas))
  leaves, treedef = jax.tree.flatten(grads)
  total = sum(leaf.size for leaf in leaves) * replicas
  zero = jnp.zeros((), jnp.float32)
  if compression.mode in DENSE_MODES:
    means = [lax.pmean(leaf, axis_name) for leaf in leaves]
    stats = {"sent": zero + total, "total": zero + total, "overflow": zero}
    return jax.tree.unflatten(treedef, means), state, stats

  def per_leaf(tree):
    return [None] * len(leaves) if tree is None else treedef.flatten_up_to(tree)

  factors_in = iter(state.q or ())
  results = []
  for g, r, u in zip(leaves, per_leaf(state.residual), per_leaf(state.momentum), strict=True):
    compressed = compression.mode == "powersgd" and _powersgd_dims(g.shape, compression)
    q = next(factors_in) if compressed else None
    results.append(_exchange_leaf(g, r, u, q, compression, density, axis_name, replicas))
  means, residuals, momenta, factors, sent, overflow = zip(*results, strict=True)
  static_sent = sum(s for s in sent if isinstance(s, int))
  traced_sent = [s for s in sent if not isinstance(s, int)]
  traced_overflow = [o for o in overflow if o is not None]
  # Counts that differ between replicas are summed with one psum.
  if traced_sent:
    summed = lax.psum(jnp.stack([sum(traced_sent), sum(traced_overflow)]).astype(jnp.float32),
                      axis_name)
  else:
    summed = jnp.zeros((2,), jnp.float32)
  stats = {"sent": summed[0] + static_sent * replicas, "total": zero + total,
           "overflow": summed[1]}

  def rebuild(column, old):
    return None if old is None else jax.tree.unflatten(treedef, column)

  if not compression.error_feedback:  # Unsent values are dropped, not carried over.
    residuals = [jnp.zeros_like(r) for r in residuals]
  new_state = CompressionState(residual=rebuild(residuals, state.residual),
                               momentum=rebuild(momenta, state.momentum),
                               q=None if state.q is None else tuple(
                                   q for q in factors if q is not None))
  return jax.tree.unflatten(treedef, means), new_state, stats
