"""Plain-text corpus, WordPiece tokenizer and masked-LM inputs for BERT pretraining.

Corpus. With `data_dir=""` the corpus is embedded: the English help topics that ship
with CPython (`pydoc_data.topics`, about 80 topics and 0.5 MB of text), one document
per topic, in key order. Otherwise `data_dir` is a UTF-8 text file or a folder searched
recursively for `*.txt` files (in sorted path order), and every blank-line-separated
paragraph of every file is one document. Paragraphs rather than files are the unit so
that a single file, or a handful of files, can still be split into train/val/test;
paragraphs of one file may therefore land in different splits. A `data_dir` written by
`dsjax-data prepare-text` (it holds a `manifest.json`; see `dsjax.data.prepare`) is the
third source: its token shards are memory-mapped instead of tokenizing again, and give
the same Dataset as the documents it was prepared from; under the streaming loader
(`data.loader`, see `dsjax.data.loader`) its sequences are read from the shards on demand
instead of packed in memory.

Tokenizer. A lowercasing BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer,
`##` continuation prefix, special tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)
trained with the `tokenizers` package on the whole corpus (all splits: the vocabulary
is a property of the corpus, like a character set, and does not depend on the split
seed). Training is deterministic and can stream (a corpus need not fit in memory); the
result is cached as JSON in `cache_dir` under a name keyed by a hash of the corpus text
and the vocabulary size, so later loads of the same corpus reuse it. The trained
vocabulary can be smaller than asked for (a small corpus runs out of merges) or larger
(the whole character set is kept); `Dataset.num_classes` is always the real size.

Splits. Documents, not sequences, are split: test is 10% of the documents (at least
one), val is `val_fraction` of the rest (at least one unless `val_fraction` is 0, when
val is empty), train is the rest (at least one). Documents without any token are dropped
first, so every non-empty split packs into at least one sequence for any `seq_len`.
With the built-in corpus and val_fraction=0.1, val holds at least ~1000 and test at
least ~1500 tokens for every split seed 0..999 (vocab 8192), i.e. at least 8 and 12
sequences at seq_len=128; train must fill at least one whole sequence.

Packing. Per split, the documents' tokens are concatenated with one [SEP] between
neighbouring documents and cut into rows of `seq_len - 1` tokens, each row prefixed
with [CLS]; the last row is padded with [PAD] (attention_mask 0). Rows therefore may
start or end in the middle of a document, and [SEP] may sit anywhere in a row.

Masking. `mask_tokens` applies BERT's 80/10/10 masking rule to a batch on device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.data import loader, packed, shards
from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset, split_train_val
from dsjax.data.lazy import lazy_split
from dsjax.errors import DataError

if TYPE_CHECKING:
  from tokenizers import Tokenizer

log = logging.getLogger(__name__)

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Order fixes the ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)
CONTINUATION_PREFIX = "##"
# BERT's limit: longer "words" (e.g. base64 blobs) become a single [UNK].
MAX_INPUT_CHARS_PER_WORD = 100
TEST_FRACTION = 0.1
MIN_SEQ_LEN = 8
MAX_SEQ_LEN = 512
MIN_VOCAB_SIZE = 16
DEFAULT_CACHE_DIR = "~/.cache/dsjax/tokenizers"
# Of the tokens selected for prediction: this share becomes [MASK], the next
# RANDOM_FRACTION a random token, and the rest is left unchanged.
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1
# Bump when the training recipe changes, so stale cached tokenizers are not reused.
_RECIPE_VERSION = "bert-wordpiece-1"
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_DIR_HINT = ("set --config.data.data_dir to a UTF-8 text file or a folder of .txt files, or "
             "to '' for the built-in corpus")


def _tokenizers() -> Any:
  """Imports the `tokenizers` package, or raises a DataError saying how to install it."""
  try:
    import tokenizers
  except ImportError as e:
    raise DataError(
        "The text dataset needs the 'tokenizers' package, which is not installed; run "
        "`pip install tokenizers`.") from e
  return tokenizers


# --- corpus -------------------------------------------------------------------------------


def default_documents() -> list[str]:
  """Returns the built-in corpus: CPython's pydoc help topics, one per document.

  Returns:
    The topic texts, sorted by topic name.
  """
  from pydoc_data.topics import topics
  return [text for _, text in sorted(topics.items()) if text.strip()]


def _paragraphs(text: str) -> list[str]:
  """Splits text on blank lines into stripped, non-empty paragraphs."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _read_utf8(path: Path) -> str:
  """Reads a whole file as UTF-8 (a leading BOM is dropped), or raises a DataError."""
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(
        f"text: cannot read {str(path)!r} ({e.strerror or e}); make it readable or remove it "
        "from data_dir.") from e
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(
        f"text: {str(path)!r} is not valid UTF-8 ({e.reason} at byte {e.start}); re-save it "
        "as UTF-8 or remove it from data_dir.") from e


