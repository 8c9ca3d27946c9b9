"""Click-through-rate data: a synthetic generator with a known ceiling, and Criteo TSV files.

Both loaders give every split the arrays `dense` (float32 [N, 13], log-transformed counts),
`sparse` (int32 [N, 26], non-negative categorical ids; 0 means "missing") and `label`
(int32 [N], 0/1 click). Models hash the ids into their own tables (`id % rows`).

`ctr-synthetic` draws examples from a fixed logistic model, so the best achievable test AUC
(`metadata["bayes_auc"]`, the AUC of the true click probabilities) is known and a trained
model can be scored against it. `criteo` reads the Criteo display-advertising TSV format
(the Kaggle `train.txt`, or day files) from `data.data_dir`; nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset, split_train_val
from dsjax.errors import DataError
from dsjax.measure.auc import roc_auc

NUM_DENSE = 13
NUM_SPARSE = 26
TEST_FRACTION = 0.1
MISSING_ID = 0  # The id of an empty categorical field (Criteo) or of no value.

# Synthetic generator. The task (vocabularies, id frequencies, true weights) is fixed by
# _TASK_SALT alone; the split seed picks which examples are drawn and how they are split.
SYNTHETIC_DEFAULT_EXAMPLES = 100_000
# The feature pairs with a crossed (interaction) effect; `WideDeep`'s default `crosses`.
SYNTHETIC_CROSSES = ((0, 1), (2, 3), (4, 5), (6, 7))
_TASK_SALT = 0x5EED_C7A
_SAMPLE_SALT = 0xC7A_DA7A
_VOCAB_RANGE = (50, 1000)  # Distinct ids per categorical feature (log-uniform).
_ZIPF_EXPONENT = 1.3  # P(rank k) ~ (k + 1) ** -exponent.
_CROSS_TOP = 10  # Crossed effects act on pairs of the top-_CROSS_TOP ids of both features.
_BIAS = -2.4  # Puts the positive rate near Criteo's ~25%.

_CRITEO_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
_CRITEO_SALT = 0xC217E0
_HASH_RANGE = 2**31 - 1  # Hashed ids lie in [1, 2**31 - 1]: non-negative int32, 0 reserved.


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
  p = np.clip(probs, 1e-12, 1 - 1e-12)
  return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def _split_sizes(n: int, val_fraction: float, dataset: str) -> tuple[int, int]:
  n_test = int(round(TEST_FRACTION * n))
  n_val = int(round(val_fraction * n))
  if n - n_test - n_val < 1 or n_test < 1:
    raise DataError(
        f"{dataset}: {n} examples are too few for a {TEST_FRACTION:.0%} test split, a "
        f"{val_fraction:.0%} validation split and a training split; provide more examples "
        "(--config.data.num_examples) or lower --config.data.val_fraction.")
  return n_test, n_val


def _split(arrays: dict[str, np.ndarray], n_test: int, n_val: int,
           seed: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
  """Random disjoint test / val / train splits, each kept in stored order."""
  n = len(arrays["label"])
  rest, test_idx = split_train_val(n, n_test, [*seed, 0])
  train_pos, val_pos = split_train_val(len(rest), n_val, [*seed, 1])
  parts = {"train": rest[train_pos], "val": rest[val_pos], "test": test_idx}
  return {name: {k: v[idx] for k, v in arrays.items()} for name, idx in parts.items()}


class _SyntheticTask:
  """The fixed logistic model behind `ctr-synthetic` (drawn once from _TASK_SALT)."""

  def __init__(self) -> None:
    rng = np.random.default_rng(_TASK_SALT)
    # Dense counts: log1p(floor(lognormal)), as a Criteo loader would deliver them.
    self.dense_mu = rng.uniform(0.0, 3.0, NUM_DENSE)
    self.dense_sigma = rng.uniform(0.5, 1.5, NUM_DENSE)
    self.dense_w = rng.normal(0.0, 0.5, NUM_DENSE) * (rng.random(NUM_DENSE) < 0.7)
    low, high = np.log(_VOCAB_RANGE[0]), np.log(_VOCAB_RANGE[1])
    self.vocab = np.exp(rng.uniform(low, high, NUM_SPARSE)).astype(np.int64)
    # Per-feature effect scale: a few strong features, most weak, some irrelevant.
    scale = rng.choice([0.0, 0.2, 0.4, 0.7], NUM_SPARSE, p=[0.25, 0.35, 0.25, 0.15])
    self.probs, self.ids, self.effects = [], [], []
    for f in range(NUM_SPARSE):
      v = int(self.vocab[f])
      p = (np.arange(v) + 1.0) ** -_ZIPF_EXPONENT
      self.probs.append(p / p.sum())
      # Rank -> id: hot ids are not simply the small numbers. Ids start at 1 (0 = missing).
      self.ids.append(rng.permutation(v).astype(np.int32) + 1)
      self.effects.append(rng.normal(0.0, scale[f], v))
    self.cross_effects = [rng.normal(0.0, 0.8, (_CROSS_TOP, _CROSS_TOP))
                          for _ in SYNTHETIC_CROSSES]

  def sample(self, n: int, seed: Sequence[int]) -> dict[str, np.ndarray]:
    """Draws n examples; returns the dataset arrays plus `prob`, the true P(click)."""
    rng = np.random.default_rng(list(seed))
    raw = np.floor(np.exp(rng.normal(self.dense_mu, self.dense_sigma, (n, NUM_DENSE))))
    dense = np.log1p(raw).astype(np.float32)
    # Centre on the distribution's mean log-count so the dense weights do not shift the bias.
    logit = _BIAS + (dense - self.dense_mu) @ self.dense_w
    ranks = np.empty((n, NUM_SPARSE), np.int64)
    for f in range(NUM_SPARSE):
      ranks[:, f] = rng.choice(int(self.vocab[f]), size=n, p=self.probs[f])
      logit += self.effects[f][ranks[:, f]]
    for (a, b), table in zip(SYNTHETIC_CROSSES, self.cross_effects, strict=True):
      hot = (ranks[:, a] < _CROSS_TOP) & (ranks[:, b] < _CROSS_TOP)
      logit[hot] += table[ranks[hot, a], ranks[hot, b]]
    sparse = np.stack([self.ids[f][ranks[:, f]] for f in range(NUM_SPARSE)], axis=1)
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.int32)
    return {"dense": dense, "sparse": sparse.astype(np.int32), "label": label, "prob": prob}


@register_dataset("ctr-synthetic")
def load_ctr_synthetic(data_config: Any) -> Dataset:
  """Synthetic click logs drawn from a known logistic model, with its Bayes ceiling.

  The true logit is a bias, plus a linear function of the 13 log-count dense features,
  plus one effect per (categorical feature, id) for 26 features whose ids follow a Zipf
  law over 50..1000 distinct values, plus crossed effects on the feature pairs
  `SYNTHETIC_CROSSES` (non-zero when both ids are among their feature's 10 most frequent),
  so a wide crossed-feature part has something to learn. Labels are Bernoulli draws of
  sigmoid(logit). The task is the same for every seed; `split_seed` decides which examples
  are drawn and the splits (test 10%, val `val_fraction`, both of all examples).

  Args:
    data_config: object with fields val_fraction, split_seed and num_examples (0: 100,000;
      data_dir is ignored).

  Returns:
    Dataset with `dense`, `sparse` and `label` arrays per split, num_classes 2, and
    metadata `bayes_auc` and `bayes_log_loss` (of the true probabilities on the test
    split), `num_dense`, `num_sparse`, `positive_rate` (over all examples) and `crosses`.

  Raises:
    DataError: if val_fraction is out of range or the examples are too few to split.
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "ctr-synthetic")
  n = int(getattr(data_config, "num_examples", 0) or 0) or SYNTHETIC_DEFAULT_EXAMPLES
  if n < 0:
    raise DataError(f"ctr-synthetic: num_examples must be >= 0 (0 is the default), got {n}; "
                    "set --config.data.num_examples to e.g. 100000.")
  n_test, n_val = _split_sizes(n, val_fraction, "ctr-synthetic")
  seed = [_SAMPLE_SALT, int(data_config.split_seed)]
  arrays = _SyntheticTask().sample(n, seed)
  positive_rate = float(arrays["label"].mean())
  splits = _split(arrays, n_test, n_val, seed)
  test = splits["test"]
  metadata = {
      "bayes_auc": roc_auc(test["label"], test["prob"]),
      "bayes_log_loss": _log_loss(test["label"], test["prob"]),
      "num_dense": NUM_DENSE,
      "num_sparse": NUM_SPARSE,
      "positive_rate": positive_rate,
      "crosses": [list(pair) for pair in SYNTHETIC_CROSSES],
  }
  for split in splits.values():
    del split["prob"]
  return Dataset(name="ctr-synthetic", splits=splits, num_classes=2, metadata=metadata)


