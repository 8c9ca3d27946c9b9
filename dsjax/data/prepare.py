"""Prepare once: a text corpus tokenized into shards that `data.name="text"` reads.

  dsjax-data prepare-text --input 'DIR/**/*.txt' --out PREP [--vocab-size N | --vocab-file V]
      [--workers K]

and then `--config.data.data_dir=PREP` gives the Dataset the same documents give in
memory (`text.load_text`). The inputs are read by `dsjax.data.sources`, and the format is
described in `dsjax.data.shards`. The passes over the inputs hold one document at a time:

1. read: every file is decoded and split, so a bad file fails before any shard is
   written; with a trained vocabulary this is the tokenizer's first pass;
2. train (unless `vocab_file`): the rest of `text.train_tokenizer`, streaming;
3. tokenize: batches of documents are encoded in `workers` processes and appended, in
   input order, to shards of whole documents, each closed once it holds `shard_tokens`.

Shard boundaries depend only on the documents, so the output is the same byte for byte
for any `workers`, and a rerun on the same folder skips every shard whose record and
files (size and sha256) check out.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

import dsjax
from dsjax.data import shards, sources, text, wordpiece
from dsjax.errors import DataError

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MB of uint16 ids: few files, and a cheap redo.
# Training reads the sample twice and the whole corpus once; the encoding reads it once.
DEFAULT_VOCAB_SAMPLE_MB = 256.0
_BATCH_CHARS = 1 << 19  # Per task: big enough to amortise the hand-off to a worker.
_BATCH_DOCUMENTS = 4096

log = logging.getLogger(__name__)


def prepare_text(inputs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
                 *, vocab_size: int | None = None, vocab_file: str | None = None,
                 vocab_sample_mb: float = DEFAULT_VOCAB_SAMPLE_MB, workers: int = 1,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 progress: bool = True) -> dict[str, Any]:
  """Tokenizes a corpus once into `out`, resuming a run on the same `out`.

  Args:
    inputs: a glob (`**` recursive), file or folder, or a list of them (see sources).
    out: the folder to write; new, empty, or a previous run's on the same inputs.
    vocab_size: train a WordPiece vocabulary of this size (default DEFAULT_VOCAB_SIZE).
    vocab_file: use this pretrained vocab.txt instead of training one.
    vocab_sample_mb: train the vocabulary on every k-th document, k the smallest that
      brings the inputs' size under this many MB (0: on every document). A corpus under
      it gets the tokenizer `text.load_text` trains on the same documents in memory.
    workers: tokenizing processes; 1 tokenizes in this process.
    shard_tokens: a shard is closed after the document that takes it to this many tokens.
    progress: show progress bars (MB/s of text) on stderr.

  Returns:
    The manifest (see dsjax.data.shards), as written to `out/manifest.json`.

  Raises:
    DataError: for bad settings or inputs (each names the file), an `out` holding another
      corpus, or a corpus without a single token.
  """
  requested, vocab_path = _check_settings(vocab_size, vocab_file, vocab_sample_mb, workers,
                                          shard_tokens)
  out = Path(out).expanduser().absolute()
  found = sources.find_inputs(inputs, exclude=out.resolve())
  described = [item.describe() for item in found]
  input_bytes = sum(entry["size"] for entry in described)
  every = 1 if vocab_path or not vocab_sample_mb else max(
      1, math.ceil(input_bytes / (vocab_sample_mb * 1e6)))
  settings = {
      "format_version": shards.FORMAT_VERSION, "recipe": text._RECIPE_VERSION,
      "tokenizers_version": text._tokenizers().__version__, "shard_tokens": int(shard_tokens),
      "vocab_size": requested, "vocab_sample_mb": float(vocab_sample_mb),
      "vocab_every_document": every,
      "vocab_file": None if vocab_path is None else {
          **shards.file_entry(vocab_path), "file": str(vocab_path)}}
  state = {"inputs": described, "settings": settings}
  state["fingerprint"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
  _claim(out, state)
  manifest = _finished_manifest(out, state["fingerprint"])
  if manifest is not None:
    log.info("%s is already prepared from these inputs; nothing to do.", out)
    return manifest
  tokenizer, vocabulary, total = _tokenizer(out, found, requested, vocab_path, every,
                                            progress)
  dtype = "uint16" if max(tokenizer.get_vocab().values()) < 1 << 16 else "uint32"
  done = _finished_shards(out, vocabulary["sha256"])
  bar = _bar(progress, "tokenize", total)
  batches = _Batches(sources.documents(found), [r["input_documents"] for r in done.values()])
  assembler = shards.ShardAssembler(out, np.dtype(dtype), shard_tokens, done,
                                     vocabulary["sha256"], bar.update)
  with bar:
    for start, lengths, tokens, sizes in _encoded(batches, out / shards.TOKENIZER_FILE, dtype,
                                                  workers):
      assembler.add(start, lengths, tokens, sizes)
    records = assembler.finish(batches.count)
  documents = sum(r["num_documents"] for r in records)
  if not documents:
    raise DataError(
        f"prepare-text: the inputs ({_names(found)}) hold {batches.count} documents and none "
        "has a token (they are empty or whitespace only); add text.")
  manifest = {
      "format": shards.FORMAT, "format_version": shards.FORMAT_VERSION,
      "created_by": f"dsjax {dsjax.__version__}", "fingerprint": state["fingerprint"],
      "inputs": state["inputs"], "settings": settings,
      "tokenizer": {
          **shards.file_entry(out / shards.TOKENIZER_FILE), "recipe": text._RECIPE_VERSION,
          "lowercase": True, "continuation_prefix": text.CONTINUATION_PREFIX,
          "max_input_chars_per_word": text.MAX_INPUT_CHARS_PER_WORD,
          "add_special_tokens": False, "encode_special_tokens": True},
      "vocabulary": vocabulary, "token_dtype": dtype,
      "counts": {"input_documents": batches.count, "documents": documents,
                 "empty_documents": batches.count - documents,
                 "tokens": sum(r["num_tokens"] for r in records),
                 "text_bytes": assembler.text_bytes, "shards": len(records)},
      # Splits are computed at load time from the config, as for documents in memory.
      "splits": {"unit": "document", "order": "shards, then offsets (input order)",
                 "rule": "dsjax.data.text.split_documents(documents, val_fraction, split_seed)",
                 "test_fraction": text.TEST_FRACTION},
      "shards": records,
  }
  shards.write_json(out / shards.MANIFEST, manifest)
  log.info("Prepared %d documents, %d tokens in %d shards into %s.", documents,
           manifest["counts"]["tokens"], len(records), out)
  return manifest


def _check_settings(vocab_size: Any, vocab_file: str | None, vocab_sample_mb: Any,
                    workers: Any, shard_tokens: Any) -> tuple[int | None, Path | None]:
  """(requested vocabulary size or None, vocab file path or None), both checked."""
  if vocab_size is not None and vocab_file:
    raise DataError("prepare-text: give --vocab-size or --vocab-file, not both.")
  if (isinstance(vocab_sample_mb, bool) or not isinstance(vocab_sample_mb, (int, float))
      or not vocab_sample_mb >= 0):
    raise DataError(f"prepare-text: --vocab-sample-mb must be a number >= 0 (0: train on "
                    f"every document), got {vocab_sample_mb!r}.")
  for name, value in (("workers", workers), ("shard-tokens", shard_tokens)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise DataError(f"prepare-text: --{name} must be a positive integer, got {value!r}.")
  if vocab_file:
    path = Path(vocab_file).expanduser().absolute()
    text.tokenizer_from_vocab_file(str(path))  # Missing, or not a BERT vocabulary: say so now.
    return None, path
  return text._check_vocab_size(DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size), None


def _names(found: Sequence[sources.Input]) -> str:
  names = [str(item.path) for item in found[:3]]
  return ", ".join(names) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def _bar(progress: bool, desc: str, total: int | None = None) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress,
                   dynamic_ncols=True)


def _text_bytes(document: str) -> int:
  return len(document) if document.isascii() else len(document.encode("utf-8"))


# --- the output folder --------------------------------------------------------------------


def _claim(out: Path, state: dict[str, Any]) -> None:
  """Makes `out` this run's folder, or refuses one that holds another corpus."""
  if out.exists() and not out.is_dir():
    raise DataError(f"prepare-text: --out {out} is a file; give a folder.")
  out.mkdir(parents=True, exist_ok=True)
  progress = out / shards.PROGRESS
  if progress.is_file():
    try:
      old = json.loads(progress.read_text(encoding="utf-8"))
    except (OSError, ValueError):
      old = {}
    if old.get("fingerprint") == state["fingerprint"]:
      return
    work = [p.name for p in out.iterdir() if p.name == shards.MANIFEST
            or (p.name.startswith("shard-") and p.suffix == ".json")]
    if work:
      raise DataError(
          f"prepare-text: --out {out} was prepared from other inputs or settings "
          f"({_difference(old, state)}); remove it (rm -r {out}) or choose another --out.")
    log.info("Restarting %s: it holds no finished shard of the old inputs.", out)
    for path in out.iterdir():
      if path.name in (shards.PROGRESS, shards.VOCAB_FILE, shards.TOKENIZER_FILE):
        path.unlink()
  elif any(out.iterdir()):
    raise DataError(f"prepare-text: --out {out} is not empty and holds no dsjax prepared "
                    "corpus; choose an empty or new folder.")
  for path in out.glob(".*.tmp"):  # A killed run's partial files.
    path.unlink()
  shards.write_json(progress, state)


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
  """The first setting or input that differs between two prepare.json states, in words."""
  before, after = old.get("settings") or {}, new["settings"]
  show = lambda value: value["file"] if isinstance(value, dict) else repr(value)
  for key in sorted(set(before) | set(after)):
    a, b = before.get(key), after.get(key)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict) and a["file"] == b["file"]:
        return f"{key}: {b['file']} changed"
      return f"{key}: {show(a)} then, {show(b)} now"
  inputs_before, inputs_after = old.get("inputs") or [], new["inputs"]
  for a, b in itertools.zip_longest(inputs_before, inputs_after):
    if a != b:
      if a is None or b is None or a.get("path") != b.get("path"):
        return (f"the inputs were {len(inputs_before)} files, now {len(inputs_after)}, first "
                f"differing at {(b or a or {}).get('path')}")
      return f"{b['path']} changed (size or modification time)"
  return "its prepare.json is unreadable"


