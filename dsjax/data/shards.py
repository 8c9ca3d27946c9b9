"""Prepared text corpora: the on-disk format `dsjax-data prepare-text` writes, and its reader.

A prepared folder (`PREP`) holds:

  prepare.json             the inputs and settings it is prepared from; written first, so
                           a rerun can tell its own unfinished work from another corpus
  vocab.txt                the vocabulary, one token per line, id = line number
  tokenizer.json           the `tokenizers` pipeline that produced the ids
  shard-00000.tokens.bin   the token ids of whole documents, back to back, raw
                           little-endian uint16 (every id below 2**16) or uint32
  shard-00000.offsets.npy  int64 [documents + 1]: document d of the shard is
                           tokens[offsets[d]:offsets[d + 1]]
  shard-00000.json         the shard's record: its files' sizes and sha256, and the input
                           documents it covers (what a rerun checks before skipping it)
  manifest.json            written last: present means complete

Every file is written under a temporary name and renamed when complete, so a killed
prepare never leaves a file that looks finished. Documents are numbered in shard order,
which is input order; documents without any token are not stored (the in-memory path
drops them too). The manifest's keys: format, format_version, created_by, fingerprint,
inputs, settings, tokenizer, vocabulary, token_dtype, counts, splits, shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dsjax.errors import DataError

FORMAT = "dsjax-prepared-text"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "prepare.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_DTYPES = ("uint16", "uint32")
_RERUN = "rerun the same dsjax-data prepare-text command to rebuild it"


def shard_files(index: int) -> tuple[str, str, str]:
  """(tokens, offsets, record) file names of shard `index`."""
  stem = f"shard-{index:05d}"
  return f"{stem}.tokens.bin", f"{stem}.offsets.npy", f"{stem}.json"


def file_entry(path: Path) -> dict[str, Any]:
  """{'file': name, 'size': bytes, 'sha256': hex digest} of a file."""
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  return {"file": path.name, "size": path.stat().st_size, "sha256": digest}


def temporary_file(path: Path) -> tuple[int, str]:
  """Opens a new hidden `.NAME.*.tmp` beside `path` for writing: (fd, its path).

  Unlike tempfile.mkstemp's 0600, the mode follows the umask, as for any other file.
  """
  while True:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
    except FileExistsError:
      continue


def write_atomically(path: Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same folder and os.replace."""
  fd, tmp = temporary_file(path)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: Path, value: Any) -> None:
  """Writes `value` as indented, key-sorted JSON, atomically."""
  write_atomically(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def is_prepared(data_dir: str | Path) -> bool:
  """Whether `data_dir` is a folder written by prepare-text (finished or not)."""
  folder = Path(data_dir).expanduser()
  return (folder / MANIFEST).is_file() or (folder / PROGRESS).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
  """The manifest of a prepared folder, checked for its format and version.

  Raises:
    DataError: if the folder is unfinished, the manifest is not valid JSON, or it is of
      another format or version.
  """
  path = folder / MANIFEST
  if not path.is_file():
    raise DataError(
        f"text: {str(folder)!r} is an unfinished dsjax-data prepare-text output (no "
        f"{MANIFEST}); rerun the same prepare-text command to finish it.")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"text: cannot read {path} ({e}); {_RERUN}.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise DataError(
        f"text: {path} is not the manifest of a dsjax prepared corpus; point "
        "--config.data.data_dir at a dsjax-data prepare-text --out folder.")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise DataError(
        f"text: {path} is of format version {manifest.get('format_version')!r}, and this "
        f"dsjax reads version {FORMAT_VERSION}; prepare the corpus again with this dsjax "
        "into a new --out folder.")
  return manifest


def check_file(folder: Path, entry: dict[str, Any], what: str) -> Path:
  """Checks that a file has the size and sha256 its entry records.

  Args:
    folder: the prepared folder.
    entry: a `file_entry` dict.
    what: what the file is, for the message (e.g. 'shard 3 tokens').

  Returns:
    The file's path.

  Raises:
    DataError: if it is missing, of another size, or of another hash.
  """
  path = folder / entry["file"]
  if not path.is_file():
    raise DataError(f"text: the {what} file {path} is missing; {_RERUN}.")
  size = path.stat().st_size
  if size != entry["size"]:
    state = "truncated" if size < entry["size"] else "longer than written"
    raise DataError(
        f"text: the {what} file {path} is {state} ({size} bytes, the manifest says "
        f"{entry['size']}); {_RERUN}.")
  if file_entry(path)["sha256"] != entry["sha256"]:
    raise DataError(
        f"text: the {what} file {path} is corrupt (its sha256 differs from the manifest's); "
        f"{_RERUN}.")
  return path