def load_documents(data_dir: str) -> list[str]:
  """Returns the corpus as a list of documents, in a deterministic order.

  Args:
    data_dir: "" for the built-in corpus; else a text file, or a folder searched
      recursively for `*.txt` files, whose blank-line-separated paragraphs are the
      documents.

  Returns:
    Non-empty document strings.

  Raises:
    DataError: if the path does not exist, a folder holds no .txt file, a file is not
      UTF-8 or cannot be read, or there is no text at all.
  """
  if not data_dir:
    return default_documents()
  root = Path(data_dir).expanduser()
  if root.is_file():
    files = [root]
  elif root.is_dir():
    files = sorted((f for f in root.rglob("*.txt") if f.is_file()),
                   key=lambda f: f.relative_to(root).as_posix())
    if not files:
      raise DataError(f"text: no .txt files under {data_dir!r}; {_DIR_HINT}.")
  else:
    raise DataError(f"text: data_dir {data_dir!r} does not exist; {_DIR_HINT}.")
  documents = [p for f in files for p in _paragraphs(_read_utf8(f))]
  if not documents:
    raise DataError(
        f"text: the text files in {data_dir!r} are empty or whitespace only; add text to "
        f"them, or {_DIR_HINT}.")
  return documents


# --- tokenizer ----------------------------------------------------------------------------


def _check_vocab_size(vocab_size: Any) -> int:
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or (
      vocab_size < MIN_VOCAB_SIZE):
    raise DataError(
        f"text: vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}; set "
        "--config.data.vocab_size to e.g. 8192.")
  return int(vocab_size)


def _untrained_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
  """A BERT-style WordPiece pipeline around `vocab` (empty model if None)."""
  tk = _tokenizers()
  kwargs = {"unk_token": UNK_TOKEN, "continuing_subword_prefix": CONTINUATION_PREFIX,
            "max_input_chars_per_word": MAX_INPUT_CHARS_PER_WORD}
  model = tk.models.WordPiece(vocab, **kwargs) if vocab else tk.models.WordPiece(**kwargs)
  tokenizer = tk.Tokenizer(model)
  tokenizer.normalizer = tk.normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
  tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = tk.decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  return tokenizer


def character_pieces(pre_tokenizer: Any, char: str) -> int:
  """The pieces the pre-tokenizer cuts "a<char>a" into: 1 if `char` stays inside a word,
  2 if it is whitespace, 3 if it is punctuation (a piece of its own)."""
  return len(pre_tokenizer.pre_tokenize_str(f"a{char}a"))


def _is_word_character(pre_tokenizer: Any, char: str) -> bool:
  """Whether the pre-tokenizer keeps `char` inside a word (not whitespace, not punctuation)."""
  return character_pieces(pre_tokenizer, char) == 1


def _continuations_exact(scratch: Tokenizer, texts: Iterable[str]) -> set[str]:
  """The characters after the first of every pre-tokenized word, word by word (slow)."""
  continuations = set()
  for text in texts:
    words = scratch.pre_tokenizer.pre_tokenize_str(scratch.normalizer.normalize_str(text))
    for word, _ in words:
      continuations.update(word[1:])
  return continuations


