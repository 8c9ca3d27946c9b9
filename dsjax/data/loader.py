"""Training batches, in memory or streamed through grain: `data.loader`.

Both loaders give the same batches. The batch of training step `s` is a pure function of
`(seed, s)`: epoch `e` visits the examples in `dataset.epoch_order(seed, e, N)` (a
seed-shuffled permutation of the global example order), and step `s` takes the next
`batch_size` of them. Each process reads only its `rows` (`start, stop`) of every global
batch, the block its devices hold (`dsjax.parallel.sharding.local_rows`; grain's
`ShardByJaxProcess` splits records the same way, by process). The position saved in a
checkpoint is the global step, so a run resumes on any number of processes in the same
global order.

- `memory` (`dataset.BatchIterator`): gathers each batch from the split's arrays when
  the step asks for it. The embedded datasets, small, load this way.
- `grain` (`GrainLoader`): a `grain.MapDataset` whose element `s` is this process's rows
  of batch `s`, read (prepared token shards row by row, an image folder's files decoded)
  and augmented (`Dataset.transform`) by `data.prefetch` threads ahead of the step, in
  `data.workers` worker processes when that is > 0.
- `auto` (the default): grain for prepared token shards and image folders, memory for the
  rest.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dsjax.data import shards
from dsjax.data.dataset import BatchIterator, Dataset, epoch_order
from dsjax.errors import DataError

LOADERS = ("auto", "memory", "grain")
# Datasets that are read from disk as the steps go: the streaming loader only.
STREAMED_DATASETS = ("image-folder",)
# MapDataset.range's end: more steps than any run takes.
_ENDLESS = 1 << 62
# A worker process's DataError travels to the training process as this batch entry (its
# message, UTF-8): raised in a worker, grain would only say that the worker died.
_ERROR_KEY = "__dsjax_data_error__"


def _field(data_config: Any, name: str, default: Any) -> Any:
  getter = getattr(data_config, "get", None)
  return getter(name, default) if callable(getter) else getattr(data_config, name, default)


def loader_kind(data_config: Any) -> str:
  """The loader `data_config` selects, with `auto` decided: "memory" or "grain".

  Args:
    data_config: the `data` config section (without a `loader` field: "memory").

  Returns:
    "grain" for `loader="grain"`, or `auto` on prepared token shards or an image folder;
    "memory" otherwise.

  Raises:
    DataError: an unknown loader, or `memory` for a dataset only grain reads.
  """
  kind = _field(data_config, "loader", "memory")
  name = _field(data_config, "name", "")
  if kind not in LOADERS:
    raise DataError(f"data.loader must be one of {', '.join(LOADERS)}, got {kind!r}")
  if kind == "memory" and name in STREAMED_DATASETS:
    raise DataError(f"data.name={name} is read from disk as training goes: set "
                    "--config.data.loader=grain (or auto), not memory")
  if kind != "auto":
    return kind
  data_dir = _field(data_config, "data_dir", "") or ""
  if name in STREAMED_DATASETS or (name == "text" and data_dir and shards.is_prepared(data_dir)):
    return "grain"
  return "memory"


class _BatchAt:
  """Grain's map: step -> this process's rows of that step's batch (picklable, so that
  worker processes can run it)."""

  def __init__(self, arrays: Mapping[str, Any], batch_size: int, seed: int, shuffle: bool,
               rows: tuple[int, int] | None, transform: Callable[..., Any] | None,
               carry_errors: bool = False):
    self.arrays, self.batch_size, self.seed, self.shuffle = arrays, batch_size, seed, shuffle
    self.rows, self.transform, self.carry_errors = rows, transform, carry_errors
    self.num_examples = len(next(iter(arrays.values())))
    self.steps_per_epoch = self.num_examples // batch_size
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in ("_orders", "_lock")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _orders={}, _lock=threading.Lock())

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:  # One permutation per epoch, shared by the reading threads.
      if epoch not in self._orders:
        self._orders = {epoch: epoch_order(self.seed, epoch, self.num_examples, self.shuffle),
                        **{e: o for e, o in self._orders.items() if e == epoch - 1}}
      return self._orders[epoch]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if not self.carry_errors:
      return self._read(step)
    try:
      return self._read(step)
    except DataError as error:
      return {_ERROR_KEY: np.frombuffer(str(error).encode(), np.uint8)}

  def _read(self, step: int) -> dict[str, np.ndarray]:
    epoch, within = divmod(int(step), self.steps_per_epoch)
    indices = self._order(epoch)[within * self.batch_size:(within + 1) * self.batch_size]
    if self.rows is not None:
      indices = indices[self.rows[0]:self.rows[1]]
    batch = {key: np.asarray(value[indices]) for key, value in self.arrays.items()}
    if self.transform is not None:
      batch = self.transform(batch, indices, epoch, self.seed)
    return batch


def _parse_flags() -> None:
  """Grain's worker processes read absl flags; a library caller may never have parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class GrainLoader(BatchIterator):
  """`BatchIterator`'s batches and state, read ahead by a grain pipeline.

  Args:
    arrays: the split: name -> array or `dsjax.data.lazy.LazyColumn`, all of length N.
    batch_size: the global batch.
    seed: shuffling seed.
    shuffle: False: every epoch in stored order.
    workers: grain worker processes; 0 reads in this process's threads.
    prefetch: batches read ahead (by as many threads, in each process); 0: each batch is
      read when the step asks for it.
    transform: `Dataset.transform`, applied to every batch in the readers.

  Raises:
    DataError: as `BatchIterator`, or negative `workers` / `prefetch`.
  """

  def __init__(self, arrays: Mapping[str, Any], batch_size: int, *, seed: int,
               shuffle: bool = True, workers: int = 0, prefetch: int = 2,
               transform: Callable[..., Any] | None = None):
    self._rows: tuple[int, int] | None = None
    self._iterator: Any = None
    self._position = -1  # The step the running pipeline yields next.
    self._finalizer: Any = None
    super().__init__(dict(arrays), batch_size, seed=seed, shuffle=shuffle)
    if workers < 0 or prefetch < 0:
      raise DataError(f"data.workers and data.prefetch must be >= 0, got {workers} and "
                      f"{prefetch}")
    self.workers, self.prefetch, self.transform = int(workers), int(prefetch), transform

  @property
  def rows(self) -> tuple[int, int] | None:
    """This process's rows `(start, stop)` of every global batch; None: all of them."""
    return self._rows

  @rows.setter
  def rows(self, rows: tuple[int, int] | None) -> None:
    self.close()
    self._rows = rows

  def _reader(self, carry_errors: bool = False) -> _BatchAt:
    return _BatchAt(self.arrays, self.batch_size, self.seed, self.shuffle, self._rows,
                    self.transform, carry_errors)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step`, read in this thread (the pipeline's batches are these)."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}.")
    return self._reader()(step)

  def _start(self) -> None:
    import grain.python as grain  # The namespace of every grain >= 0.2.

    dataset = grain.MapDataset.range(self.step, _ENDLESS).map(self._reader(self.workers > 0))
    if self.prefetch == 0 and self.workers == 0:
      self._iterator = iter(dataset)  # Read in this thread, on demand.
    else:
      options = grain.ReadOptions(num_threads=max(self.prefetch, 1),
                                  prefetch_buffer_size=max(self.prefetch, 1))
      pipeline = dataset.to_iter_dataset(options)
      if self.workers:
        _parse_flags()
        pipeline = pipeline.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self.workers, per_worker_buffer_size=max(self.prefetch, 1)))
      self._iterator = iter(pipeline)
    self._position = self.step
    self._finalizer = weakref.finalize(self, _close, self._iterator)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None or self._position != self.step:
      self.close()
      self._start()
    batch = next(self._iterator)
    if self.workers:  # Out of the workers' shared memory, which they reuse.
      batch = {key: np.array(value) for key, value in batch.items()}
      if _ERROR_KEY in batch:
        self.close()
        raise DataError(batch[_ERROR_KEY].tobytes().decode())
    self.step += 1
    self._position += 1
    return batch

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by `get_state` (of either loader; see BatchIterator)."""
    super().set_state(state)
    self.close()

  def close(self) -> None:
    """Stops the pipeline's threads and worker processes (the next batch restarts it)."""
    if self._finalizer is not None:
      self._finalizer()
    self._iterator, self._finalizer, self._position = None, None, -1


def _close(iterator: Any) -> None:
  close = getattr(iterator, "close", None)
  if callable(close):
    close()


def train_iterator(dataset: Dataset, data_config: Any, batch_size: int, *,
                   seed: int) -> BatchIterator:
  """The training batches `data_config` selects (`loader_kind`), positioned at step 0.

  Args:
    dataset: the run's dataset.
    data_config: the `data` config section (loader, workers, prefetch).
    batch_size: the global batch.
    seed: the shuffling seed.

  Returns:
    A `BatchIterator` (memory) or `GrainLoader` (grain); set its `rows` for a
    multi-process run.
  """
  split = dataset.splits["train"]
  if loader_kind(data_config) == "memory":
    if dataset.transform is not None:
      raise DataError(f"dataset {dataset.name!r} augments in the streaming loader: set "
                      "--config.data.loader=grain (or auto)")
    return BatchIterator(split, batch_size, seed=seed)
  return GrainLoader(split, batch_size, seed=seed, workers=int(_field(data_config, "workers", 0)),
                     prefetch=int(_field(data_config, "prefetch", 2)),
                     transform=dataset.transform)
