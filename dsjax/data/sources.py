"""Documents of the input files of `dsjax-data prepare-text`, streamed one at a time.

Inputs are globs (`**` recursive), files or folders, taken in the order given; a glob's
matches and a folder's files are in sorted path order, as `text.load_documents` sorts a
folder. Kinds, by suffix:
- `.txt`: UTF-8 (a leading BOM is dropped); every blank-line-separated paragraph is a
  document, exactly as `text.load_documents` splits a file, read in chunks;
- `.jsonl`: one JSON object per line whose string field `text` is the document (blank
  lines are skipped);
- `.parquet`: the string column `text`, one document per row;
- a folder written by Hugging Face `datasets.Dataset.save_to_disk` (`state.json` and
  `data-*.arrow`): its `text` column, one document per row.
Parquet and Arrow are read with pyarrow (the `data` extra); `datasets` is not needed.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dsjax.data import text
from dsjax.errors import DataError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
HF_STATE = "state.json"
_CHUNK_BYTES = 1 << 23
_ROWS_PER_BATCH = 8192
_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class Input:
  """One input: a file, or a `save_to_disk` folder (kind 'arrow')."""

  path: Path
  kind: str

  def describe(self) -> dict[str, Any]:
    """Path, kind, size and modification time: what a rerun compares."""
    files = ([self.path / HF_STATE, *_arrow_files(self.path)] if self.kind == "arrow"
             else [self.path])
    stats = [f.stat() for f in files]
    return {"path": str(self.path), "kind": self.kind, "size": sum(s.st_size for s in stats),
            "mtime_ns": max(s.st_mtime_ns for s in stats)}


def find_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                exclude: Path | None = None) -> list[Input]:
  """Expands the inputs into files and folders to read, in order.

  Args:
    inputs: a glob, file or folder, or a list of them.
    exclude: a folder whose files are never inputs (the output: its vocab.txt is no
      corpus, and a rerun must see the inputs of the first run).

  Returns:
    The inputs, with absolute paths.

  Raises:
    DataError: if one matches nothing or does not exist, names a file of another kind,
      a folder holds no input file, or a file is given twice.
  """
  patterns = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
  if not patterns:
    raise DataError("prepare-text: give at least one --input: a glob such as 'DIR/**/*.txt', "
                    "a file or a folder.")
  found: list[Input] = []
  for pattern in patterns:
    name = os.path.expanduser(str(pattern))
    is_glob = bool(_GLOB_CHARS & set(name))
    matches = sorted(glob.glob(name, recursive=True)) if is_glob else [name]
    if not matches:
      raise DataError(f"prepare-text: --input {str(pattern)!r} matches no file; check the "
                      "pattern, and quote it so that the shell passes it on unexpanded.")
    outside = lambda path: exclude is None or not path.resolve().is_relative_to(exclude)
    for match in filter(outside, map(Path, matches)):
      found.extend(item for item in _expand(match.absolute(), str(pattern), is_glob)
                   if outside(item.path))
  seen: dict[Path, Path] = {}
  for item in found:
    key = item.path.resolve()
    if key in seen:
      raise DataError(f"prepare-text: {item.path} is matched by more than one --input; give "
                      "each file once.")
    seen[key] = item.path
  if not found:
    raise DataError(f"prepare-text: --input {', '.join(map(str, patterns))} names no "
                    ".txt, .jsonl or .parquet file.")
  return found


def _expand(path: Path, pattern: str, is_glob: bool) -> list[Input]:
  """The inputs one path stands for (a folder of a glob match is skipped: `**` lists them)."""
  if path.is_dir():
    if (path / HF_STATE).is_file():
      return [Input(path, "arrow")]
    if (path / "dataset_dict.json").is_file():
      raise DataError(
          f"prepare-text: {path} is a datasets DatasetDict; give one split's folder, e.g. "
          f"--input {path / 'train'}.")
    if is_glob:
      return []
    files = sorted((f for f in path.rglob("*") if f.suffix.lower() in KINDS and f.is_file()),
                   key=lambda f: f.relative_to(path).as_posix())
    if not files:
      raise DataError(f"prepare-text: no .txt, .jsonl or .parquet files under {path}.")
    return [Input(f, KINDS[f.suffix.lower()]) for f in files]
  if not path.exists():
    raise DataError(f"prepare-text: --input {pattern!r} does not exist.")
  kind = KINDS.get(path.suffix.lower())
  if kind is None:
    raise DataError(
        f"prepare-text: --input {pattern!r} names {path}, which is not a .txt, .jsonl or "
        ".parquet file (nor a datasets save_to_disk folder); narrow the pattern, e.g. "
        "'DIR/**/*.txt'.")
  return [Input(path, kind)]


def documents(inputs: Sequence[Input]) -> Iterator[str]:
  """Every document of the inputs, in order, one at a time."""
  readers = {"txt": _txt_documents, "jsonl": _jsonl_documents,
             "parquet": _parquet_documents, "arrow": _arrow_documents}
  for item in inputs:
    yield from readers[item.kind](item.path)


def _not_utf8(path: Path, error: UnicodeDecodeError, offset: int) -> DataError:
  return DataError(
      f"prepare-text: {path} is not valid UTF-8 ({error.reason} at byte {offset}); re-save it "
      "as UTF-8 or leave it out of --input.")


def _txt_documents(path: Path) -> Iterator[str]:
  """The paragraphs of a text file, as `text.load_documents` splits it, chunk by chunk.

  A paragraph break is a run of whitespace holding two newlines, so cutting the text
  after the last break of a chunk and carrying the rest over to the next one finds the
  same paragraphs as splitting the whole file (only whitespace, which is stripped, moves).
  """
  decoder = codecs.getincrementaldecoder("utf-8")()
  consumed, pending, carry, started = 0, "", "", False
  with open(path, "rb") as f:
    while True:
      raw = f.read(_CHUNK_BYTES)
      final = not raw
      buffered = len(decoder.getstate()[0])
      try:
        chunk = decoder.decode(raw, final)
      except UnicodeDecodeError as e:
        raise _not_utf8(path, e, consumed - buffered + e.start) from None
      consumed += len(raw)
      if chunk and not started:
        chunk, started = chunk.removeprefix("\ufeff"), True
      chunk, carry = carry + chunk, ""
      if not final and chunk.endswith("\r"):  # It may be the first half of "\r\n".
        chunk, carry = chunk[:-1], "\r"
      pending += chunk.replace("\r\n", "\n").replace("\r", "\n")
      if final:
        yield from text._paragraphs(pending)
        return
      *complete, pending = text._PARAGRAPH_BREAK.split(pending)
      yield from (p.strip() for p in complete if p.strip())


def _jsonl_documents(path: Path) -> Iterator[str]:
  """The `text` field of every line of a JSON-lines file."""
  with open(path, "rb") as f:
    offset = 0
    for number, line in enumerate(f, 1):
      try:
        decoded = line.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _not_utf8(path, e, offset + e.start) from None
      offset += len(line)
      if number == 1:
        decoded = decoded.removeprefix("\ufeff")
      if not decoded.strip():
        continue
      try:
        record = json.loads(decoded)
      except ValueError as e:
        raise DataError(f"prepare-text: {path}:{number} is not JSON ({e}); fix the line or "
                        "leave the file out of --input.") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(
            f"prepare-text: {path}:{number} has no string field 'text'; give every line a "
            '"text" field holding the document, or leave the file out of --input.')
      yield record["text"]


def _pyarrow(path: Path) -> Any:
  """Imports pyarrow, or raises a DataError saying which extra installs it."""
  try:
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet  # noqa: F401
  except ImportError as e:
    raise DataError(
        f"prepare-text: reading {path} needs pyarrow, which is not installed; run "
        "`pip install 'dsjax[data]'` (or `pip install pyarrow`).") from e
  return pyarrow


def _text_column(pa: Any, batches: Iterator[Any], path: Path) -> Iterator[str]:
  """The strings of column `text` of record batches, refusing a missing column or a null."""
  row = 0
  try:
    for batch in batches:
      index = batch.schema.get_field_index("text")
      if index < 0:
        raise DataError(f"prepare-text: {path} has no column 'text' (its columns: "
                        f"{', '.join(batch.schema.names)}); give it the documents as 'text'.")
      column = batch.column(index)
      if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"prepare-text: the column 'text' of {path} is {column.type}, not "
                        "strings; store the documents as strings.")
      if column.null_count:
        first = column.is_null().to_pylist().index(True)
        raise DataError(f"prepare-text: row {row + first} of {path} has no text (null); fill "
                        "or drop it.")
      yield from column.to_pylist()
      row += len(column)
  except pa.ArrowException as e:
    raise DataError(f"prepare-text: cannot read {path} ({e}); check that it is complete.") from e
  except UnicodeDecodeError as e:
    raise DataError(f"prepare-text: row text of {path} is not valid UTF-8 ({e.reason}); "
                    "re-encode it as UTF-8.") from e


def _parquet_documents(path: Path) -> Iterator[str]:
  pa = _pyarrow(path)
  try:
    file = pa.parquet.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"prepare-text: {path} is not a readable parquet file ({e}).") from e
  names = file.schema_arrow.names
  if "text" not in names:
    raise DataError(f"prepare-text: {path} has no column 'text' (its columns: "
                    f"{', '.join(names)}); give it the documents as 'text'.")
  batches = file.iter_batches(batch_size=_ROWS_PER_BATCH, columns=["text"])
  yield from _text_column(pa, batches, path)


def _arrow_files(folder: Path) -> list[Path]:
  """The Arrow files a `save_to_disk` folder's state.json lists."""
  try:
    state = json.loads((folder / HF_STATE).read_text(encoding="utf-8"))
    names = [entry["filename"] for entry in state["_data_files"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"prepare-text: {folder / HF_STATE} is not a datasets state file ({e}); "
                    "save the dataset again with save_to_disk.") from e
  if state.get("_indices_data_files"):
    raise DataError(f"prepare-text: {folder} holds an indices mapping; save it with a recent "
                    "datasets (save_to_disk writes the selected rows) or flatten_indices().")
  bad = [name for name in names if Path(name).name != name]
  if bad:
    raise DataError(f"prepare-text: {folder / HF_STATE} names {bad[0]!r}, not a file of the "
                    "folder; save the dataset again with save_to_disk.")
  return [folder / name for name in names]


def _arrow_documents(folder: Path) -> Iterator[str]:
  """The `text` column of a `datasets.Dataset.save_to_disk` folder (Arrow IPC streams)."""
  pa = _pyarrow(folder)
  for path in _arrow_files(folder):
    if not path.is_file():
      raise DataError(f"prepare-text: {path}, listed in {folder / HF_STATE}, is missing.")
    with pa.memory_map(str(path)) as source:
      try:
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
      except pa.ArrowInvalid:  # The Arrow file (random-access) format, not a stream.
        source.seek(0)
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
      yield from _text_column(pa, batches, path)