class _ContinuationScan:
  """Finds the continuation characters of a corpus from per-character tables.

  `normalize_str` and `pre_tokenize_str` on the whole corpus cost more than encoding it.
  BertNormalizer maps each character on its own (cleaning, CJK spacing, accent
  stripping, lowercasing), except that NFD reorders runs of combining marks, and
  BertPreTokenizer classes each normalized character on its own. So the normalized
  text is the concatenation of each raw character's normalized form, and a character
  continues a word exactly when it and the character before it are word characters.
  A text holding a character whose normalized form keeps a combining mark (where the
  reordering could change the order) is scanned word by word instead.
  """

  _SIZE = 0x110000  # Every Unicode code point.
  _BATCH_CHARS = 1 << 22

  def __init__(self, scratch: Tokenizer):
    self.scratch = scratch
    self.normalized: dict[int, str] = {}
    self.inner: dict[int, set[str]] = {}  # Continuations inside one character's form.
    self.risky = np.zeros(self._SIZE, bool)
    self.kept = np.zeros(self._SIZE, bool)  # Not removed by the normalizer.
    self.first_is_word = np.zeros(self._SIZE, bool)
    self.last_is_word = np.zeros(self._SIZE, bool)
    self.continuations: set[str] = set()
    self.count = 0

  def _learn(self, code: int) -> None:
    import unicodedata  # noqa: PLC0415 - only the scan needs it.

    out = self.scratch.normalizer.normalize_str(chr(code))
    self.normalized[code] = out
    self.inner[code] = set()
    if not out:
      return
    word = [_is_word_character(self.scratch.pre_tokenizer, c) for c in out]
    self.kept[code] = True
    self.first_is_word[code], self.last_is_word[code] = word[0], word[-1]
    self.risky[code] = any(unicodedata.combining(c) for c in out)
    self.inner[code] = {c for i, c in enumerate(out) if i and word[i] and word[i - 1]}

  def _scan(self, batch: list[str]) -> None:
    joined = "\n\n".join(batch)  # A blank line is whitespace: no word spans two texts.
    codes = np.frombuffer(joined.encode("utf-32-le"), np.uint32)
    present = np.zeros(self._SIZE, bool)
    present[codes] = True
    distinct = np.flatnonzero(present).tolist()
    for code in distinct:
      if code not in self.normalized:
        self._learn(code)
    if self.risky[present].any():
      self.continuations |= _continuations_exact(self.scratch, batch)
      return
    for code in distinct:
      self.continuations |= self.inner[code]
    kept = codes[self.kept[codes]]
    joins = self.last_is_word[kept[:-1]] & self.first_is_word[kept[1:]]
    followers = np.zeros(self._SIZE, bool)
    followers[kept[1:][joins]] = True
    self.continuations.update(self.normalized[c][0] for c in np.flatnonzero(followers).tolist())

  def run(self, texts: Iterable[str]) -> set[str]:
    """Scans `texts` in batches; returns the continuation characters (self.count: texts)."""
    batch, chars = [], 0
    for text in texts:
      batch.append(text)
      chars += len(text)
      self.count += 1
      if chars >= self._BATCH_CHARS:
        self._scan(batch)
        batch, chars = [], 0
    if batch:
      self._scan(batch)
    return self.continuations