@dataclasses.dataclass(frozen=True)
class PreparedText:
  """A verified prepared corpus: the manifest and memory-mapped shards.

  Attributes:
    folder: the prepared folder.
    manifest: its manifest.
    tokens: per shard, the token ids (read-only memory map).
    offsets: per shard, int64 [documents + 1] document starts.
  """

  folder: Path
  manifest: dict[str, Any]
  tokens: list[np.ndarray]
  offsets: list[np.ndarray]

  @property
  def num_documents(self) -> int:
    """Stored documents (each has at least one token)."""
    return int(self.manifest["counts"]["documents"])

  @property
  def vocab_size(self) -> int:
    """The vocabulary's size, the tokenizer's `get_vocab_size()`."""
    return int(self.manifest["vocabulary"]["vocab_size"])

  @property
  def special_ids(self) -> dict[str, int]:
    """pad_id, unk_id, cls_id, sep_id and mask_id."""
    return {k: int(v) for k, v in self.manifest["vocabulary"]["special_ids"].items()}

  @property
  def vocab_path(self) -> Path:
    return self.folder / self.manifest["vocabulary"]["file"]

  @property
  def tokenizer_path(self) -> Path:
    return self.folder / self.manifest["tokenizer"]["file"]

  def join_documents(self, parts: dict[str, np.ndarray], sep_id: int) -> dict[str, np.ndarray]:
    """Each split's documents, in index order, joined with one `sep_id` between neighbours.

    Args:
      parts: split name -> sorted, disjoint document indices.
      sep_id: id put between documents.

    Returns:
      split name -> int32 stream, as `text.join_documents` gives for the same documents.
    """
    names = list(parts)
    label = np.full((self.num_documents,), -1, np.int8)
    for k, name in enumerate(names):
      label[np.asarray(parts[name], np.int64)] = k
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    first = 0
    for tokens, offsets in zip(self.tokens, self.offsets, strict=True):
      lengths = np.diff(offsets)
      mine = label[first:first + len(lengths)]
      first += len(lengths)
      token_label = np.repeat(mine, lengths)  # One shard at a time bounds the memory.
      for k, name in enumerate(names):
        chosen = mine == k
        if chosen.any():
          picked = tokens[token_label == k].astype(np.int32)
          pieces[name].append(np.insert(picked, np.cumsum(lengths[chosen])[:-1], sep_id))
    sep = np.full((1,), sep_id, np.int32)
    streams = {}
    for name in names:
      joined = [a for piece in pieces[name] for a in (sep, piece)][1:]
      streams[name] = np.concatenate(joined) if joined else np.zeros((0,), np.int32)
    return streams