def _finished_manifest(out: Path, fingerprint: str) -> dict[str, Any] | None:
  """The manifest if `out` is complete and intact; else None (a broken one is removed)."""
  if not (out / shards.MANIFEST).is_file():
    return None
  try:
    manifest = shards.read_manifest(out)
    if manifest.get("fingerprint") == fingerprint:
      shards.check_file(out, manifest["vocabulary"], "vocabulary")
      for index, shard in enumerate(manifest["shards"]):
        shards.check_file(out, shard["tokens"], f"shard {index} tokens")
        shards.check_file(out, shard["offsets"], f"shard {index} offsets")
      return manifest
  except DataError as e:
    log.warning("Repairing %s: %s", out, e)
  (out / shards.MANIFEST).unlink()  # Until it is rewritten, the folder is not complete.
  return None


def _finished_shards(out: Path, vocab_sha256: str) -> dict[int, dict[str, Any]]:
  """index -> record of each shard a previous run finished and that still checks out."""
  done = {}
  for path in sorted(out.glob("shard-*.json")):
    try:
      record = json.loads(path.read_text(encoding="utf-8"))
      index = int(record["index"])
      if shards.shard_files(index)[2] != path.name or record["vocab_sha256"] != vocab_sha256:
        raise DataError(f"{path.name} is of another run")
      shards.check_file(out, record["tokens"], f"shard {index} tokens")
      shards.check_file(out, record["offsets"], f"shard {index} offsets")
    except (OSError, ValueError, KeyError, TypeError, DataError) as e:
      log.warning("Redoing %s: %s", path.name, e)
      path.unlink()
      continue
    done[index] = record
  return done