def train_tokenizer(texts: Sequence[str] | Callable[[], Iterable[str]],
                    vocab_size: int) -> Tokenizer:
  """Trains a lowercasing BERT WordPiece tokenizer on `texts`, deterministically.

  The `tokenizers` trainer numbers the `##x` continuation pieces in hash-map order,
  which changes from run to run and, through tie-breaking between equally frequent
  merges, changes the learned vocabulary too. Handing the trainer every continuation
  piece of the corpus up front, in sorted order, fixes all ids and hence every merge.
  Those pieces are passed as the trainer's special tokens only to pin their ids; the
  returned tokenizer is rebuilt from the learned vocabulary with just the five real
  special tokens.

  Args:
    texts: training documents, or a function returning a fresh iterable of them each
      time it is called (it is called twice), so a corpus larger than memory streams.
    vocab_size: target vocabulary size, special tokens included.

  Returns:
    The tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; `encode` adds
    [CLS] ... [SEP] unless called with `add_special_tokens=False`. The same documents
    give the same tokenizer whether passed as a list or streamed.

  Raises:
    DataError: if vocab_size is not an integer >= MIN_VOCAB_SIZE or texts is empty.
  """
  vocab_size = _check_vocab_size(vocab_size)
  if not callable(texts):
    texts = list(texts)
  documents = texts if callable(texts) else lambda: texts
  tk = _tokenizers()
  start = time.perf_counter()
  scratch = _untrained_tokenizer()
  scan = _ContinuationScan(scratch)
  continuations = scan.run(documents())
  if not scan.count:
    raise DataError("text: no documents to train the tokenizer on; give it some text.")
  pinned = list(SPECIAL_TOKENS) + [CONTINUATION_PREFIX + c for c in sorted(continuations)]
  trainer = tk.trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=pinned, show_progress=False,
      continuing_subword_prefix=CONTINUATION_PREFIX)
  scratch.train_from_iterator(documents(), trainer=trainer, length=scan.count)
  tokenizer = _untrained_tokenizer(scratch.get_vocab(with_added_tokens=False))
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  tokenizer.post_processor = tk.processors.TemplateProcessing(
      single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
      pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
      special_tokens=[(t, SPECIAL_TOKENS.index(t)) for t in (CLS_TOKEN, SEP_TOKEN)])
  _check_special_ids(tokenizer, "the freshly trained tokenizer")
  log.info("Trained a WordPiece tokenizer (%d tokens) on %d documents in %.2fs.",
           tokenizer.get_vocab_size(), scan.count, time.perf_counter() - start)
  return tokenizer


def tokenizer_from_vocab_file(vocab_file: str) -> Tokenizer:
  """The BERT WordPiece tokenizer of a `vocab.txt` (one token per line, id = line number),
  as Hugging Face BERT checkpoints ship it; uncased (lowercasing) like bert-*-uncased.

  Raises:
    DataError: the file is missing, or lacks one of the special tokens.
  """
  path = Path(vocab_file).expanduser()
  if not path.is_file():
    raise DataError(f"text: vocab_file {path} does not exist; set --config.data.vocab_file to "
                    "the vocab.txt of the pretrained checkpoint (or leave it empty to train "
                    "a tokenizer on the corpus)")
  tokens = _read_utf8(path).splitlines()
  vocab = {token: index for index, token in enumerate(tokens) if token}
  missing = [token for token in SPECIAL_TOKENS if token not in vocab]
  if missing:
    raise DataError(f"text: vocab_file {path} has no {', '.join(missing)}; it is not a BERT "
                    "WordPiece vocabulary")
  return _untrained_tokenizer(vocab)


def _check_special_ids(tokenizer: Tokenizer, what: str) -> None:
  ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
  if ids != list(range(len(SPECIAL_TOKENS))):
    found = dict(zip(SPECIAL_TOKENS, ids, strict=True))
    raise DataError(
        f"text: {what} numbers its special tokens {found}, not 0..4; delete it so that it is "
        "retrained.")


def tokenizer_cache_path(texts: Sequence[str], vocab_size: int, cache_dir: str) -> Path:
  """Returns where the tokenizer for this corpus and vocabulary size is cached.

  Args:
    texts: the training documents; their content (and order) is hashed.
    vocab_size: target vocabulary size.
    cache_dir: cache folder; "" means DEFAULT_CACHE_DIR.

  Returns:
    `<cache_dir>/wordpiece-<vocab_size>-<hash>.json`. The hash also covers the
    recipe version and the `tokenizers` version, which could change the result.
  """
  digest = hashlib.sha256()
  version = _tokenizers().__version__
  digest.update(f"{_RECIPE_VERSION}\0{version}\0{int(vocab_size)}\0".encode())
  for text in texts:
    data = text.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  folder = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
  return folder / f"wordpiece-{int(vocab_size)}-{digest.hexdigest()[:20]}.json"


