"""Tests for the Wide & Deep CTR model, the synthetic and Criteo CTR data and the config."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax import config as config_lib
from dsjax import measure
from dsjax.data import ctr
from dsjax.data.dataset import BatchIterator, get_dataset
from dsjax.errors import DataError
from dsjax.models import registry
from dsjax.models.wide_deep import WideDeep, cross_ids
from dsjax.precision import LayerPrecision

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "ctr_wide_deep.py"


def _data_config(name: str = "ctr-synthetic", num_examples: int = 2000, data_dir: str = "",
                 split_seed: int = 0, val_fraction: float = 0.1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=data_dir, val_fraction=val_fraction, split_seed=split_seed,
      num_examples=num_examples))


def _inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  dense = np.log1p(rng.integers(0, 100, (batch, ctr.NUM_DENSE))).astype(np.float32)
  sparse = rng.integers(0, 2**31 - 1, (batch, ctr.NUM_SPARSE), dtype=np.int64).astype(np.int32)
  return dense, sparse


# --- synthetic data -----------------------------------------------------------


def test_synthetic_shapes_metadata_and_determinism():
  ds = get_dataset(_data_config(num_examples=2000))
  assert ds.num_classes == 2
  assert {len(s["label"]) for s in ds.splits.values()} == {1600, 200}
  for split in ds.splits.values():
    assert split["dense"].dtype == np.float32 and split["dense"].shape[1] == 13
    assert split["sparse"].dtype == np.int32 and split["sparse"].shape[1] == 26
    assert split["label"].dtype == np.int32 and set(np.unique(split["label"])) <= {0, 1}
    assert split["sparse"].min() >= 0 and split["dense"].min() >= 0
  meta = ds.metadata
  assert set(meta) == {"bayes_auc", "bayes_log_loss", "num_dense", "num_sparse",
                       "positive_rate", "crosses"}
  assert 0.8 < meta["bayes_auc"] < 0.95 and 0.2 < meta["bayes_log_loss"] < 0.5
  assert 0.15 < meta["positive_rate"] < 0.35
  # The model's default crosses are the generator's crossed pairs.
  assert [list(p) for p in WideDeep().crosses] == meta["crosses"]
  again = get_dataset(_data_config(num_examples=2000))
  other = get_dataset(_data_config(num_examples=2000, split_seed=1))
  for key in ("dense", "sparse", "label"):
    np.testing.assert_array_equal(ds.splits["train"][key], again.splits["train"][key])
  assert not np.array_equal(ds.splits["train"]["sparse"], other.splits["train"]["sparse"])


def test_synthetic_rejects_too_few_examples():
  with pytest.raises(DataError, match="too few.*num_examples"):
    get_dataset(_data_config(num_examples=5))


# --- model ----------------------------------------------------------------------


def test_registry_build_and_check():
  spec = registry.get_spec("wide-deep")
  assert (spec.task, spec.dataset, spec.config_file) == ("ctr", "ctr-synthetic",
                                                         "ctr_wide_deep.py")
  model_config = ml_collections.ConfigDict(spec.defaults)
  assert list(spec.check(model_config)) == []
  model = spec.build(model_config, 2, jnp.bfloat16)
  assert isinstance(model, WideDeep) and model.precision.compute_dtype == jnp.bfloat16
  bad = ml_collections.ConfigDict({**spec.defaults, "embedding_rows": 0, "mlp_dims": (),
                                   "crosses": ((0, 26),), "dropout_rate": 1.0})
  problems = " ".join(spec.check(bad))
  for field in ("embedding_rows", "mlp_dims", "crosses", "dropout_rate"):
    assert field in problems


def test_forward_shapes_hashing_and_bf16():
  dense, sparse = _inputs(8)
  model = WideDeep(embedding_rows=50, embedding_dim=4, mlp_dims=(8,), crosses=())
  variables = jax.jit(model.init)(jax.random.key(0), dense, sparse)
  params = variables["params"]
  assert params["embedding"]["embedding"].value.shape == (26 * 50, 4)
  assert params["embedding"]["embedding"].names == ("vocab", "embed")
  assert params["wide_ids"]["embedding"].names == ("vocab", None)
  apply = jax.jit(model.apply)
  logits = apply(variables, dense, sparse)
  assert logits.shape == (8,) and logits.dtype == jnp.float32
  # Ids are hashed as id % embedding_rows (crosses off: they hash the raw ids).
  np.testing.assert_allclose(apply(variables, dense, sparse % 50 + 50 * 3), logits, atol=1e-6)
  half = WideDeep(embedding_rows=50, embedding_dim=4, mlp_dims=(8,), crosses=(),
                  precision=LayerPrecision(jnp.bfloat16))
  half_logits = jax.jit(half.apply)(variables, dense, sparse)
  assert half_logits.dtype == jnp.float32
  np.testing.assert_allclose(half_logits, logits, atol=0.05)


def test_cross_hash_is_pinned():
  # Changing the hash silently remaps every trained crossed weight: keep it fixed.
  sparse = jnp.asarray(np.arange(26, dtype=np.int32)[None] * 7919 + 1)
  np.testing.assert_array_equal(cross_ids(sparse, ((0, 1), (2, 3), (0, 1)), 1000),
                                [[163, 591, 727]])
  top = jnp.full((1, 26), 2**31 - 1, jnp.int32)
  np.testing.assert_array_equal(cross_ids(top, ((0, 1),), 1000), [[94]])


def test_sharded_tables_match_single_device_forward():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("vocab", "model"), ("batch", "data"))
  model = WideDeep(embedding_rows=1000, embedding_dim=8, mlp_dims=(32, 16), wide_rows=4096)
  dense, sparse = _inputs(16)

  def init(rng):
    return model.init(rng, dense, sparse)

  specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  params = nn.unbox(jax.jit(init, out_shardings=shardings)(jax.random.key(0)))
  tables = {name: params["params"][name]["embedding"]
            for name in ("embedding", "wide_ids", "wide_crosses")}
  for table in tables.values():
    assert tuple(table.sharding.spec)[0] == "model"
    assert table.addressable_shards[0].data.nbytes * 4 == table.nbytes
  assert tables["embedding"].addressable_shards[0].data.shape == (26 * 1000 // 4, 8)

  batch = NamedSharding(mesh, P("data"))
  inputs = (jax.device_put(dense, batch), jax.device_put(sparse, batch))
  compiled = jax.jit(model.apply).lower(params, *inputs).compile()
  # Lookups are local gathers plus an all-reduce of the looked-up rows: no device ever
  # assembles a whole table.
  assert "all-gather" not in compiled.as_text()
  sharded = compiled(params, *inputs)
  single = jax.jit(model.apply)(jax.device_get(params), dense, sparse)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_training_reaches_most_of_the_bayes_auc():
  ds = get_dataset(_data_config(num_examples=50_000))
  train, test = ds.splits["train"], ds.splits["test"]
  model = WideDeep(embedding_rows=1000, embedding_dim=8, mlp_dims=(64, 32), wide_rows=20_000)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), train["dense"][:2],
                                        train["sparse"][:2]))
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    logits = model.apply(params, batch["dense"], batch["sparse"])
    return optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32)).mean()

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batches = BatchIterator(train, 256, seed=0)
  start = time.perf_counter()
  for i in range(240):  # ~1.5 epochs: these small tables overfit beyond ~2.
    params, opt_state = step(params, opt_state, batches.batch(i))
  logits = jax.jit(model.apply)(params, test["dense"], test["sparse"])
  auc = measure.roc_auc(test["label"], logits)
  ratio = auc / ds.metadata["bayes_auc"]
  print(f"test AUC {auc:.4f} vs Bayes {ds.metadata['bayes_auc']:.4f} (ratio {ratio:.3f}) "
        f"in {time.perf_counter() - start:.1f}s")
  assert ratio >= 0.9


# --- Criteo TSV -----------------------------------------------------------------


def _criteo_lines(n: int, seed: int = 0) -> list[str]:
  """Random Criteo-format lines, with empty and negative integers and empty categoricals."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    ints = [("" if rng.random() < 0.2 else str(int(rng.integers(-3, 1000))))
            for _ in range(13)]
    cats = [("" if rng.random() < 0.2 else f"{int(rng.integers(0, 40)):08x}")
            for _ in range(26)]
    lines.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]))
  return lines


