"""Dataset container, dataset registry and deterministic batching.

Batching is index based: the batch for training step `s` is a pure function of
(seed, s). That makes resuming from a checkpoint bit-exact, since the whole data
position is just the step counter, with no iterator state to pickle.
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dsjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset: its splits, class count and metadata.

  Attributes:
    name: registry name of the dataset.
    splits: split name ('train', 'val', 'test') -> {'image': float32 NHWC
      array, 'label': int32 array [N]}; an entry may be a `dsjax.data.lazy.LazyColumn`
      that reads its rows on demand (prepared shards, image folders).
    num_classes: number of label classes (the vocabulary size for token data).
    metadata: facts about the data a model or task needs (e.g. special token ids, the
      Bayes-optimal AUC of a synthetic generator); JSON-serialisable.
    transform: `transform(batch, indices, epoch, seed) -> batch`, the training
      augmentation the streaming loader applies in its workers (`dsjax.data.loader`), per
      example from the seed, epoch and example index; None: none.
  """
  name: str
  splits: dict[str, dict[str, np.ndarray]]
  num_classes: int
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  transform: Callable[..., dict[str, np.ndarray]] | None = None

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one image, e.g. (8, 8, 1)."""
    return tuple(self.splits["train"]["image"].shape[1:])


def num_examples(arrays: dict[str, np.ndarray]) -> int:
  """The common leading size N of a split's arrays (ValueError if they disagree)."""
  sizes = {k: len(v) for k, v in arrays.items()}
  if not sizes:
    raise ValueError("arrays must hold at least one array.")
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays have different leading sizes: {sizes}")
  return next(iter(sizes.values()))


