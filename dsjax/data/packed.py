"""The packed sequences of a prepared corpus, read row by row from its token shards.

`text.pack_stream` cuts a split's joined token stream (its documents in index order, one
[SEP] between neighbours) into rows of `seq_len - 1` tokens, each after a [CLS], the last
padded. `PackedRows` gives row `i` of that same array without building the stream: it
keeps, per document of the split, where the document starts in the stream and in its
shard (about 20 bytes per document), finds the documents row `i` overlaps by a binary
search, and reads their tokens with `os.pread`. Reads go through the page cache rather
than a memory map, so the training process's resident memory does not grow with the share
of the corpus it has read: a 2 GB corpus costs what a 20 MB one does, plus its index.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dsjax.data import shards
from dsjax.data.lazy import RecordSource
from dsjax.errors import DataError

_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class PackedRows(RecordSource):
  """Row `i` of `text.pack_stream(stream, seq_len, ...)` of a split, read from the shards.

  Args:
    corpus: the opened (checked) prepared corpus.
    documents: the split's document indices, sorted.
    seq_len: row length.
    ids: the special ids (cls_id, sep_id, pad_id).
  """

  def __init__(self, corpus: shards.PreparedText, documents: np.ndarray, seq_len: int,
               ids: dict[str, int]):
    self.seq_len, self.content = int(seq_len), int(seq_len) - 1
    self.cls_id, self.sep_id, self.pad_id = ids["cls_id"], ids["sep_id"], ids["pad_id"]
    self.paths = [str(corpus.folder / shard["tokens"]["file"])
                  for shard in corpus.manifest["shards"]]
    self.dtype = np.dtype(corpus.manifest["token_dtype"]).newbyteorder("<")
    counts = np.asarray([len(offsets) - 1 for offsets in corpus.offsets], np.int64)
    first = np.concatenate([[0], np.cumsum(counts)])  # Global index of each shard's first.
    documents = np.asarray(documents, np.int64)
    shard = np.searchsorted(first, documents, side="right") - 1
    self.shard = shard.astype(np.int32)
    self.file_start = np.empty(len(documents), np.int64)  # In tokens, within its shard.
    lengths = np.empty(len(documents), np.int64)
    for index, offsets in enumerate(corpus.offsets):
      mine = shard == index
      local = documents[mine] - first[index]
      self.file_start[mine] = offsets[local]
      lengths[mine] = offsets[local + 1] - offsets[local]
    # Document k starts at stream_start[k]; a [SEP] follows it unless it is the last.
    self.stream_start = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    self.stream_length = int(lengths.sum() + max(len(documents) - 1, 0))
    self.num_rows = -(-self.stream_length // self.content)
    self.num_documents = len(documents)
    self.spec = {key: ((self.seq_len,), np.dtype(np.int32)) for key in _KEYS}
    self._files: dict[int, int] = {}
    self._pid = os.getpid()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.num_rows

  @property
  def num_tokens(self) -> int:
    """Non-padding tokens of all rows ([CLS] and [SEP] included), as the arrays' mask sum."""
    return self.stream_length + self.num_rows

  def __getstate__(self) -> dict[str, Any]:
    state = super().__getstate__()
    state["_files"] = {}  # File descriptors and locks do not cross processes.
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _pid=os.getpid(), _lock=threading.Lock())

  def _file(self, shard: int) -> int:
    fd = self._files.get(shard)
    if fd is None or self._pid != os.getpid():
      with self._lock:
        if self._pid != os.getpid():  # A forked worker: not the parent's descriptors.
          self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
          self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        fd = self._files[shard]
    return fd

  def _tokens(self, shard: int, start: int, count: int) -> np.ndarray:
    size = self.dtype.itemsize
    data = os.pread(self._file(shard), count * size, start * size)
    if len(data) != count * size:
      raise DataError(
          f"text: the shard {Path(self.paths[shard])} ended early (it changed after it was "
          "checked); rerun the same dsjax-data prepare-text command to rebuild it.")
    return np.frombuffer(data, self.dtype)

  def _row(self, row: int, out: np.ndarray) -> int:
    """Writes row `row`'s content tokens into `out`; returns how many there are."""
    begin = row * self.content
    end = min(begin + self.content, self.stream_length)
    k = int(np.searchsorted(self.stream_start, begin, side="right")) - 1
    filled = 0
    while begin < end:
      doc_start = int(self.stream_start[k])
      doc_end = (int(self.stream_start[k + 1]) - 1 if k + 1 < self.num_documents
                 else self.stream_length)
      if begin < doc_end:  # Inside document k's tokens.
        take = min(end, doc_end) - begin
        out[filled:filled + take] = self._tokens(
            int(self.shard[k]), int(self.file_start[k]) + begin - doc_start, take)
        filled, begin = filled + take, begin + take
      if begin < end:  # The [SEP] after document k.
        out[filled] = self.sep_id
        filled, begin, k = filled + 1, begin + 1, k + 1
    return filled

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    count = len(indices)
    input_ids = np.full((count, self.seq_len), self.pad_id, np.int32)
    input_ids[:, 0] = self.cls_id
    attention_mask = np.zeros((count, self.seq_len), np.int32)
    for position, row in enumerate(np.asarray(indices, np.int64).tolist()):
      if not 0 <= row < self.num_rows:
        raise IndexError(f"row {row} is out of range for a split of {self.num_rows} rows")
      filled = self._row(row, input_ids[position, 1:])
      attention_mask[position, :filled + 1] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids)}

  def __del__(self) -> None:
    if getattr(self, "_pid", None) == os.getpid():
      for fd in getattr(self, "_files", {}).values():
        try:
          os.close(fd)
        except OSError:
          pass