def _write_atomically(path: Path, text: str) -> None:
  """Writes `text` to `path` via a temporary file and os.replace."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except OSError as e:
    raise DataError(
        f"text: cannot write the tokenizer cache in {str(path.parent)!r} ({e.strerror or e}); "
        "set --config.data.cache_dir to a writable folder.") from e
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def cached_tokenizer(texts: Sequence[str], vocab_size: int,
                     cache_dir: str) -> tuple[Tokenizer, Path]:
  """Loads the cached tokenizer for `texts`, training and caching it if there is none.

  A cache file that cannot be parsed, or has the wrong special-token ids, is replaced.

  Args:
    texts: the training documents.
    vocab_size: target vocabulary size.
    cache_dir: cache folder; "" means DEFAULT_CACHE_DIR.

  Returns:
    (tokenizer, path of its JSON file).

  Raises:
    DataError: if vocab_size is invalid or the cache folder is not writable.
  """
  vocab_size = _check_vocab_size(vocab_size)
  path = tokenizer_cache_path(texts, vocab_size, cache_dir)
  if path.is_file():
    try:
      tokenizer = _tokenizers().Tokenizer.from_file(str(path))
      _check_special_ids(tokenizer, f"the cached tokenizer {str(path)!r}")
      log.info("Reusing the cached tokenizer %s.", path)
      return tokenizer, path
    except Exception as e:  # A corrupt cache file is rebuilt, whatever the error.
      log.warning("Retraining the tokenizer: cannot use the cached %s (%s).", path, e)
  tokenizer = train_tokenizer(texts, vocab_size)
  _write_atomically(path, tokenizer.to_str())
  return tokenizer, path


def load_tokenizer(data_config: Any) -> Tokenizer:
  """Returns the tokenizer `load_text(data_config)` uses (cached, or trained and cached).

  Args:
    data_config: object with fields data_dir, vocab_size and (optional) cache_dir.

  Returns:
    The tokenizer; see `train_tokenizer`.

  Raises:
    DataError: as `load_documents` and `cached_tokenizer`.
  """
  documents = load_documents(getattr(data_config, "data_dir", "") or "")
  tokenizer, _ = cached_tokenizer(documents, data_config.vocab_size,
                                  getattr(data_config, "cache_dir", "") or "")
  return tokenizer


# --- splitting and packing ----------------------------------------------------------------


def split_documents(num_documents: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
  """Deterministically splits document indices into train/val/test.

  Test takes TEST_FRACTION of the documents (at least one), val `val_fraction` of the
  rest (at least one if val_fraction > 0), train the remainder.

  Args:
    num_documents: number of documents.
    val_fraction: share of the non-test documents that go to val, in [0, 1).
    seed: split seed.

  Returns:
    split name -> sorted document indices; disjoint and covering all documents.

  Raises:
    DataError: if there are too few documents to leave train at least one.
  """
  n_test = max(1, round(TEST_FRACTION * num_documents))
  rest = num_documents - n_test
  n_val = max(1, round(val_fraction * rest)) if val_fraction > 0 else 0
  if rest - n_val < 1:
    raise DataError(
        f"text: the corpus has {num_documents} document(s), too few to give train, val and "
        "test one each; add text (paragraphs are separated by blank lines) or lower "
        "--config.data.val_fraction.")
  rest_idx, test_idx = split_train_val(num_documents, n_test, [seed, 0])
  train_pos, val_pos = split_train_val(rest, n_val, [seed, 1])
  return {"train": rest_idx[train_pos], "val": rest_idx[val_pos], "test": test_idx}


def pack_sequences(documents: Sequence[Sequence[int]], seq_len: int, *, cls_id: int,
                   sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """Packs tokenised documents into fixed-length rows that each start with [CLS].

  The documents are joined with one `sep_id` between neighbours and cut into chunks
  of `seq_len - 1` tokens; each row is `cls_id` followed by a chunk, the last one
  padded with `pad_id`.

  Args:
    documents: token ids per document (no special tokens).
    seq_len: row length, >= 2.
    cls_id: id put first in every row.
    sep_id: id put between documents.
    pad_id: id that fills the end of the last row.

  Returns:
    'input_ids', 'attention_mask' (1 for real tokens, [CLS] included, 0 for padding)
    and 'token_type_ids' (zeros): int32 [N, seq_len], N = ceil(tokens / (seq_len-1));
    N is 0 if there are no tokens.
  """
  return pack_stream(join_documents(documents, sep_id), seq_len, cls_id=cls_id, pad_id=pad_id)


def join_documents(documents: Sequence[Sequence[int]], sep_id: int) -> np.ndarray:
  """The documents' token ids, int32, with one `sep_id` between neighbours."""
  pieces: list[np.ndarray] = []
  for i, doc in enumerate(documents):
    if i:
      pieces.append(np.array([sep_id], np.int32))
    pieces.append(np.asarray(doc, np.int32).reshape(-1))
  return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def pack_stream(stream: np.ndarray, seq_len: int, *, cls_id: int,
                pad_id: int) -> dict[str, np.ndarray]:
  """Cuts a joined token stream into rows as `pack_sequences` does.

  Args:
    stream: the documents' token ids, already joined with their separators.
    seq_len: row length, >= 2.
    cls_id: id put first in every row.
    pad_id: id that fills the end of the last row.

  Returns:
    The arrays of `pack_sequences`.
  """
  content = seq_len - 1
  rows = math.ceil(len(stream) / content)
  flat = np.full((rows * content,), pad_id, np.int32)
  flat[:len(stream)] = stream
  real = (np.arange(rows * content) < len(stream)).astype(np.int32)
  first = np.full((rows, 1), cls_id, np.int32)
  input_ids = np.concatenate([first, flat.reshape(rows, content)], axis=1)
  attention_mask = np.concatenate(
      [np.ones((rows, 1), np.int32), real.reshape(rows, content)], axis=1)
  return {"input_ids": input_ids, "attention_mask": attention_mask,
          "token_type_ids": np.zeros_like(input_ids)}


