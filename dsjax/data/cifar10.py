"""CIFAR-10 from the standard python pickle batches on local disk.

Expects `data_batch_1`..`data_batch_5` and `test_batch` (the contents of
cifar-10-python.tar.gz) in `data_dir` or in its `cifar-10-batches-py`
subfolder. Nothing is downloaded. Only files the user points at are
unpickled.
"""

import os
import pickle
from typing import Any

import numpy as np

from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset, split_train_val
from dsjax.errors import DataError

NUM_CLASSES = 10
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"
MEAN = np.array((0.4914, 0.4822, 0.4465), np.float32)
STD = np.array((0.2470, 0.2435, 0.2616), np.float32)
_SIDE = 32
_ROW = 3 * _SIDE * _SIDE

_NEEDS_DIR = ("cifar10 needs --config.data.data_dir=DIR holding the CIFAR-10 "
              "python batches (data_batch_1..5, test_batch)")


def _find_dir(data_dir: str) -> str:
  """Returns the folder holding the batches, or raises a DataError."""
  if not data_dir:
    raise DataError(_NEEDS_DIR + ".")
  if not os.path.isdir(data_dir):
    raise DataError(
        f"cifar10: data_dir {data_dir!r} does not exist or is not a "
        f"directory; {_NEEDS_DIR}.")
  wanted = TRAIN_FILES + (TEST_FILE,)
  candidates = [data_dir, os.path.join(data_dir, SUBDIR)]
  for d in candidates:
    if all(os.path.isfile(os.path.join(d, f)) for f in wanted):
      return d
  # Report against whichever folder holds more of the files, as that is most
  # likely the one the user meant.
  def missing(d: str) -> list[str]:
    return [f for f in wanted if not os.path.isfile(os.path.join(d, f))]
  best = min(candidates, key=lambda d: len(missing(d)))
  raise DataError(
      f'cifar10: missing {", ".join(missing(best))} in {best!r}; {_NEEDS_DIR} '
      '(extract cifar-10-python.tar.gz there).')


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one pickle batch as (uint8 [n, 3072], int32 [n])."""
  try:
    with open(path, "rb") as f:
      d = pickle.load(f, encoding="bytes")
  except Exception as e:  # pickle raises many types on garbage input.
    raise DataError(
        f"cifar10: {path!r} is not a valid CIFAR-10 python pickle "
        f"({type(e).__name__}: {e}); re-extract cifar-10-python.tar.gz."
    ) from e
  if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
    keys = sorted(d.keys(), key=repr) if isinstance(d, dict) else type(d)
    raise DataError(
        f"cifar10: {path!r} lacks the b'data'/b'labels' entries of a "
        f"CIFAR-10 python batch (found {keys}); re-extract "
        "cifar-10-python.tar.gz.")
  data = np.asarray(d[b"data"])
  labels = np.asarray(d[b"labels"])
  if data.ndim != 2 or data.shape[1] != _ROW:
    raise DataError(
        f"cifar10: {path!r} has b'data' of shape {data.shape}, expected "
        f"[n, {_ROW}]; re-extract cifar-10-python.tar.gz.")
  if labels.shape != (data.shape[0],):
    raise DataError(
        f"cifar10: {path!r} has b'labels' of shape {labels.shape} for "
        f"{data.shape[0]} images, expected ({data.shape[0]},); re-extract "
        "cifar-10-python.tar.gz.")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise DataError(
        f"cifar10: {path!r} has labels outside 0..{NUM_CLASSES - 1}; "
        "re-extract cifar-10-python.tar.gz.")
  return data.astype(np.uint8), labels.astype(np.int32)


def _to_images(data: np.ndarray) -> np.ndarray:
  """uint8 [n, 3072] channel-major rows -> normalised float32 [n, 32, 32, 3]."""
  x = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
  return (x.astype(np.float32) / 255.0 - MEAN) / STD


@register_dataset("cifar10")
def load_cifar10(data_config: Any) -> Dataset:
  """Loads CIFAR-10 with a deterministic validation slice of train.

  Args:
    data_config: object with fields data_dir, val_fraction, split_seed.

  Returns:
    Dataset with float32 images [n, 32, 32, 3] normalised per channel and
    int32 labels; 'test' is test_batch.

  Raises:
    DataError: if data_dir is unset or missing, a batch file is missing, or
      a file is not a valid CIFAR-10 batch.
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "cifar10")
  folder = _find_dir(getattr(data_config, "data_dir", "") or "")
  parts = [_read_batch(os.path.join(folder, f)) for f in TRAIN_FILES]
  train_x = np.concatenate([p[0] for p in parts])
  train_y = np.concatenate([p[1] for p in parts])
  test_x, test_y = _read_batch(os.path.join(folder, TEST_FILE))
  n_val = int(round(val_fraction * len(train_y)))
  train_idx, val_idx = split_train_val(
      len(train_y), n_val, int(data_config.split_seed))
  splits = {
      "train": {"image": _to_images(train_x[train_idx]),
                "label": train_y[train_idx]},
      "val": {"image": _to_images(train_x[val_idx]),
              "label": train_y[val_idx]},
      "test": {"image": _to_images(test_x), "label": test_y},
  }
  return Dataset(name="cifar10", splits=splits, num_classes=NUM_CLASSES)