def test_criteo_loader(tmp_path):
  lines = _criteo_lines(200)
  (tmp_path / "day_1.tsv").write_text("\n".join(lines[:120]) + "\n\n")
  (tmp_path / "day_0.tsv").write_text("\n".join(lines[120:]) + "\n")
  (tmp_path / "notes.md").write_text("not data\n")
  ds = get_dataset(_data_config("criteo", data_dir=str(tmp_path)))
  assert ds.num_classes == 2 and "bayes_auc" not in ds.metadata
  assert {len(s["label"]) for s in ds.splits.values()} == {160, 20}
  merged = {k: np.concatenate([s[k] for s in ds.splits.values()]) for k in ds.splits["train"]}
  assert merged["dense"].dtype == np.float32 and merged["sparse"].dtype == np.int32
  assert merged["sparse"].min() >= 0
  # Match rows by their integers (expm1 undoes log1p to well within 0.5 for these counts).
  expected = {}
  for line in lines:
    fields = line.split("\t")
    expected[tuple(max(int(x), 0) if x else 0 for x in fields[1:14])] = int(fields[0])
  got = {}
  for dense, label in zip(merged["dense"], merged["label"], strict=True):
    ints = tuple(int(x) for x in np.rint(np.expm1(dense.astype(np.float64))))
    np.testing.assert_allclose(dense, np.log1p(ints), rtol=1e-6)
    got[ints] = int(label)
  assert got == expected
  assert ds.metadata["positive_rate"] == pytest.approx(np.mean(list(expected.values())))
  # Empty categoricals are id 0; a value hashes by (column, value), the same in every run.
  label, _, sparse = ctr._parse_criteo_line("1" + "\t" * 13 + "\t68fd1e64" + "\t" * 25,
                                            "x", 1)
  assert label == 1 and sparse[1:] == [0] * 25
  assert sparse[0] == ctr.hash_categorical(0, "68fd1e64") > 0
  assert ctr.hash_categorical(3, "68fd1e64") == 524510412
  assert ctr.hash_categorical(4, "68fd1e64") != ctr.hash_categorical(3, "68fd1e64")
  # num_examples caps how many lines are read; train.txt wins over other files.
  assert sum(len(s["label"]) for s in get_dataset(_data_config(
      "criteo", num_examples=50, data_dir=str(tmp_path))).splits.values()) == 50
  (tmp_path / "train.txt").write_text("\n".join(lines[:30]) + "\n")
  assert sum(len(s["label"]) for s in get_dataset(_data_config(
      "criteo", data_dir=str(tmp_path))).splits.values()) == 30


@pytest.mark.parametrize("bad, message", [
    ("1\t2\t3", "has 3 tab-separated fields, expected 40"),
    ("x" + "\t" * 39, "label 'x'"),
    ("0\tabc" + "\t" * 38, "I1 is 'abc'"),
], ids=["field-count", "label", "integer"])
def test_criteo_malformed_line_names_file_and_line(tmp_path, bad, message):
  lines = _criteo_lines(20)
  lines[6] = bad
  (tmp_path / "part.txt").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=f"part.txt' line 7.*{message}"):
    get_dataset(_data_config("criteo", data_dir=str(tmp_path)))


def test_criteo_missing_data(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    get_dataset(_data_config("criteo", data_dir=str(tmp_path / "nope")))
  with pytest.raises(DataError, match="needs --config.data.data_dir"):
    get_dataset(_data_config("criteo", data_dir=""))
  with pytest.raises(DataError, match="no train.txt"):
    get_dataset(_data_config("criteo", data_dir=str(tmp_path)))


# --- config -----------------------------------------------------------------------


@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_validates(arg):
  spec = importlib.util.spec_from_file_location("ctr_wide_deep", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config_lib.validate(config)
  assert config.model.name == "wide-deep" and config.data.name == "ctr-synthetic"