def _check_seq_len(seq_len: Any) -> int:
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or not (
      MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN):
    raise DataError(
        f"text: seq_len must be an integer in [{MIN_SEQ_LEN}, {MAX_SEQ_LEN}], got "
        f"{seq_len!r}; set --config.data.seq_len to e.g. 128.")
  return int(seq_len)


_ID_NAMES = ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id")


@register_dataset("text")
def load_text(data_config: Any) -> Dataset:
  """Loads a text corpus as packed token sequences for masked-LM pretraining.

  A `data_dir` holding a `manifest.json` is a corpus prepared by `dsjax-data
  prepare-text` (see `dsjax.data.prepare`): its token shards are read as they are, with
  no tokenizing, and give the same Dataset as the documents they were prepared from.

  Args:
    data_config: object with fields data_dir, val_fraction, split_seed, seq_len,
      vocab_size and (optional) vocab_file and cache_dir ("" means DEFAULT_CACHE_DIR).

  Returns:
    Dataset named 'text' whose splits hold int32 [N, seq_len] 'input_ids',
    'attention_mask' and 'token_type_ids'; num_classes is the tokenizer's vocabulary
    size; metadata holds vocab_size, pad_id, cls_id, sep_id, mask_id, unk_id,
    special_ids, tokenizer_path, seq_len, num_documents {split: count} and num_tokens
    {split: count of non-padding tokens, [CLS] and [SEP] included}.

  Raises:
    DataError: for a bad seq_len, vocab_size or val_fraction, a missing or unreadable
      corpus, too few documents to split, too little text for one full training
      sequence, or prepared data that is unfinished, corrupt or of another vocabulary.
  """
  seq_len = _check_seq_len(data_config.seq_len)
  val_fraction = check_val_fraction(data_config.val_fraction, "text")
  data_dir = getattr(data_config, "data_dir", "") or ""
  vocab_file = getattr(data_config, "vocab_file", "") or ""
  if data_dir and shards.is_prepared(data_dir):
    return _load_prepared(data_config, data_dir, seq_len, val_fraction,
                          lazy=loader.loader_kind(data_config) == "grain")
  documents = load_documents(data_dir)
  if vocab_file:  # A pretrained model's vocabulary: its token ids are its embedding rows.
    tokenizer, path = tokenizer_from_vocab_file(vocab_file), Path(vocab_file)
  else:
    tokenizer, path = cached_tokenizer(documents, data_config.vocab_size,
                                       getattr(data_config, "cache_dir", "") or "")
  # A literal "[MASK]" in the corpus is text, not the mask token.
  tokenizer.encode_special_tokens = True
  encoded = [e.ids for e in tokenizer.encode_batch(documents, add_special_tokens=False)]
  token_ids = [ids for ids in encoded if ids]  # e.g. a paragraph of lone combining marks.
  parts = split_documents(len(token_ids), val_fraction, int(data_config.split_seed))
  ids = {name: tokenizer.token_to_id(t) for name, t in zip(_ID_NAMES, SPECIAL_TOKENS, strict=True)}
  streams = {name: join_documents([token_ids[i] for i in indices], ids["sep_id"])
             for name, indices in parts.items()}
  where = repr(data_dir) if data_dir else "the built-in corpus"
  return _text_dataset(streams, parts, seq_len, ids, tokenizer.get_vocab_size(), str(path),
                       where)


