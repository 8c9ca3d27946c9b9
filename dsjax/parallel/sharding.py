"""Logical axis rules, parameter shardings, and global batches from per-process data.

Models name the axes of their parameters and key activations with logical names
("embed", "mlp", "heads", "vocab", "layers", "batch", ...); the rules map each name to
mesh axes. The defaults give Megatron-style tensor parallelism on `model` (MLP hidden
units, attention heads and the vocabulary split), FSDP on `fsdp` (the embedding axis of
every matrix split; gathered by XLA for compute), pipeline stages on `pipe`, and the batch
on `data` x `fsdp`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.errors import ConfigError
from dsjax.parallel.mesh import AXES, BATCH_AXES

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
REPLICA = "replica"  # The logical axis of per-data-replica copies.

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("conv_in", "fsdp"),  # Convolution kernels [h, w, in, out], as Dense's embed -> mlp.
    ("conv_out", "model"),
    ("kv", None),
    ("length", None),
    ("layers", "pipe"),
    ("stages", "pipe"),
    (REPLICA, "data"),  # Per-replica state: error-feedback residuals, pipeline weight copies.
)


def parse_rules(overrides: str | Sequence[Any] = ()) -> Rules:
  """The default rules with overrides first (the first rule naming an axis wins).

  Args:
    overrides: `"embed=model,mlp=none"` or pairs `(("embed", "model"),)`; a mesh axis
      list is `+`-joined in the string form (`batch=data+fsdp`); `none` replicates.

  Returns:
    The rules, overrides first.

  Raises:
    ConfigError: a malformed override or a mesh axis that does not exist.
  """
  if isinstance(overrides, str):
    pairs = []
    for item in filter(None, (part.strip() for part in overrides.split(","))):
      name, sep, axes = item.partition("=")
      if not sep or not name:
        raise ConfigError(f"parallel.rules: {item!r} is not logical=mesh_axis (e.g. "
                          "'embed=fsdp,mlp=model'; 'none' replicates)")
      parts = tuple(a for a in axes.split("+") if a)
      pairs.append((name.strip(), None if parts in ((), ("none",)) else
                    parts[0] if len(parts) == 1 else parts))
  else:
    pairs = [tuple(pair) for pair in overrides]
  for name, axes in pairs:
    for axis in (axes,) if isinstance(axes, str) else axes or ():
      if axis not in AXES:
        raise ConfigError(f"parallel.rules: {name}={axis}: unknown mesh axis {axis!r}; mesh "
                          f"axes are {', '.join(AXES)}")
  return tuple(pairs) + DEFAULT_RULES


def config_rules(parallel: Any) -> Rules:
  """The rules of a run: `parallel.rules` overrides, plus `replica=data+fsdp` under
  `parallel.pipeline_fsdp_gather_once`.

  Args:
    parallel: the config's `parallel` section.

  Returns:
    The rules, overrides first.

  Raises:
    ConfigError: a malformed rule, or a `replica` rule next to the flag that sets it.
  """
  rules = parse_rules(parallel.rules)
  if not parallel.pipeline_fsdp_gather_once:
    return rules
  if any(name == REPLICA for name, _ in rules[:len(rules) - len(DEFAULT_RULES)]):
    raise ConfigError("parallel.pipeline_fsdp_gather_once sets the rule replica=data+fsdp, "
                      "but parallel.rules names replica too: keep one of them")
  return ((REPLICA, ("data", "fsdp")),) + rules


def logical_shardings(abstract: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may carry logical axis names.

  Leaves boxed by `nn.with_logical_partitioning` are split as the rules say; other leaves
  are replicated. A dimension that the mapped mesh axes do not divide is replicated
  instead (logged once per parameter), so odd sizes never fail to shard.

  Args:
    abstract: e.g. `jax.eval_shape` of an init returning boxed parameters.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.

  Returns:
    A tree of NamedSharding with the structure of `nn.meta.unbox(abstract)`.
  """
  specs = nn.get_partition_spec(abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  # Structural unboxing: `nn.meta.unbox` would also apply sharding constraints.
  shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                        abstract, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

  def fit(spec: PartitionSpec, leaf: Any) -> NamedSharding:
    dims = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec)),
                          strict=True):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(mesh.shape[name] for name in names)
      if ways > 1 and size % ways:
        log.info("a dimension of size %d does not split %d ways over %s: replicated",
                 size, ways, "x".join(names))
        names = ()
      dims.append(None if not names else names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(*dims))

  return jax.tree.map(fit, mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def context(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
  """Tracing context: the mesh (`jax.set_mesh`) and the logical axis rules, so that
  `nn.with_logical_constraint` on activations becomes a real sharding constraint."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data` x `fsdp`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def local_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
  """The contiguous block of batch rows this process's devices hold.

  Args:
    sharding: the batch sharding.
    global_rows: the global batch size.

  Returns:
    `(start, stop)`: this process loads only rows start..stop-1 of each global batch.
  """
  indices = sharding.addressable_devices_indices_map((global_rows,))
  starts = [index[0].start or 0 for index in indices.values()]
  stops = [global_rows if index[0].stop is None else index[0].stop
           for index in indices.values()]
  return min(starts), max(stops)


def check_batch(mesh: jax.sharding.Mesh, batch_size: int, what: str, fix: str) -> None:
  """Raises ConfigError if `batch_size` does not split over the batch axes."""
  ways = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
  if batch_size % ways:
    raise ConfigError(f"{what}={batch_size} does not split over the mesh's "
                      f"{' x '.join(BATCH_AXES)}={ways} batch shards; {fix} to a multiple "
                      f"of {ways}")


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                 global_rows: int) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's rows (`local_rows`).

  Args:
    batch: this process's rows of every batch entry.
    sharding: the batch sharding.
    global_rows: the global batch size.

  Returns:
    Global jax.Arrays, each process contributing its own rows only.
  """
  def put(x: np.ndarray) -> jax.Array:
    shape = (global_rows, *x.shape[1:])
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return {key: put(np.asarray(value)) for key, value in batch.items()}
