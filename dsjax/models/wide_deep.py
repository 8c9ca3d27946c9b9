"""Wide & Deep click-through-rate model (Cheng et al., 2016), with row-sharded tables.

logit = wide + deep:

* wide: a linear model over the dense features, one scalar weight per (categorical
  feature, hashed id), and one scalar weight per hashed crossed-feature value (pairs of
  categorical features, `crosses`);
* deep: an embedding per (categorical feature, hashed id), concatenated with the dense
  features and fed through a ReLU MLP.

Every table keeps its rows on the logical axis "vocab", so the sharding rule
`("vocab", "model")` splits the tables row-wise over the "model" mesh axis: each device
holds 1/model of every table, and XLA turns the lookups into local gathers plus a sum.
The 26 embedding tables are stored as one [num_sparse * embedding_rows, embedding_dim]
`dsjax.nn.Embed` (table f owns rows f * embedding_rows ... (f + 1) * embedding_rows - 1):
one gather for all features, and the layer's precision plan entry and statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import nn as dsnn
from dsjax.models import registry
from dsjax.precision import LayerPrecision, PrecisionPlan

NUM_DENSE = 13
# The pairs the `ctr-synthetic` generator puts crossed effects on (`SYNTHETIC_CROSSES`).
DEFAULT_CROSSES = ((0, 1), (2, 3), (4, 5), (6, 7))

_GOLDEN = np.uint32(0x9E3779B1)
_PAIR_SALT = np.uint32(0x85EBCA77)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def cross_ids(sparse: jax.Array, crosses: Sequence[tuple[int, int]], rows: int) -> jax.Array:
  """Hashes pairs of categorical ids into one crossed-feature table of `rows` buckets.

  The pair index is mixed in too, so equal id pairs of different crosses land apart. The
  hash is fixed integer arithmetic (uint32, wrapping), the same on every backend and run.

  Args:
    sparse: int [batch, num_sparse] non-negative raw ids.
    crosses: (i, j) column pairs to cross.
    rows: number of buckets.

  Returns:
    int32 [batch, len(crosses)] bucket ids in [0, rows).
  """
  left = sparse[:, np.asarray([i for i, _ in crosses], np.int32)].astype(jnp.uint32)
  right = sparse[:, np.asarray([j for _, j in crosses], np.int32)].astype(jnp.uint32)
  pair = (np.arange(len(crosses), dtype=np.uint32) + np.uint32(1)) * _PAIR_SALT
  h = _fmix32(left * _GOLDEN ^ _fmix32(right + pair))
  return (h % np.uint32(rows)).astype(jnp.int32)


class WideDeep(nn.Module):
  """Wide & Deep binary classifier over 13 dense and `num_sparse` categorical features.

  Attributes:
    num_sparse: number of categorical features (columns of `sparse`).
    embedding_rows: hash buckets per categorical feature; ids map to `id % rows`.
    embedding_dim: width of each deep embedding.
    mlp_dims: widths of the deep part's hidden ReLU layers.
    wide_rows: hash buckets of the wide crossed-feature table.
    crosses: pairs of categorical feature indices whose crossed value gets a wide weight.
    dropout_rate: dropout after each hidden layer, active in training only.
    precision: compute dtype, per-layer plan and the deep MLP's matmul implementation
      (`dsjax.precision.LayerPrecision`), handed to every layer.
  """

  num_sparse: int = 26
  embedding_rows: int = 1000
  embedding_dim: int = 16
  mlp_dims: Sequence[int] = (256, 128)
  wide_rows: int = 100_000
  crosses: Sequence[tuple[int, int]] = DEFAULT_CROSSES
  dropout_rate: float = 0.0
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, dense: jax.Array, sparse: jax.Array, *, train: bool = False) -> jax.Array:
    """Scores a batch.

    Args:
      dense: float32 [batch, 13] dense features (already log-transformed).
      sparse: int [batch, num_sparse] non-negative categorical ids.
      train: enables dropout (needs a "dropout" rng).

    Returns:
      float32 [batch] click logits.
    """
    if sparse.ndim != 2 or sparse.shape[1] != self.num_sparse:
      raise ValueError(f"sparse must be [batch, {self.num_sparse}], got {sparse.shape}")
    precision = self.precision
    rows = self.embedding_rows
    # Feature f's hashed id indexes rows f * rows ... of the shared (stacked) tables.
    offsets = jnp.arange(self.num_sparse, dtype=jnp.int32) * rows
    ids = jnp.remainder(sparse.astype(jnp.int32), rows) + offsets

    # Wide: linear in the dense features, the hashed ids and the hashed crosses; float32.
    # `precision.matmul_impl` picks the deep part's MLP kernels only.
    wide = dsnn.Dense(1, kernel_axes=(None, None), precision=precision.replace(matmul_impl="xla"),
                      name="wide_dense")(dense)
    wide = wide[:, 0].astype(jnp.float32)
    id_weights = dsnn.Embed(self.num_sparse * rows, 1, embedding_init=nn.initializers.zeros,
                            embedding_axes=("vocab", None), precision=precision,
                            name="wide_ids")
    wide = wide + jnp.sum(id_weights(ids).astype(jnp.float32), axis=(1, 2))
    if self.crosses:
      cross_weights = dsnn.Embed(self.wide_rows, 1, embedding_init=nn.initializers.zeros,
                                 embedding_axes=("vocab", None), precision=precision,
                                 name="wide_crosses")
      crossed = cross_ids(sparse, tuple(self.crosses), self.wide_rows)
      wide = wide + jnp.sum(cross_weights(crossed).astype(jnp.float32), axis=(1, 2))

    # Deep: embeddings and dense features through a ReLU MLP.
    embed = dsnn.Embed(self.num_sparse * rows, self.embedding_dim,
                       embedding_init=nn.initializers.normal(stddev=0.05),
                       embedding_axes=("vocab", "embed"), precision=precision,
                       name="embedding")
    x = embed(ids).reshape(sparse.shape[0], self.num_sparse * self.embedding_dim)
    x = jnp.concatenate([x, dense.astype(x.dtype)], axis=-1)
    in_axis = "embed"
    for i, width in enumerate(self.mlp_dims):
      # Alternate ("embed", "mlp") / ("mlp", "embed") so no kernel names one axis twice.
      out_axis = "mlp" if in_axis == "embed" else "embed"
      x = dsnn.Dense(width, kernel_axes=(in_axis, out_axis), precision=precision,
                     name=f"mlp_{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      in_axis = out_axis
    deep = dsnn.Dense(1, kernel_axes=(in_axis, None), precision=precision, name="deep_out")(x)
    # The loss is numerically sensitive: hand it float32 logits.
    return wide + deep[:, 0].astype(jnp.float32)


def _build(model_config: Any, num_classes: int, compute_dtype: Any,
           plan: PrecisionPlan | None = None) -> WideDeep:
  del num_classes  # Binary: one logit per example.
  return WideDeep(num_sparse=model_config.num_sparse,
                  embedding_rows=model_config.embedding_rows,
                  embedding_dim=model_config.embedding_dim,
                  mlp_dims=tuple(int(d) for d in model_config.mlp_dims),
                  wide_rows=model_config.wide_rows,
                  crosses=tuple((int(i), int(j)) for i, j in model_config.crosses),
                  dropout_rate=model_config.dropout_rate,
                  precision=LayerPrecision(compute_dtype, plan, model_config.matmul_impl))


def _check(model_config: Any) -> list[str]:
  problems = []
  for field in ("num_sparse", "embedding_rows", "embedding_dim", "wide_rows"):
    if model_config[field] < 1:
      problems.append(f"{field} must be >= 1, got {model_config[field]}")
  if model_config.num_sparse * model_config.embedding_rows >= 2**31:
    problems.append(f"num_sparse * embedding_rows must be below 2**31 (int32 row ids), got "
                    f"{model_config.num_sparse * model_config.embedding_rows}")
  if not model_config.mlp_dims or any(int(d) < 1 for d in model_config.mlp_dims):
    problems.append(f"mlp_dims must be positive layer widths, got {model_config.mlp_dims}")
  for pair in model_config.crosses:
    if (not isinstance(pair, tuple | list) or len(pair) != 2 or pair[0] == pair[1]
        or not all(0 <= int(i) < model_config.num_sparse for i in pair)):
      problems.append(f"crosses must be pairs of two different feature indices in "
                      f"[0, num_sparse={model_config.num_sparse}), got {pair!r}")
      break
  return problems + registry.check_shared_fields(model_config)


_DEFAULTS = {"num_sparse": 26, "embedding_rows": 1000, "embedding_dim": 16,
             "mlp_dims": (256, 128), "wide_rows": 100_000, "crosses": DEFAULT_CROSSES,
             "dropout_rate": 0.0, "matmul_impl": "xla"}
registry.register(registry.ModelSpec(
    name="wide-deep", build=_build, defaults=_DEFAULTS, dataset="ctr-synthetic",
    config_file="ctr_wide_deep.py", check=_check, task="ctr"))