# --- the tokenizer ------------------------------------------------------------------------


def _tokenizer(out: Path, found: Sequence[sources.Input], requested: int | None,
               vocab_path: Path | None, every: int,
               progress: bool) -> tuple[Any, dict[str, Any], int | None]:
  """Trains (or reuses a previous run's) or loads the tokenizer; writes vocab.txt and
  tokenizer.json into `out`. It is trained on every `every`-th document.

  Returns:
    (tokenizer, the manifest's vocabulary entry, the text bytes if this call read them).
  """
  tokenizer_file, vocab_txt = out / shards.TOKENIZER_FILE, out / shards.VOCAB_FILE
  count = [0, 0, 0]  # Documents and text bytes of the read pass; 1 once it is complete.
  passes = iter(("read", "train"))

  def stream() -> Iterator[str]:
    name = next(passes, "train")
    with _bar(progress, name, None if name == "read" else count[1]) as bar:
      for index, document in enumerate(sources.documents(found)):
        size = _text_bytes(document)
        if name == "read":
          count[0], count[1] = count[0] + 1, count[1] + size
        bar.update(size)
        if index % every == 0:
          yield document
      count[2] = 1

  reuse = tokenizer_file.is_file() and vocab_txt.is_file()  # This run's own, from before.
  if vocab_path is not None:
    tokenizer = text.tokenizer_from_vocab_file(str(vocab_path))
    if not reuse:
      collections.deque(stream(), maxlen=0)  # The read pass: every file, before any shard.
      if not count[0]:
        raise _no_text(found)
    vocab_bytes = vocab_path.read_bytes()
  elif reuse:
    tokenizer = text._tokenizers().Tokenizer.from_file(str(tokenizer_file))
    text._check_special_ids(tokenizer, f"the tokenizer {tokenizer_file}")
    vocab_bytes = vocab_txt.read_bytes()
  else:
    try:
      tokenizer = text.train_tokenizer(stream, requested)
    except DataError:
      if count[2] and not count[0]:  # Read to the end without a document.
        raise _no_text(found) from None
      raise
    vocab = tokenizer.get_vocab()
    vocab_bytes = "".join(f"{t}\n" for t in sorted(vocab, key=vocab.__getitem__)).encode()
  if not reuse:
    shards.write_atomically(vocab_txt, vocab_bytes)
    shards.write_atomically(tokenizer_file, tokenizer.to_str().encode())
  if text.tokenizer_from_vocab_file(str(vocab_txt)).get_vocab() != tokenizer.get_vocab():
    raise DataError(f"prepare-text: the vocabulary does not survive being written as "
                    f"{vocab_txt} (a token holds a line break); report this as a bug.")
  return tokenizer, {
      **shards.file_entry(vocab_txt), "vocab_size": tokenizer.get_vocab_size(),
      "source": "trained" if vocab_path is None else "vocab_file",
      "requested_size": requested, "source_file": None if vocab_path is None else str(vocab_path),
      "special_ids": {name: tokenizer.token_to_id(token)
                      for name, token in zip(text._ID_NAMES, text.SPECIAL_TOKENS, strict=True)}
  }, count[1] or None


