"""Tests for dsjax.data.text: corpus, WordPiece tokenizer, packing and MLM masking."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsjax.data import DATASETS, get_dataset, text
from dsjax.errors import DataError

VOCAB = 512
SEQ_LEN = 32


def _config(data_dir: str = "", cache_dir: str = "", seq_len: int = SEQ_LEN,
            vocab_size: int = VOCAB, val_fraction: float = 0.1,
            split_seed: int = 0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="text", data_dir=data_dir, val_fraction=val_fraction, split_seed=split_seed,
      seq_len=seq_len, vocab_size=vocab_size, mlm_probability=0.15, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def default_ds(cache_dir):
  return text.load_text(_config(cache_dir=cache_dir))


def _paragraph_files(folder, files: dict[str, list[str]]) -> None:
  for name, paragraphs in files.items():
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
          "every jolly boxer and the dog sleeps").split()


def _sentences(count: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=12)) + "." for _ in range(count)]


# --- default corpus ---------------------------------------------------------------------


def test_default_corpus_loads(default_ds, cache_dir):
  assert "text" in DATASETS
  md = default_ds.metadata
  assert default_ds.name == "text"
  assert default_ds.num_classes == md["vocab_size"] == VOCAB
  assert (md["pad_id"], md["unk_id"], md["cls_id"], md["sep_id"], md["mask_id"]) == (
      0, 1, 2, 3, 4)
  assert md["special_ids"] == [0, 1, 2, 3, 4]
  assert os.path.dirname(md["tokenizer_path"]) == cache_dir
  assert os.path.isfile(md["tokenizer_path"])
  assert sum(md["num_documents"].values()) == len(text.default_documents())
  assert set(default_ds.splits) == {"train", "val", "test"}
  for split in default_ds.splits.values():
    assert set(split) == {"input_ids", "attention_mask", "token_type_ids"}
    for arr in split.values():
      assert arr.dtype == np.int32
      assert arr.ndim == 2 and arr.shape[1] == SEQ_LEN
    assert len(split["input_ids"]) >= 1
    assert split["input_ids"].max() < VOCAB
  sizes = {k: len(v["input_ids"]) for k, v in default_ds.splits.items()}
  assert sizes["train"] > sizes["test"] > 0 and sizes["val"] > 0


def test_cache_reused_without_retraining(default_ds, cache_dir, monkeypatch):
  path = default_ds.metadata["tokenizer_path"]
  mtime = os.stat(path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("the tokenizer was retrained")

  monkeypatch.setattr(text, "train_tokenizer", no_training)
  again = get_dataset(_config(cache_dir=cache_dir))
  assert again.metadata == default_ds.metadata
  for name, arrays in default_ds.splits.items():
    for key, arr in arrays.items():
      np.testing.assert_array_equal(again.splits[name][key], arr)
  assert os.stat(path).st_mtime_ns == mtime
  assert text.load_tokenizer(_config(cache_dir=cache_dir)).get_vocab_size() == VOCAB
  assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


def test_corrupt_cache_is_retrained(tmp_path):
  cfg = _config(data_dir=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"),
                vocab_size=64, seq_len=8)
  _paragraph_files(tmp_path / "corpus", {"a.txt": _sentences(6, 0)})
  path = text.load_text(cfg).metadata["tokenizer_path"]
  good = Path(path).read_text(encoding="utf-8")
  Path(path).write_text("{not json", encoding="utf-8")
  assert text.load_text(cfg).metadata["tokenizer_path"] == path
  assert Path(path).read_text(encoding="utf-8") == good


def test_training_is_deterministic(default_ds):
  # Without pinning the '##x' ids, two trainings give different ids (and, at larger vocab
  # sizes, different vocabularies); compare a fresh training with the cached one.
  again = text.train_tokenizer(text.default_documents(), VOCAB)
  with open(default_ds.metadata["tokenizer_path"], encoding="utf-8") as f:
    assert again.to_str() == f.read()


def test_split_is_deterministic_and_seeded():
  a = text.split_documents(79, 0.1, 0)
  b = text.split_documents(79, 0.1, 0)
  c = text.split_documents(79, 0.1, 1)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert {k: len(v) for k, v in a.items()} == {"train": 64, "val": 7, "test": 8}
  everything = np.concatenate(list(a.values()))
  assert sorted(everything.tolist()) == list(range(79))
  assert not np.array_equal(a["test"], c["test"])
  small = text.split_documents(3, 0.1, 0)
  assert {k: len(v) for k, v in small.items()} == {"train": 1, "val": 1, "test": 1}
  assert len(text.split_documents(2, 0.0, 0)["val"]) == 0


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trips(default_ds, cache_dir):
  tok = text.load_tokenizer(_config(cache_dir=cache_dir))
  sentence = "The  PASS statement\tis a null\n operation and does nothing"
  ids = tok.encode(sentence).ids
  assert ids[0] == default_ds.metadata["cls_id"] and ids[-1] == default_ds.metadata["sep_id"]
  assert default_ds.metadata["unk_id"] not in ids
  assert tok.decode(ids) == " ".join(sentence.lower().split())
  plain = tok.encode(sentence, add_special_tokens=False).ids
  assert not set(plain) & set(default_ds.metadata["special_ids"])


# --- packing ----------------------------------------------------------------------------


def test_pack_sequences_layout():
  out = text.pack_sequences([[10, 11, 12], [20, 21], [30]], 4, cls_id=2, sep_id=3, pad_id=0)
  np.testing.assert_array_equal(out["input_ids"], [[2, 10, 11, 12], [2, 3, 20, 21],
                                                   [2, 3, 30, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 1],
                                                        [1, 1, 1, 0]])
  np.testing.assert_array_equal(out["token_type_ids"], np.zeros((3, 4)))
  empty = text.pack_sequences([], 4, cls_id=2, sep_id=3, pad_id=0)
  assert empty["input_ids"].shape == (0, 4)


def test_packing_invariants(default_ds):
  md = default_ds.metadata
  for name, split in default_ds.splits.items():
    ids, mask = split["input_ids"], split["attention_mask"]
    n = len(ids)
    assert (ids[:, 0] == md["cls_id"]).all()
    assert (ids[:, 1:] != md["cls_id"]).all()
    assert not split["token_type_ids"].any()
    # Padding only at the end of the last row, and exactly where the mask is 0.
    assert mask[:-1].all()
    last = mask[-1]
    assert last[0] == 1 and (np.diff(last) <= 0).all()
    np.testing.assert_array_equal(ids == md["pad_id"], mask == 0)
    assert int(mask.sum()) == md["num_tokens"][name]
    # One [SEP] between neighbouring documents, none from the text itself.
    assert int((ids == md["sep_id"]).sum()) == md["num_documents"][name] - 1
    assert not (ids == md["mask_id"]).any()
    content = md["num_tokens"][name] - n  # Everything but the [CLS] of each row.
    assert n == math.ceil(content / (SEQ_LEN - 1))


# --- data_dir ---------------------------------------------------------------------------


def test_data_dir_of_txt_files(tmp_path):
  corpus = tmp_path / "corpus"
  _paragraph_files(corpus, {"a.txt": _sentences(8, 1), "sub/b.txt": _sentences(7, 2)})
  (corpus / "notes.md").write_text("ignored: not a .txt file", encoding="utf-8")
  docs = text.load_documents(str(corpus))
  assert len(docs) == 15
  assert "ignored" not in " ".join(docs)
  ds = text.load_text(_config(data_dir=str(corpus), cache_dir=str(tmp_path / "c"),
                              vocab_size=128, seq_len=16))
  assert sum(ds.metadata["num_documents"].values()) == 15
  assert ds.metadata["num_documents"]["test"] == 2
  assert ds.num_classes <= 128
  for split in ds.splits.values():
    assert split["input_ids"].shape[1] == 16 and len(split["input_ids"]) >= 1
  # A single file is a corpus too.
  single = text.load_documents(str(corpus / "a.txt"))
  assert len(single) == 8


def test_default_cache_dir_under_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  _paragraph_files(tmp_path / "corpus", {"a.txt": _sentences(5, 3)})
  ds = text.load_text(_config(data_dir=str(tmp_path / "corpus"), vocab_size=64, seq_len=8))
  expected = tmp_path / "home" / ".cache" / "dsjax" / "tokenizers"
  assert os.path.dirname(ds.metadata["tokenizer_path"]) == str(expected)


def test_literal_special_token_text_is_plain_text(tmp_path):
  paragraphs = _sentences(5, 4) + ["a [MASK] and a [SEP] and a [CLS] here."]
  _paragraph_files(tmp_path / "corpus", {"a.txt": paragraphs})
  ds = text.load_text(_config(data_dir=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "c"),
                              vocab_size=64, seq_len=8, val_fraction=0.0))
  assert len(ds.splits["val"]["input_ids"]) == 0
  for name, split in ds.splits.items():
    ids = split["input_ids"]
    assert not (ids == ds.metadata["mask_id"]).any()
    num_docs = ds.metadata["num_documents"][name]
    assert int((ids == ds.metadata["sep_id"]).sum()) == max(0, num_docs - 1)
    assert int((ids == ds.metadata["cls_id"]).sum()) == len(ids)


def test_data_dir_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(DataError, match="nope.*does not exist.*data_dir"):
    text.load_text(_config(data_dir=missing))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no .txt files under.*empty"):
    text.load_text(_config(data_dir=str(tmp_path / "empty")))
  _paragraph_files(tmp_path / "blank", {"a.txt": ["   ", "\n"]})
  with pytest.raises(DataError, match="empty or whitespace only"):
    text.load_text(_config(data_dir=str(tmp_path / "blank")))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x.txt").write_bytes(b"caf\xe9 latin-1 text")
  with pytest.raises(DataError, match="x.txt.*not valid UTF-8"):
    text.load_text(_config(data_dir=str(bad)))


def test_config_errors(tmp_path):
  with pytest.raises(DataError, match="seq_len must be an integer in \\[8, 512\\], got 4"):
    text.load_text(_config(seq_len=4))
  with pytest.raises(DataError, match="seq_len.*got 513"):
    text.load_text(_config(seq_len=513))
  with pytest.raises(DataError, match="vocab_size must be"):
    text.train_tokenizer(["some text"], 3)
  _paragraph_files(tmp_path / "two", {"a.txt": ["one paragraph.", "another one."]})
  with pytest.raises(DataError, match="2 document.*too few"):
    text.load_text(_config(data_dir=str(tmp_path / "two"), cache_dir=str(tmp_path / "c"),
                           vocab_size=32))
  _paragraph_files(tmp_path / "tiny", {"a.txt": ["a b.", "c d.", "e f.", "g h."]})
  with pytest.raises(DataError, match="too few for one full sequence of seq_len=512"):
    text.load_text(_config(data_dir=str(tmp_path / "tiny"), cache_dir=str(tmp_path / "c"),
                           vocab_size=32, seq_len=512))


# --- masking ----------------------------------------------------------------------------

# A tiny vocabulary with special ids scattered through it (the real ones are 0..4), so the
# random replacements must step over specials in the middle of the range. Every masking
# test uses these statics and one batch shape, so jit compiles once for all of them.
M_VOCAB = 12
M_SPECIAL = (0, 3, 7, 11)  # 0 pads, 3 is [MASK], 7 starts each row like [CLS].
M_MASK = 3
M_REGULAR = np.array(sorted(set(range(M_VOCAB)) - set(M_SPECIAL)), np.int32)
M_SHAPE = (64, 128)
_mask_tokens = jax.jit(functools.partial(
    text.mask_tokens, mask_id=M_MASK, vocab_size=M_VOCAB, special_ids=M_SPECIAL))


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random regular ids, a leading special, a few specials inside, padded row ends."""
  rng = np.random.default_rng(seed)
  ids = rng.choice(M_REGULAR, size=M_SHAPE).astype(np.int32)
  ids[:, 0] = 7
  inner = rng.random(M_SHAPE) < 0.05
  ids[inner] = rng.choice(np.array(M_SPECIAL[1:]), size=int(inner.sum()))
  lengths = rng.integers(M_SHAPE[1] // 2, M_SHAPE[1] + 1, size=M_SHAPE[0])
  mask = (np.arange(M_SHAPE[1])[None, :] < lengths[:, None]).astype(np.int32)
  ids[mask == 0] = 0
  return ids, mask


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
  """Whether `count` is within `sigmas` binomial standard deviations of n * p."""
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_statistics():
  ids, mask = _batch()
  masked, labels, weights = map(np.asarray, _mask_tokens(
      jax.random.key(0), ids, mask, mlm_probability=0.15))
  assert masked.dtype == np.int32 and labels.dtype == np.int32
  assert weights.dtype == np.float32 and set(np.unique(weights)) <= {0.0, 1.0}
  np.testing.assert_array_equal(labels, ids)

  selected = weights == 1.0
  candidates = (mask == 1) & ~np.isin(ids, M_SPECIAL)
  assert not (selected & ~candidates).any()  # No special or padding token selected.
  np.testing.assert_array_equal(masked[~selected], ids[~selected])

  n, m = int(candidates.sum()), int(selected.sum())
  assert _within(m, n, 0.15), (m, n)
  became_mask = int((masked[selected] == M_MASK).sum())
  unchanged = int((masked[selected] == ids[selected]).sum())
  random_other = m - became_mask - unchanged
  # A random draw equals the original id with chance 1 / (number of non-special ids).
  same = 1.0 / len(M_REGULAR)
  assert _within(became_mask, m, 0.8), (became_mask, m)
  assert _within(unchanged, m, 0.1 + 0.1 * same), (unchanged, m)
  assert _within(random_other, m, 0.1 * (1 - same)), (random_other, m)
  replaced = masked[selected & (masked != M_MASK)]
  assert np.isin(replaced, M_REGULAR).all()


def test_random_ids_uniform_over_non_special_ids():
  ids, mask = np.full(M_SHAPE, 5, np.int32), np.ones(M_SHAPE, np.int32)
  masked, _, weights = map(np.asarray, _mask_tokens(
      jax.random.key(1), ids, mask, mlm_probability=1.0))
  assert weights.all()
  drawn = masked[masked != M_MASK]
  assert set(np.unique(drawn).tolist()) == set(M_REGULAR.tolist())
  # The 5s are the 10% unchanged plus the random draws that hit 5; the other regular ids
  # come only from random draws, each with probability 0.1 / len(M_REGULAR).
  p = 0.1 / len(M_REGULAR)
  for token in M_REGULAR[M_REGULAR != 5]:
    assert _within(int((masked == token).sum()), ids.size, p), token


def test_mask_tokens_deterministic_given_key():
  ids, mask = _batch(seed=1)
  a = _mask_tokens(jax.random.key(7), ids, mask, mlm_probability=0.15)
  b = _mask_tokens(jax.random.key(7), jnp.asarray(ids), jnp.asarray(mask), mlm_probability=0.15)
  c = _mask_tokens(jax.random.key(8), ids, mask, mlm_probability=0.15)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[2], c[2])
  none = _mask_tokens(jax.random.key(7), ids, mask, mlm_probability=0.0)
  assert not np.asarray(none[2]).any()
  np.testing.assert_array_equal(none[0], ids)


def test_mask_tokens_rejects_bad_probability():
  with pytest.raises(DataError, match="mlm_probability must be in \\[0, 1\\], got 1.5"):
    text.mask_tokens(jax.random.key(0), np.zeros((1, 8), np.int32), np.ones((1, 8), np.int32),
                     mlm_probability=1.5, mask_id=4, vocab_size=16, special_ids=(0, 1, 2, 3, 4))
