"""Tests for dsjax.data: digits and CIFAR-10 loaders, batching, eval padding."""

import pickle

import ml_collections
import numpy as np
import pytest

from dsjax.data import DATASETS, BatchIterator, eval_batches, get_dataset
from dsjax.errors import DataError


def _config(name: str = "digits", data_dir: str = "", val_fraction: float = 0.1,
            split_seed: int = 0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=data_dir, val_fraction=val_fraction,
      split_seed=split_seed))


@pytest.fixture(scope="module")
def digits():
  return get_dataset(_config())


def _row_set(images: np.ndarray) -> set[bytes]:
  return {row.tobytes() for row in images}


# --- digits -----------------------------------------------------------------


def test_registry_and_unknown_name():
  assert {"digits", "cifar10"} <= set(DATASETS)
  with pytest.raises(DataError, match="Unknown dataset 'nope'.*digits"):
    get_dataset(_config(name="nope"))


def test_digits_shapes_dtypes_range(digits):
  assert digits.num_classes == 10
  assert digits.input_shape == (8, 8, 1)
  for split in digits.splits.values():
    assert split["image"].dtype == np.float32
    assert split["label"].dtype == np.int32
    assert split["image"].shape[1:] == (8, 8, 1)
    assert split["image"].min() >= 0.0 and split["image"].max() <= 1.0
    assert set(np.unique(split["label"])) <= set(range(10))
  assert digits.splits["train"]["image"].max() == 1.0


def test_digits_split_sizes(digits):
  sizes = {k: len(v["label"]) for k, v in digits.splits.items()}
  total = sum(sizes.values())
  assert total == 1797
  assert sizes["test"] == round(0.2 * total)
  assert sizes["val"] == round(0.1 * total)


def test_digits_splits_disjoint(digits):
  # The 1797 sklearn digit images are pairwise distinct, so row bytes identify
  # examples.
  rows = {k: _row_set(v["image"]) for k, v in digits.splits.items()}
  assert not rows["train"] & rows["val"]
  assert not rows["train"] & rows["test"]
  assert not rows["val"] & rows["test"]
  assert len(rows["train"] | rows["val"] | rows["test"]) == 1797


def test_digits_deterministic_and_seeded(digits):
  again = get_dataset(_config())
  for k in digits.splits:
    np.testing.assert_array_equal(digits.splits[k]["image"],
                                  again.splits[k]["image"])
    np.testing.assert_array_equal(digits.splits[k]["label"],
                                  again.splits[k]["label"])
  other = get_dataset(_config(split_seed=1))
  assert (_row_set(other.splits["test"]["image"])
          != _row_set(digits.splits["test"]["image"]))


# --- BatchIterator ----------------------------------------------------------


def _toy(n: int = 23) -> dict[str, np.ndarray]:
  return {"image": np.arange(n, dtype=np.float32)[:, None] * 10.0,
          "label": np.arange(n, dtype=np.int32)}


def test_batch_is_pure_function_of_step():
  it = BatchIterator(_toy(), 5, seed=3)
  for step in (0, 7, 3, 12, 0):
    fresh = BatchIterator(_toy(), 5, seed=3)
    b1, b2 = it.batch(step), fresh.batch(step)
    for k in b1:
      np.testing.assert_array_equal(b1[k], b2[k])
  assert not np.array_equal(it.batch(0)["label"],
                            BatchIterator(_toy(), 5, seed=4).batch(0)["label"])


def test_resume_via_state_continues_identically():
  it = BatchIterator(_toy(), 5, seed=3)
  for _ in range(5):
    next(it)
  state = it.get_state()
  assert state == {"step": 5, "seed": 3, "batch_size": 5, "num_examples": 23}
  resumed = BatchIterator(_toy(), 5, seed=3)
  resumed.set_state(dict(state))
  for _ in range(10):
    a, b = next(it), next(resumed)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert it.step == resumed.step == 15


def test_each_epoch_is_a_permutation():
  it = BatchIterator(_toy(), 5, seed=0)
  spe = it.steps_per_epoch
  assert spe == 4
  orders = []
  for epoch in range(3):
    labels = np.concatenate(
        [it.batch(epoch * spe + s)["label"] for s in range(spe)])
    assert len(labels) == spe * 5
    assert len(set(labels.tolist())) == spe * 5
    orders.append(labels.tolist())
  assert orders[0] != orders[1]
  unshuffled = BatchIterator(_toy(), 5, seed=0, shuffle=False)
  np.testing.assert_array_equal(unshuffled.batch(5)["label"], np.arange(5, 10))


def test_set_state_mismatch_raises():
  state = BatchIterator(_toy(), 5, seed=3).get_state()
  for other in (BatchIterator(_toy(), 5, seed=4),
                BatchIterator(_toy(), 4, seed=3),
                BatchIterator(_toy(22), 5, seed=3)):
    with pytest.raises(DataError, match="different data config"):
      other.set_state(state)


