"""The scikit-learn 8x8 handwritten digits dataset (embedded, no download).

1797 grey-scale 8x8 images, 10 classes. Small enough to train on CPU in
seconds, which makes it the default dataset for tests and smoke runs.
"""

from typing import Any

import numpy as np

from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset
from dsjax.errors import DataError

TEST_FRACTION = 0.2
NUM_CLASSES = 10
# sklearn stores pixel intensities as integers 0..16.
_MAX_PIXEL = 16.0


@register_dataset("digits")
def load_digits(data_config: Any) -> Dataset:
  """Loads digits with a deterministic train/val/test split.

  Test is 20% of all examples, val is `val_fraction` of all examples, train
  is the rest; the three are disjoint and cover every example.

  Args:
    data_config: object with fields val_fraction and split_seed (data_dir is
      ignored: the data ships with scikit-learn).

  Returns:
    Dataset with float32 images [N, 8, 8, 1] in [0, 1] and int32 labels.

  Raises:
    DataError: if val_fraction leaves no training examples.
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "digits")
  if val_fraction + TEST_FRACTION >= 1.0:
    raise DataError(
        f"digits: val_fraction={val_fraction} plus the fixed test fraction "
        f"{TEST_FRACTION} leaves no training data; set "
        "--config.data.val_fraction below 0.8 (e.g. 0.1).")
  from sklearn import datasets as sk_datasets  # noqa: PLC0415 - slow import, used only here.

  raw = sk_datasets.load_digits()
  images = (raw.images.astype(np.float32) / _MAX_PIXEL)[..., None]
  labels = raw.target.astype(np.int32)
  n = len(labels)
  n_test = int(round(TEST_FRACTION * n))
  n_val = int(round(val_fraction * n))
  perm = np.random.default_rng(int(data_config.split_seed)).permutation(n)
  # Sorting keeps each split in stored order; shuffling is the batcher's job.
  parts = {
      "test": np.sort(perm[:n_test]),
      "val": np.sort(perm[n_test:n_test + n_val]),
      "train": np.sort(perm[n_test + n_val:]),
  }
  splits = {k: {"image": images[idx], "label": labels[idx]}
            for k, idx in parts.items()}
  return Dataset(name="digits", splits=splits, num_classes=NUM_CLASSES)