def _no_text(found: Sequence[sources.Input]) -> DataError:
  return DataError(f"prepare-text: the inputs ({_names(found)}) hold no text (the files are "
                   "empty or whitespace only); add text or fix --input.")


# --- tokenizing ---------------------------------------------------------------------------


class _Encoder:
  """Encodes documents as text.load_text does: no [CLS]/[SEP], "[MASK]" in text is text."""

  def __init__(self, tokenizer_file: str, dtype: str):
    self.encoder = wordpiece.FastEncoder(text._tokenizers().Tokenizer.from_file(tokenizer_file))
    self.dtype = np.dtype(dtype).newbyteorder("<")

  def __call__(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token counts int64 [n], the ids back to back, UTF-8 bytes int64 [n])."""
    ids = self.encoder.encode(documents)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(lengths.sum()))
    sizes = np.fromiter(map(_text_bytes, documents), np.int64, len(documents))
    return lengths, tokens, sizes


_WORKER_ENCODER: _Encoder | None = None


def _start_worker(tokenizer_file: str, dtype: str) -> None:
  global _WORKER_ENCODER
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle.
  _WORKER_ENCODER = _Encoder(tokenizer_file, dtype)


def _encode_in_worker(documents: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  assert _WORKER_ENCODER is not None
  return _WORKER_ENCODER(documents)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = old


def _encoded(batches: Iterator[tuple[int, list[str]]], tokenizer_file: Path, dtype: str,
             workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
  """(first input document index, lengths, tokens, sizes) of each batch, in order."""
  if workers == 1:
    encode = _Encoder(str(tokenizer_file), dtype)
    for start, documents in batches:
      yield (start, *encode(documents))
    return
  # Fork is fast (no re-import); each worker encodes on one thread, as the processes are
  # the parallelism. The variable also silences the tokenizers library's fork warning.
  method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
  with _environment("TOKENIZERS_PARALLELISM", "false"), ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
      initargs=(str(tokenizer_file), dtype)) as pool:
    with warnings.catch_warnings():
      # JAX warns at any fork once its backend runs; these workers never touch JAX.
      warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
      pool.submit(int).result()  # With fork, the first task starts every worker.
    pending: collections.deque = collections.deque()
    try:
      for start, documents in batches:
        pending.append((start, pool.submit(_encode_in_worker, documents)))
        if len(pending) >= 2 * workers:  # Bounded: a few batches in flight, in order.
          first, future = pending.popleft()
          yield (first, *future.result())
      while pending:
        first, future = pending.popleft()
        yield (first, *future.result())
    finally:
      pool.shutdown(cancel_futures=True)


class _Batches:
  """Batches of consecutive input documents, leaving out the ranges of finished shards.

  Attributes:
    count: input documents seen so far (all of them once exhausted).
  """

  def __init__(self, documents: Iterator[str], skip: list[list[int]]):
    self.documents = documents
    self.skip = sorted(tuple(r) for r in skip)
    self.count = 0

  def __iter__(self) -> Iterator[tuple[int, list[str]]]:
    batch: list[str] = []
    start = chars = 0
    ranges = iter(self.skip)
    skip = next(ranges, None)
    for document in self.documents:
      index = self.count
      self.count += 1
      while skip is not None and index >= skip[1]:
        skip = next(ranges, None)
      if skip is not None and index >= skip[0]:
        if batch:
          yield start, batch
          batch, chars = [], 0
        continue
      if not batch:
        start = index
      batch.append(document)
      chars += len(document)
      if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
        yield start, batch
        batch, chars = [], 0
    if batch:
      yield start, batch