def _criteo_files(data_dir: str) -> list[str]:
  needs = ("criteo needs --config.data.data_dir=DIR holding Criteo TSV files (train.txt, "
           "or *.tsv / *.txt day files: label, 13 integer and 26 categorical columns)")
  if not data_dir:
    raise DataError(needs + ".")
  if not os.path.isdir(data_dir):
    raise DataError(f"criteo: data_dir {data_dir!r} does not exist or is not a directory; "
                    f"{needs}.")
  # The Kaggle archive also holds test.txt, which has no label column: use train.txt alone.
  if os.path.isfile(os.path.join(data_dir, "train.txt")):
    return [os.path.join(data_dir, "train.txt")]
  files = sorted(f for f in os.listdir(data_dir) if f.endswith((".tsv", ".txt"))
                 and os.path.isfile(os.path.join(data_dir, f)))
  if not files:
    raise DataError(f"criteo: no train.txt, *.tsv or *.txt file in {data_dir!r}; {needs}.")
  return [os.path.join(data_dir, f) for f in files]


def hash_categorical(feature: int, value: str) -> int:
  """Stable id of a categorical value: crc32 of "feature:value" into [1, 2**31 - 1].

  Unlike Python's `hash`, the result is the same in every process; the empty value maps
  to `MISSING_ID` (0).

  Args:
    feature: index of the categorical column (0..25), so equal strings in different
      columns get different ids.
    value: the raw field (Criteo: 8 hex digits).

  Returns:
    A non-negative int32 id.
  """
  if not value:
    return MISSING_ID
  return zlib.crc32(f"{feature}:{value}".encode()) % _HASH_RANGE + 1