def _load_prepared(data_config: Any, data_dir: str, seq_len: int, val_fraction: float, *,
                   lazy: bool) -> Dataset:
  """The Dataset of a folder written by `dsjax-data prepare-text` (see `load_text`).

  With `lazy` (the streaming loader's), each split's sequences are read from the shards
  when indexed (`dsjax.data.packed.PackedRows`) instead of packed in memory; they are the
  same sequences.
  """
  corpus = shards.open_prepared(data_dir)
  _check_prepared_vocabulary(corpus, data_config)
  parts = split_documents(corpus.num_documents, val_fraction, int(data_config.split_seed))
  ids = corpus.special_ids
  if lazy:
    rows = {name: packed.PackedRows(corpus, parts[name], seq_len, ids) for name in parts}
    if rows["train"].stream_length < seq_len - 1:
      raise DataError(
          f"text: the training split of {data_dir!r} has {rows['train'].num_tokens} tokens, "
          f"too few for one full sequence of seq_len={seq_len}; add text or lower "
          "--config.data.seq_len.")
    return Dataset(name="text", splits={name: lazy_split(source) for name, source in rows.items()},
                   num_classes=corpus.vocab_size,
                   metadata=_text_metadata(corpus.vocab_size, ids, str(corpus.tokenizer_path),
                                           seq_len, parts,
                                           {k: v.num_tokens for k, v in rows.items()}))
  streams = corpus.join_documents(parts, ids["sep_id"])
  return _text_dataset(streams, parts, seq_len, ids, corpus.vocab_size,
                       str(corpus.tokenizer_path), repr(data_dir))


def _check_prepared_vocabulary(corpus: shards.PreparedText, data_config: Any) -> None:
  """Refuses a config whose vocabulary is not the one the prepared tokens are ids of."""
  folder, vocabulary = corpus.folder, corpus.manifest["vocabulary"]
  vocab_file = getattr(data_config, "vocab_file", "") or ""
  if vocab_file:
    wanted = tokenizer_from_vocab_file(vocab_file).get_vocab()
    if wanted != tokenizer_from_vocab_file(str(corpus.vocab_path)).get_vocab():
      raise DataError(
          f"text: data.vocab_file {vocab_file} is not the vocabulary {str(folder)!r} was "
          f"prepared with ({corpus.vocab_path}); set --config.data.vocab_file to that file, "
          f"or prepare the corpus again with dsjax-data prepare-text --vocab-file "
          f"{vocab_file} into another --out folder.")
  elif vocabulary["source"] == "vocab_file":
    raise DataError(
        f"text: {str(folder)!r} was tokenized with a pretrained vocabulary, but "
        "data.vocab_file is empty; set --config.data.vocab_file to it (a copy is "
        f"{corpus.vocab_path}).")
  elif _check_vocab_size(data_config.vocab_size) != vocabulary["requested_size"]:
    raise DataError(
        f"text: {str(folder)!r} was prepared with --vocab-size "
        f"{vocabulary['requested_size']}, but data.vocab_size is {data_config.vocab_size}; "
        f"set --config.data.vocab_size={vocabulary['requested_size']}, or prepare the "
        "corpus again with that size into another --out folder.")


