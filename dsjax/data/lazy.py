"""Splits read on demand: a record source, and the array-like columns that read from it.

A split too big for memory (the sequences of prepared token shards, the images of a
folder) is a `RecordSource`: its length, the shape and dtype of each entry of one example,
and `read(indices)`, which returns every entry's rows at those indices. `lazy_split(source)`
wraps it in the mapping of columns the rest of dsjax reads (`dataset.splits[name][key]`),
so the trainer, the evaluation and the loaders need not know where the rows come from:
each `LazyColumn` has a length, a shape and a dtype, and indexing it (`column[a:b]`,
`column[indices]`) reads those rows. Columns read with the same index one after another
(a batch's `input_ids`, then its `attention_mask`) share one read: each thread keeps its
source's last read.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np


class RecordSource:
  """Random access to the examples of one split; subclasses set `spec` and define
  `__len__` and `read`.

  Attributes:
    spec: key -> (shape of one example, dtype).
  """

  spec: dict[str, tuple[tuple[int, ...], np.dtype]]

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` (int64 [n], each in [0, len)): key -> [n, *shape]."""
    raise NotImplementedError

  def cached_read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """`read(indices)`, reusing this thread's previous result for the same indices."""
    local = self.__dict__.get("_local")
    if local is None:
      local = self.__dict__.setdefault("_local", threading.local())
    key = indices.tobytes()
    if getattr(local, "key", None) != key:
      local.value, local.key = self.read(indices), key
    return local.value

  def __getstate__(self) -> dict[str, Any]:
    # Worker processes get the source without this process's cache (threading.local
    # does not pickle).
    return {k: v for k, v in self.__dict__.items() if k != "_local"}


class LazyColumn:
  """One entry of a lazily read split: a read-only array-like of shape [N, *shape].

  Indexing with an int, a slice, or an int or bool array reads those rows (as
  `np.ndarray`); `np.asarray(column)` reads them all.

  Args:
    source: the split's source.
    key: the entry.
  """

  def __init__(self, source: RecordSource, key: str):
    self.source, self.key = source, key
    self._example_shape, self.dtype = source.spec[key][0], np.dtype(source.spec[key][1])

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.source), *self._example_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: Any) -> Any:
    rest: tuple[Any, ...] = ()
    if isinstance(index, tuple):
      index, rest = index[0], index[1:]
    scalar = isinstance(index, int | np.integer)
    if scalar:
      if not -len(self) <= index < len(self):
        raise IndexError(f"index {index} is out of bounds for a column of {len(self)} rows")
      indices = np.asarray([index % len(self)], np.int64)
    elif isinstance(index, slice):
      indices = np.arange(*index.indices(len(self)), dtype=np.int64)
    else:
      indices = np.asarray(index)
      if indices.dtype == bool:
        indices = np.flatnonzero(indices)
      indices = indices.astype(np.int64, copy=False)
      if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
        raise IndexError(f"an index is out of bounds for a column of {len(self)} rows")
      indices = indices % max(len(self), 1)
    if indices.size == 0:
      rows = np.zeros((0, *self._example_shape), self.dtype)
    else:
      rows = self.source.cached_read(indices.reshape(-1))[self.key]
      rows = rows.reshape(*indices.shape, *self._example_shape)
    if scalar:
      rows = rows[0]
    return rows[(slice(None),) * (0 if scalar else indices.ndim) + rest] if rest else rows

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    del copy  # Every read is a fresh array.
    rows = self[:]
    return rows if dtype is None else rows.astype(dtype)

  def __repr__(self) -> str:
    return f"LazyColumn({self.key!r}, shape={self.shape}, dtype={self.dtype})"


class Subset(RecordSource):
  """The examples of `parent` at `indices`, in that order, read from `parent` on demand."""

  def __init__(self, parent: RecordSource, indices: np.ndarray):
    self.parent, self.indices = parent, np.asarray(indices, np.int64)
    self.spec = parent.spec

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.parent.read(self.indices[indices])


def take(arrays: Mapping[str, Any], indices: np.ndarray) -> dict[str, Any]:
  """`{key: column[indices]}` of a split, without reading its lazy columns: those become
  columns of a `Subset` (one per source, so a batch's columns still share a read)."""
  subsets: dict[int, Subset] = {}
  out = {}
  for key, column in arrays.items():
    if isinstance(column, LazyColumn):
      subset = subsets.setdefault(id(column.source), Subset(column.source, indices))
      out[key] = LazyColumn(subset, column.key)
    else:
      out[key] = column[indices]
  return out


def lazy_split(source: RecordSource) -> dict[str, LazyColumn]:
  """The split's mapping of entry -> `LazyColumn`, every one reading from `source`."""
  return {key: LazyColumn(source, key) for key in source.spec}


def is_lazy(arrays: Mapping[str, Any]) -> bool:
  """Whether any entry of a split is read on demand."""
  return any(isinstance(value, LazyColumn) for value in arrays.values())