def open_prepared(data_dir: str | Path) -> PreparedText:
  """Opens a prepared folder, checking every file against the manifest.

  Args:
    data_dir: a folder written by `dsjax-data prepare-text`.

  Returns:
    The corpus, its shards memory-mapped (nothing is read into Python strings).

  Raises:
    DataError: for an unfinished folder, a manifest of another format or version, or a
      missing, truncated or corrupt file.
  """
  folder = Path(data_dir).expanduser()
  manifest = read_manifest(folder)
  check_file(folder, manifest["vocabulary"], "vocabulary")
  dtype = manifest["token_dtype"]
  if dtype not in TOKEN_DTYPES:
    raise DataError(f"text: {folder / MANIFEST} names token dtype {dtype!r}; {_RERUN}.")
  tokens, offsets = [], []
  for index, shard in enumerate(manifest["shards"]):
    token_path = check_file(folder, shard["tokens"], f"shard {index} tokens")
    offset_path = check_file(folder, shard["offsets"], f"shard {index} offsets")
    starts = np.load(offset_path, allow_pickle=False)
    count = os.path.getsize(token_path) // np.dtype(dtype).itemsize
    if (starts.dtype != np.int64 or starts.ndim != 1 or len(starts) != shard["num_documents"] + 1
        or starts[0] != 0 or starts[-1] != count or (np.diff(starts) < 1).any()):
      raise DataError(f"text: {offset_path} does not describe {token_path}; {_RERUN}.")
    tokens.append(np.memmap(token_path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r"))
    offsets.append(starts)
  if sum(len(s) - 1 for s in offsets) != manifest["counts"]["documents"]:
    raise DataError(f"text: the shards of {str(folder)!r} disagree with its manifest's "
                    f"document count; {_RERUN}.")
  return PreparedText(folder=folder, manifest=manifest, tokens=tokens, offsets=offsets)


# --- writing -----------------------------------------------------------------------------


class ShardWriter:
  """One shard being written: tokens appended to a temporary file, renamed when closed."""

  def __init__(self, out: Path, index: int, dtype: np.dtype):
    self.out, self.index, self.dtype = out, index, dtype
    self.names = shard_files(index)
    fd, self.tmp = temporary_file(out / self.names[0])
    self.file = os.fdopen(fd, "wb")
    self.digest = hashlib.sha256()
    self.lengths: list[np.ndarray] = []
    self.num_tokens = self.num_documents = self.text_bytes = self.size = 0

  def add(self, lengths: np.ndarray, tokens: np.ndarray, text_bytes: int) -> None:
    data = tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
    self.file.write(data)
    self.digest.update(data)
    kept = lengths[lengths > 0]  # Documents without a token are not stored.
    self.lengths.append(kept)
    self.num_tokens += int(kept.sum())
    self.num_documents += len(kept)
    self.text_bytes += text_bytes
    self.size += len(data)

  def close(self, input_documents: list[int], vocab_sha256: str) -> dict[str, Any]:
    """Renames the files into place, then writes the record that marks the shard done."""
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(self.lengths))]).astype(np.int64)
    buffer = io.BytesIO()
    np.save(buffer, offsets, allow_pickle=False)
    tokens_name, offsets_name, record_name = self.names
    os.replace(self.tmp, self.out / tokens_name)
    write_atomically(self.out / offsets_name, buffer.getvalue())
    record = {
        "index": self.index, "input_documents": input_documents,
        "num_documents": self.num_documents, "num_tokens": self.num_tokens,
        "text_bytes": self.text_bytes, "vocab_sha256": vocab_sha256,
        "tokens": {"file": tokens_name, "size": self.size, "sha256": self.digest.hexdigest()},
        "offsets": {"file": offsets_name, "size": len(buffer.getvalue()),
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}
    write_json(self.out / record_name, record)
    return record

  def discard(self) -> None:
    self.file.close()
    os.remove(self.tmp)


class ShardAssembler:
  """Cuts the encoded documents, in order, into shards; steps over finished ones.

  Attributes:
    text_bytes: UTF-8 bytes of every input document so far.
  """

  def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int,
               done: dict[int, dict[str, Any]], vocab_sha256: str,
               on_text: Callable[[int], Any]):
    self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
    self.done, self.vocab_sha256, self.on_text = done, vocab_sha256, on_text
    self.records: list[dict[str, Any]] = []
    self.writer: ShardWriter | None = None
    self.index = self.shard_start = self.next_document = self.text_bytes = 0
    self._step_over_finished()

  def _step_over_finished(self) -> None:
    while self.index in self.done:
      record = self.done.pop(self.index)
      first, end = record["input_documents"]
      if first != self.shard_start:
        raise DataError(f"prepare-text: the shard records in {self.out} disagree with the "
                        f"inputs; remove it (rm -r {self.out}) and prepare it again.")
      self.records.append(record)
      self.on_text(record["text_bytes"])
      self.text_bytes += record["text_bytes"]
      self.index, self.shard_start = self.index + 1, end
    self.next_document = self.shard_start

  def add(self, start: int, lengths: np.ndarray, tokens: np.ndarray, sizes: np.ndarray) -> None:
    """Appends documents start, start+1, ... (their token counts, ids and text bytes)."""
    position = offset = 0
    while position < len(lengths):
      if start + position != self.next_document:
        raise DataError(f"prepare-text: the shard records in {self.out} disagree with the "
                        f"inputs; remove it (rm -r {self.out}) and prepare it again.")
      if self.writer is None:
        self.writer = ShardWriter(self.out, self.index, self.dtype)
      reached = self.writer.num_tokens + np.cumsum(lengths[position:])
      full = int(np.searchsorted(reached, self.shard_tokens))  # First to reach shard_tokens.
      take = min(full + 1, len(lengths) - position)
      count = int(lengths[position:position + take].sum())
      size = int(sizes[position:position + take].sum())
      self.writer.add(lengths[position:position + take], tokens[offset:offset + count], size)
      self.on_text(size)
      self.text_bytes += size
      position, offset = position + take, offset + count
      self.next_document = start + position
      if full < len(reached):
        self._close(self.next_document)

  def _close(self, end: int) -> None:
    self.records.append(self.writer.close([self.shard_start, end], self.vocab_sha256))
    self.writer, self.index, self.shard_start = None, self.index + 1, end
    self._step_over_finished()

  def finish(self, count: int) -> list[dict[str, Any]]:
    """Closes the last shard (the documents up to `count`); returns every shard's record."""
    if self.writer is not None and self.writer.num_documents:
      self._close(count)
    elif self.writer is not None:
      self.writer.discard()
    for path in self.out.glob("shard-*"):  # Left by a run with more shards: not ours.
      if not path.name[6:11].isdigit() or int(path.name[6:11]) >= len(self.records):
        path.unlink()
    return self.records