def epoch_order(seed: int, epoch: int, num_examples: int, shuffle: bool = True) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples (every loader's, so that the
  in-memory and the streaming loaders give the same batches).

  Args:
    seed: the shuffling seed.
    epoch: the epoch, from 0.
    num_examples: N.
    shuffle: False: stored order.

  Returns:
    int64 [N]: `np.random.default_rng([seed, epoch]).permutation(N)`, or arange(N).
  """
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


class BatchIterator:
  """Deterministic, resumable training batches (drops the last partial batch).

  Epoch `e` visits the examples in the order
  `np.random.default_rng([seed, e]).permutation(N)` (identity order if
  `shuffle=False`), so `batch(step)` never depends on what was read before.
  """

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *,
               seed: int, shuffle: bool = True):
    """Creates the iterator positioned at step 0.

    Args:
      arrays: name -> array, all with the same leading size N.
      batch_size: examples per batch.
      seed: shuffling seed; together with the step it fixes every batch.
      shuffle: if False, every epoch visits examples in stored order.

    Raises:
      DataError: if the split holds fewer than `batch_size` examples.
    """
    if batch_size < 1:
      raise DataError(
          f"batch_size must be positive, got {batch_size}; set a batch size "
          ">= 1.")
    self.arrays = arrays
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.num_examples = num_examples(arrays)
    if self.num_examples < self.batch_size:
      raise DataError(
          f"The split has {self.num_examples} examples, fewer than batch_size="
          f"{self.batch_size}; lower the batch size to at most "
          f"{self.num_examples}.")
    self.steps_per_epoch = self.num_examples // self.batch_size
    self.step = 0
    # (start, stop): this process's rows of every batch (multi-process runs); None: all.
    self.rows: tuple[int, int] | None = None
    self._cached_epoch = -1
    self._cached_order = np.arange(0)

  def _order(self, epoch: int) -> np.ndarray:
    # Regenerating a permutation costs O(N); do it once per epoch, not per step.
    if epoch != self._cached_epoch:
      self._cached_order = epoch_order(self.seed, epoch, self.num_examples, self.shuffle)
      self._cached_epoch = epoch
    return self._cached_order

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Returns the batch for training step `step` (a pure function of it).

    Args:
      step: non-negative global step.

    Returns:
      name -> array of leading size `batch_size`.
    """
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}.")
    epoch, within = divmod(int(step), self.steps_per_epoch)
    start = within * self.batch_size
    idx = self._order(epoch)[start:start + self.batch_size]
    if self.rows is not None:
      idx = idx[self.rows[0]:self.rows[1]]  # Gather only the rows this process feeds.
    return {k: v[idx] for k, v in self.arrays.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict[str, int]:
    """Returns the JSON-serialisable data position, for checkpoints."""
    return {
        "step": int(self.step),
        "seed": self.seed,
        "batch_size": self.batch_size,
        "num_examples": self.num_examples,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by `get_state`.

    Args:
      state: dict from `get_state`.

    Raises:
      DataError: if the state was saved for a different seed, batch size or
        dataset size, so the same step would not give the same batch.
    """
    mine = self.get_state()
    diffs = [f"{k}: checkpoint {state.get(k)!r} vs current {mine[k]!r}"
             for k in ("seed", "batch_size", "num_examples")
             if state.get(k) != mine[k]]
    if diffs:
      raise DataError(
          'The checkpoint\'s data position was saved for a different data '
          f'config ({"; ".join(diffs)}); resume with the original data '
          'config or start a fresh run.')
    self.step = int(state["step"])


def eval_batches(
    arrays: dict[str, np.ndarray], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Yields every example once, in order, in fixed-size padded batches.

  The last batch is zero-padded so every batch has the same shape, which keeps
  a jitted eval step from recompiling.

  Args:
    arrays: name -> array, all with the same leading size N.
    batch_size: examples per batch.

  Yields:
    (batch, mask): batch maps name -> array of leading size `batch_size`;
    mask is float32 [batch_size], 1.0 for real examples, 0.0 for padding.
  """
  if batch_size < 1:
    raise DataError(
        f"batch_size must be positive, got {batch_size}; set a batch size "
        ">= 1.")
  n = num_examples(arrays)
  for start in range(0, n, batch_size):
    real = min(batch_size, n - start)
    batch = {}
    for k, v in arrays.items():
      chunk = v[start:start + real]
      if real < batch_size:
        pad = np.zeros((batch_size - real,) + v.shape[1:], dtype=v.dtype)
        chunk = np.concatenate([chunk, pad], axis=0)
      batch[k] = chunk
    mask = np.zeros((batch_size,), np.float32)
    mask[:real] = 1.0
    yield batch, mask


Loader = Callable[[Any], Dataset]

# Filled by the loader modules via `register_dataset`; the package __init__
# imports them, so the registry is complete before anyone can call get_dataset.
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
  """Decorator that adds a loader `(data_config) -> Dataset` to `DATASETS`."""
  def wrap(fn: Loader) -> Loader:
    DATASETS[name] = fn
    return fn
  return wrap


def get_dataset(data_config: Any) -> Dataset:
  """Loads the dataset named by `data_config.name`.

  Args:
    data_config: object with fields name, data_dir, val_fraction, split_seed.

  Returns:
    The loaded Dataset.

  Raises:
    DataError: for an unknown dataset name, or whatever the loader raises.
  """
  name = data_config.name
  if name not in DATASETS:
    raise DataError(
        f"Unknown dataset {name!r}; set --config.data.name to one of "
        f"{sorted(DATASETS)}.")
  return DATASETS[name](data_config)


def split_train_val(
    num_examples: int, val_count: int, seed: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
  """Deterministically picks `val_count` validation indices out of N.

  Args:
    num_examples: N, the number of training examples to split.
    val_count: how many go to validation.
    seed: permutation seed (anything `np.random.default_rng` takes).

  Returns:
    (train_idx, val_idx), each sorted, disjoint and together covering N.
  """
  perm = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(perm[val_count:]), np.sort(perm[:val_count])


def check_val_fraction(val_fraction: float, dataset: str) -> float:
  """Returns `val_fraction` as a float, or raises DataError if out of range."""
  frac = float(val_fraction)
  if not 0.0 <= frac < 1.0:
    raise DataError(
        f"{dataset}: val_fraction must be in [0, 1), got {val_fraction}; set "
        "--config.data.val_fraction to e.g. 0.1.")
  return frac