def _text_dataset(streams: dict[str, np.ndarray], parts: dict[str, np.ndarray], seq_len: int,
                  ids: dict[str, int], vocab_size: int, tokenizer_path: str,
                  where: str) -> Dataset:
  """Packs each split's joined stream and adds the metadata; shared by both sources."""
  splits = {name: pack_stream(streams[name], seq_len, cls_id=ids["cls_id"],
                              pad_id=ids["pad_id"]) for name in ("train", "val", "test")}
  train_mask = splits["train"]["attention_mask"]
  if len(train_mask) == 0 or train_mask[0].sum() < seq_len:
    raise DataError(
        f"text: the training split of {where} has {int(train_mask.sum())} tokens, too few for "
        f"one full sequence of seq_len={seq_len}; add text or lower --config.data.seq_len.")
  metadata = _text_metadata(vocab_size, ids, tokenizer_path, seq_len, parts,
                            {k: int(v["attention_mask"].sum()) for k, v in splits.items()})
  return Dataset(name="text", splits=splits, num_classes=vocab_size, metadata=metadata)


def _text_metadata(vocab_size: int, ids: dict[str, int], tokenizer_path: str, seq_len: int,
                   parts: dict[str, np.ndarray], num_tokens: dict[str, int]) -> dict[str, Any]:
  return {
      "vocab_size": vocab_size,
      **ids,
      "special_ids": sorted(ids.values()),
      "tokenizer_path": tokenizer_path,
      "seq_len": seq_len,
      "num_documents": {k: len(v) for k, v in parts.items()},
      "num_tokens": num_tokens,
  }


# --- masking ------------------------------------------------------------------------------


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                mlm_probability: float, mask_id: int, vocab_size: int,
                special_ids: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Applies BERT's masked-LM corruption to a batch; pure jnp, jit-friendly.

  Each real (attention_mask != 0), non-special token is selected independently with
  probability `mlm_probability`, so a row may have no selected token at all. Of the
  selected tokens, 80% become `mask_id`, 10% a random token drawn uniformly from the
  non-special ids (it may equal the original), and 10% stay unchanged.

  Args:
    rng: a JAX PRNG key.
    input_ids: int [..., L] token ids.
    attention_mask: [..., L], nonzero for real tokens.
    mlm_probability: chance that a candidate token is selected (may be traced).
    mask_id: the [MASK] id.
    vocab_size: vocabulary size V, a Python int (static under jit).
    special_ids: ids never selected nor drawn as random tokens, a static sequence of
      Python ints (e.g. metadata['special_ids']).

  Returns:
    (masked_ids int32, labels int32 = the original ids, weights float32 = 1.0 at
    selected positions else 0.0), each shaped like input_ids.
  """
  specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
  num_regular = int(vocab_size) - len(specials)
  if num_regular < 1:
    raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to draw.")
  if isinstance(mlm_probability, (int, float)) and not 0.0 <= mlm_probability <= 1.0:
    raise DataError(
        f"text: mlm_probability must be in [0, 1], got {mlm_probability}; set "
        "--config.data.mlm_probability to e.g. 0.15.")
  ids = jnp.asarray(input_ids).astype(jnp.int32)
  is_special = jnp.zeros(ids.shape, jnp.bool_)
  for s in specials:
    is_special = is_special | (ids == s)
  candidate = (jnp.asarray(attention_mask) != 0) & ~is_special
  k_select, k_action, k_random = jax.random.split(rng, 3)
  selected = jax.random.bernoulli(k_select, mlm_probability, ids.shape) & candidate
  action = jax.random.uniform(k_action, ids.shape)
  to_mask = selected & (action < MASK_FRACTION)
  to_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
  # Uniform over the non-special ids: draw a rank in [0, V - #specials) and step over
  # each special id (in ascending order) at or below it.
  random_ids = jax.random.randint(k_random, ids.shape, 0, num_regular, dtype=jnp.int32)
  for s in specials:
    random_ids = random_ids + (random_ids >= s).astype(jnp.int32)
  masked = jnp.where(to_mask, jnp.asarray(mask_id, jnp.int32),
                     jnp.where(to_random, random_ids, ids))
  return masked, ids, selected.astype(jnp.float32)