def _parse_criteo_line(line: str, path: str, lineno: int) -> tuple[int, list[float], list[int]]:
  fields = line.split("\t")
  where = f"criteo: {path!r} line {lineno}"
  if len(fields) != _CRITEO_FIELDS:
    raise DataError(f"{where} has {len(fields)} tab-separated fields, expected "
                    f"{_CRITEO_FIELDS} (label, 13 integers, 26 categoricals); fix or remove "
                    "the line.")
  if fields[0] not in ("0", "1"):
    raise DataError(f"{where} has label {fields[0]!r}, expected 0 or 1; fix or remove the "
                    "line (files without labels, like Kaggle's test.txt, cannot be used).")
  dense = []
  for i, field in enumerate(fields[1:1 + NUM_DENSE]):
    try:
      value = int(field) if field else 0
    except ValueError:
      raise DataError(f"{where}: integer column I{i + 1} is {field!r}, not an integer; fix "
                      "or remove the line.") from None
    dense.append(math.log1p(max(value, 0)))
  sparse = [hash_categorical(i, field)
            for i, field in enumerate(fields[1 + NUM_DENSE:])]
  return int(fields[0]), dense, sparse


@register_dataset("criteo")
def load_criteo(data_config: Any) -> Dataset:
  """Criteo display-advertising logs from TSV files, with random train/val/test splits.

  Reads `train.txt` in `data_dir` if present, else every `*.tsv` / `*.txt` file there in
  sorted order. Each line is `label \\t I1..I13 \\t C1..C26`. Integers become
  log1p(max(x, 0)) (empty: 0); categorical strings become `hash_categorical` ids (empty:
  0). Blank lines are skipped. The whole file is parsed in Python, which takes minutes
  per ten million lines: use `num_examples` to read only the first lines.

  Args:
    data_config: object with fields data_dir, val_fraction, split_seed and num_examples
      (> 0: read at most this many examples; 0: all).

  Returns:
    Dataset with `dense`, `sparse` and `label` arrays per split (test 10% and val
    `val_fraction` of all examples), num_classes 2, and metadata `num_dense`,
    `num_sparse` and `positive_rate`.

  Raises:
    DataError: if data_dir is unset or missing, holds no data file, a line is malformed
      (the message names the file and line), or there are too few examples to split.
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "criteo")
  limit = int(getattr(data_config, "num_examples", 0) or 0)
  labels: list[int] = []
  dense: list[list[float]] = []
  sparse: list[list[int]] = []
  for path in _criteo_files(getattr(data_config, "data_dir", "") or ""):
    with open(path, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        if 0 < limit <= len(labels):
          break
        line = line.rstrip("\r\n")  # Not strip(): trailing empty fields are tabs.
        if not line.strip():
          continue
        label, d, s = _parse_criteo_line(line, path, lineno)
        labels.append(label)
        dense.append(d)
        sparse.append(s)
  n = len(labels)
  if n == 0:
    raise DataError(f"criteo: the files in {data_config.data_dir!r} hold no examples; point "
                    "--config.data.data_dir at the Criteo TSV files.")
  n_test, n_val = _split_sizes(n, val_fraction, "criteo")
  arrays = {"dense": np.asarray(dense, np.float32).reshape(n, NUM_DENSE),
            "sparse": np.asarray(sparse, np.int64).astype(np.int32).reshape(n, NUM_SPARSE),
            "label": np.asarray(labels, np.int32)}
  splits = _split(arrays, n_test, n_val, [_CRITEO_SALT, int(data_config.split_seed)])
  metadata = {"num_dense": NUM_DENSE, "num_sparse": NUM_SPARSE,
              "positive_rate": float(arrays["label"].mean())}
  return Dataset(name="criteo", splits=splits, num_classes=2, metadata=metadata)