def test_batch_larger_than_split_raises():
  with pytest.raises(DataError, match="has 23 examples, fewer than"):
    BatchIterator(_toy(), 24, seed=0)


def test_eval_batches_cover_once_with_mask():
  data = _toy(23)
  seen = []
  for batch, mask in eval_batches(data, 5):
    assert batch["image"].shape == (5, 1)
    assert batch["label"].shape == (5,)
    assert mask.dtype == np.float32 and mask.shape == (5,)
    real = mask.astype(bool)
    seen.extend(batch["label"][real].tolist())
    assert np.all(batch["image"][~real] == 0)
  assert seen == list(range(23))
  masks = [m for _, m in eval_batches(data, 5)]
  assert len(masks) == 5
  np.testing.assert_array_equal(masks[-1], [1, 1, 1, 0, 0])
  assert len(list(eval_batches(_toy(10), 5))) == 2


# --- CIFAR-10 ---------------------------------------------------------------

def test_cifar_shapes_and_normalisation(tmp_path, make_cifar10):
  make_cifar10(tmp_path)
  # Hand-built test image: pixel (r=1, c=2) has R=255, G=0, B=128.
  img = np.zeros((3, 32, 32), np.uint8)
  img[0, 1, 2], img[1, 1, 2], img[2, 1, 2] = 255, 0, 128
  data = np.zeros((4, 3072), np.uint8)
  data[2] = img.reshape(-1)
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, f)

  ds = get_dataset(_config("cifar10", str(tmp_path), val_fraction=0.2))
  assert ds.input_shape == (32, 32, 3)
  assert ds.num_classes == 10
  assert len(ds.splits["train"]["label"]) == 24
  assert len(ds.splits["val"]["label"]) == 6
  test = ds.splits["test"]
  assert test["image"].shape == (4, 32, 32, 3)
  assert test["image"].dtype == np.float32
  assert test["label"].dtype == np.int32
  np.testing.assert_array_equal(test["label"], [0, 1, 2, 3])

  mean = np.array([0.4914, 0.4822, 0.4465], np.float64)
  std = np.array([0.2470, 0.2435, 0.2616], np.float64)
  expected_px = (np.array([255, 0, 128], np.float64) / 255.0 - mean) / std
  np.testing.assert_allclose(test["image"][2, 1, 2], expected_px, rtol=1e-5)
  np.testing.assert_allclose(test["image"][2, 0, 0], -mean / std, rtol=1e-5)
  # Layout check: the same pixel with rows/cols swapped must not be hit.
  np.testing.assert_allclose(test["image"][2, 2, 1], -mean / std, rtol=1e-5)


def test_cifar_found_in_subfolder(tmp_path, make_cifar10):
  make_cifar10(tmp_path / "cifar-10-batches-py")
  ds = get_dataset(_config("cifar10", str(tmp_path), val_fraction=0.1))
  assert len(ds.splits["train"]["label"]) + len(ds.splits["val"]["label"]) == 30
  assert len(ds.splits["test"]["label"]) == 4


def test_cifar_empty_data_dir():
  with pytest.raises(DataError, match="needs --config.data.data_dir"):
    get_dataset(_config("cifar10", ""))


def test_cifar_missing_dir(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="does not exist") as e:
    get_dataset(_config("cifar10", missing))
  assert missing in str(e.value)


def test_cifar_missing_batch_file(tmp_path, make_cifar10):
  make_cifar10(tmp_path, skip=("data_batch_3",))
  with pytest.raises(DataError, match="missing data_batch_3") as e:
    get_dataset(_config("cifar10", str(tmp_path)))
  assert str(tmp_path) in str(e.value)
  assert "data_batch_1" not in str(e.value).split(";")[0]


def test_cifar_corrupt_file(tmp_path, make_cifar10):
  make_cifar10(tmp_path)
  (tmp_path / "data_batch_2").write_bytes(b"\x00garbage not a pickle\xff" * 3)
  with pytest.raises(DataError, match="data_batch_2.*not a valid"):
    get_dataset(_config("cifar10", str(tmp_path)))


def test_cifar_wrong_keys(tmp_path, make_cifar10):
  make_cifar10(tmp_path)
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, f)
  with pytest.raises(DataError, match="test_batch.*lacks the b'data'"):
    get_dataset(_config("cifar10", str(tmp_path)))


def test_cifar_wrong_shape(tmp_path, make_cifar10):
  make_cifar10(tmp_path)
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(DataError, match=r"data_batch_1.*shape \(2, 100\)"):
    get_dataset(_config("cifar10", str(tmp_path)))
