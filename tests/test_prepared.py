"""Tests for `dsjax-data prepare-text` (dsjax.data.prepare, sources, shards) and the
prepared source of data.name=text: once prepared, a corpus gives exactly the Dataset of
today's in-memory path over the same documents."""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from dsjax import cli
from dsjax.data import get_dataset, prepare, shards, sources, text
from dsjax.data.prepare import prepare_text
from dsjax.errors import DataError

VOCAB = 300
SEQ_LEN = 32


def _config(data_dir: str = "", cache_dir: str = "", **overrides) -> ml_collections.ConfigDict:
  fields = dict(name="text", data_dir=str(data_dir), val_fraction=0.1, split_seed=0,
                seq_len=SEQ_LEN, vocab_size=VOCAB, vocab_file="", mlm_probability=0.15,
                cache_dir=str(cache_dir))
  return ml_collections.ConfigDict({**fields, **overrides})


def _assert_same(prepared, in_memory) -> None:
  """Same arrays in every split, same num_classes, same metadata but the tokenizer's path."""
  assert prepared.name == in_memory.name and prepared.num_classes == in_memory.num_classes
  assert set(prepared.splits) == set(in_memory.splits) == {"train", "val", "test"}
  for name, arrays in in_memory.splits.items():
    assert set(prepared.splits[name]) == set(arrays)
    for key, array in arrays.items():
      assert prepared.splits[name][key].dtype == array.dtype
      np.testing.assert_array_equal(prepared.splits[name][key], array, err_msg=f"{name}/{key}")
  drop = lambda metadata: {k: v for k, v in metadata.items() if k != "tokenizer_path"}
  assert drop(prepared.metadata) == drop(in_memory.metadata)


def _write_jsonl(path: Path, documents) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                          for i, d in enumerate(documents)), encoding="utf-8")
  return path


def _files(folder: Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def documents() -> list[str]:
  return text.default_documents()


@pytest.fixture(scope="module")
def small(tmp_path_factory, documents) -> Path:
  """A few topics as one .jsonl: quick to prepare."""
  return _write_jsonl(tmp_path_factory.mktemp("small") / "topics.jsonl", documents[:12])


# --- the same Dataset as in memory --------------------------------------------------------


def test_embedded_corpus_prepared_equals_in_memory(tmp_path, documents):
  """The issue's test: the built-in corpus (one topic per line of a .jsonl), prepared, gives
  the in-memory path's sequences, splits and metadata, for any split settings."""
  source = _write_jsonl(tmp_path / "corpus" / "topics.jsonl", documents)
  manifest = prepare_text(str(source), tmp_path / "prep", vocab_size=VOCAB, progress=False)
  assert manifest["counts"]["documents"] == len(documents)
  assert manifest["token_dtype"] == "uint16"
  for overrides in ({}, {"split_seed": 3, "val_fraction": 0.2, "seq_len": 64}):
    in_memory = get_dataset(_config("", tmp_path / "cache", **overrides))
    prepared = get_dataset(_config(tmp_path / "prep", **overrides))
    _assert_same(prepared, in_memory)
  assert prepared.metadata["tokenizer_path"] == str(tmp_path / "prep" / "tokenizer.json")


def test_txt_folder_in_many_shards_equals_in_memory(tmp_path, documents):
  """Paragraphs of .txt files (CRLF, a BOM, a subfolder), cut into many shards."""
  corpus = tmp_path / "corpus"
  (corpus / "sub").mkdir(parents=True)
  (corpus / "a.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(documents[:20]).encode())
  (corpus / "sub" / "b.txt").write_text("\n \n\n".join(documents[20:40]), encoding="utf-8")
  (corpus / "c.txt").write_text("\n\n".join(documents[40:50]), encoding="utf-8")
  manifest = prepare_text(str(corpus / "**" / "*.txt"), tmp_path / "prep", vocab_size=VOCAB,
                          shard_tokens=5000, progress=False)
  assert manifest["counts"]["shards"] > 5
  assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.txt", "c.txt", "b.txt"]
  in_memory = get_dataset(_config(corpus, tmp_path / "cache"))
  _assert_same(get_dataset(_config(tmp_path / "prep")), in_memory)


def test_streamed_tokenizer_training_equals_the_list(documents):
  """Training streams (a function giving fresh iterators) with the same result, and the
  fast continuation scan finds exactly the characters the word-by-word scan does."""
  subset = documents[:15]
  listed = text.train_tokenizer(subset, VOCAB)
  streamed = text.train_tokenizer(lambda: iter(subset), VOCAB)
  assert streamed.to_str() == listed.to_str()
  tricky = ["ΑΣ ΟΔΟΣ. İstanbul ﬁne a\x01b 中文x é \u0301a ß Ǆ", "x\u0301\u0316y q\u0903r",
            "emoji 😀x😀 tab\there\u00a0nbsp a\u200bb ab\x00cd\ufffdef 日本語テキストabc",
            "naïve café Ⅻ ǅx ﬃ x-y_z'w"]
  scratch = text._untrained_tokenizer()
  for texts in (documents, tricky, tricky[1:2]):
    assert text._ContinuationScan(scratch).run(texts) == text._continuations_exact(
        scratch, texts)


def test_vocabulary_trained_on_a_sample(tmp_path, documents):
  """vocab_sample_mb trains on every k-th document (k from the inputs' size) and encodes
  them all; a sample as big as the corpus is the whole corpus."""
  source = _write_jsonl(tmp_path / "topics.jsonl", documents[:30])
  size = source.stat().st_size / 1e6
  sampled = prepare_text(str(source), tmp_path / "third", vocab_size=VOCAB,
                         vocab_sample_mb=size / 2.5, progress=False)
  assert sampled["settings"]["vocab_every_document"] == 3
  tokenizer = text.train_tokenizer(documents[:30:3], VOCAB)
  assert (tmp_path / "third" / "tokenizer.json").read_text() == tokenizer.to_str()
  assert sampled["counts"]["documents"] == 30
  tokens = np.fromfile(tmp_path / "third" / "shard-00000.tokens.bin", "<u2")
  expected = [e.ids for e in tokenizer.encode_batch(documents[:30], add_special_tokens=False)]
  np.testing.assert_array_equal(tokens, np.concatenate(expected))
  full = prepare_text(str(source), tmp_path / "all", vocab_size=VOCAB,
                      vocab_sample_mb=size, progress=False)
  assert full["settings"]["vocab_every_document"] == 1
  assert (tmp_path / "all" / "tokenizer.json").read_text() == text.train_tokenizer(
      documents[:30], VOCAB).to_str()
  for bad in (-1, "many", True):
    with pytest.raises(DataError, match="--vocab-sample-mb must be a number >= 0"):
      prepare_text(str(source), tmp_path / "bad", vocab_size=VOCAB, vocab_sample_mb=bad,
                   progress=False)


def test_txt_chunks_split_as_the_whole_file(tmp_path, monkeypatch):
  """Paragraphs read chunk by chunk (a chunk boundary inside CRLF, inside a multi-byte
  character, inside a run of blank lines) are those of the whole file."""
  body = "One é paragraph\r\nline two\r\n\r\n  \r\nSecond ünïcode\n\t\n\nthird\r\r4th\n \n"
  path = tmp_path / "a.txt"
  path.write_bytes(b"\xef\xbb\xbf" + (body * 3).encode())
  expected = text.load_documents(str(path))
  for chunk in (1, 2, 3, 5, 7, 64):
    monkeypatch.setattr(sources, "_CHUNK_BYTES", chunk)
    assert list(sources._txt_documents(path)) == expected, chunk


# --- the format -----------------------------------------------------------------------------


def test_uint32_ids_when_the_vocabulary_needs_them(tmp_path):
  """A vocab file past 2**16 tokens gives uint32 shards, and the same ids as in memory."""
  vocab = list(text.SPECIAL_TOKENS) + [f"w{i}" for i in range(70_000)]
  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
  rng = np.random.default_rng(0)
  paragraphs = [" ".join(f"w{i}" for i in rng.integers(0, 70_000, 40)) for _ in range(30)]
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
  manifest = prepare_text(str(tmp_path / "corpus"), tmp_path / "prep",
                          vocab_file=str(vocab_file), progress=False)
  assert manifest["token_dtype"] == "uint32"
  assert manifest["vocabulary"]["source"] == "vocab_file"
  config = dict(vocab_file=str(vocab_file), seq_len=16)
  prepared = get_dataset(_config(tmp_path / "prep", **config))
  _assert_same(prepared, get_dataset(_config(tmp_path / "corpus", **config)))
  assert prepared.splits["train"]["input_ids"].max() >= 1 << 16
  (tmp_path / "other.txt").write_text("\n".join(vocab[:-1]) + "\n", encoding="utf-8")
  with pytest.raises(DataError, match="other.txt is not the vocabulary"):
    get_dataset(_config(tmp_path / "prep", vocab_file=str(tmp_path / "other.txt")))
  with pytest.raises(DataError, match="pretrained vocabulary.*vocab_file"):
    get_dataset(_config(tmp_path / "prep"))
  with pytest.raises(DataError, match=r"other inputs or settings \(vocab_file: .*vocab.txt "
                     r"then, .*other.txt now\)"):
    prepare_text(str(tmp_path / "corpus"), tmp_path / "prep",
                 vocab_file=str(tmp_path / "other.txt"), progress=False)


def test_workers_give_the_same_bytes(tmp_path, small, monkeypatch):
  monkeypatch.setattr(prepare, "_BATCH_DOCUMENTS", 2)  # Many batches, reassembled in order.
  one = prepare_text(str(small), tmp_path / "one", vocab_size=VOCAB, shard_tokens=3000,
                     progress=False)
  two = prepare_text(str(small), tmp_path / "two", vocab_size=VOCAB, shard_tokens=3000,
                     workers=2, progress=False)
  assert one == two and one["counts"]["shards"] > 2
  names = sorted(p.name for p in (tmp_path / "one").iterdir())
  assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
  assert all(filecmp.cmp(tmp_path / "one" / n, tmp_path / "two" / n, shallow=False)
             for n in names)
  assert not [n for n in names if n.endswith(".tmp")]


def test_rerun_skips_finished_shards_and_redoes_damaged_ones(tmp_path, small, monkeypatch):
  prep = tmp_path / "prep"
  prepare_text(str(small), prep, vocab_size=VOCAB, shard_tokens=3000, progress=False)
  before = _files(prep)
  stamps = {p.name: p.stat().st_mtime_ns for p in prep.iterdir()}
  prepare_text(str(small), prep, vocab_size=VOCAB, shard_tokens=3000, progress=False)
  assert {p.name: p.stat().st_mtime_ns for p in prep.iterdir()} == stamps  # Nothing redone.

  (prep / "shard-00001.tokens.bin").unlink()
  with pytest.raises(DataError, match="shard 1 tokens file .*shard-00001.tokens.bin is "
                     "missing; rerun the same dsjax-data prepare-text"):
    get_dataset(_config(prep))
  tokens = prep / "shard-00002.tokens.bin"
  tokens.write_bytes(tokens.read_bytes()[:-6])
  (prep / "shard-00003.json").unlink()  # As if killed before its record was written.
  (prep / "manifest.json").unlink()
  with pytest.raises(DataError, match="unfinished .*rerun the same prepare-text"):
    get_dataset(_config(prep))

  def no_training(*args, **kwargs):
    raise AssertionError("the tokenizer was retrained")

  monkeypatch.setattr(text, "train_tokenizer", no_training)
  monkeypatch.setattr(prepare, "_BATCH_DOCUMENTS", 2)
  prepare_text(str(small), prep, vocab_size=VOCAB, shard_tokens=3000, workers=2,
               progress=False)
  assert _files(prep) == before
  redone = {n for n, t in stamps.items() if (prep / n).stat().st_mtime_ns != t}
  assert {"shard-00000.tokens.bin", "shard-00004.tokens.bin"}.isdisjoint(redone)
  assert {"shard-00001.tokens.bin", "shard-00002.tokens.bin", "shard-00003.json"} <= redone
  get_dataset(_config(prep))

  tokens.write_bytes(tokens.read_bytes()[:-2] + b"\xff\xff")  # Same size, other bytes.
  with pytest.raises(DataError, match="shard-00002.tokens.bin is corrupt.*rerun"):
    get_dataset(_config(prep))


def test_out_inside_the_input_folder_is_no_input(tmp_path, documents):
  corpus = tmp_path / "corpus"
  _write_jsonl(corpus / "topics.jsonl", documents[:5])
  first = prepare_text(str(corpus), corpus / "prep", vocab_size=VOCAB, progress=False)
  again = prepare_text(str(corpus / "**" / "*"), corpus / "prep", vocab_size=VOCAB,
                       progress=False)  # Its vocab.txt is not taken for a corpus file.
  assert again == first and len(first["inputs"]) == 1


def test_refuses_an_out_of_other_inputs_or_settings(tmp_path, small):
  prep = tmp_path / "prep"
  prepare_text(str(small), prep, vocab_size=VOCAB, progress=False)
  with pytest.raises(DataError, match=r"prepared from other inputs or settings \(vocab_size: "
                     r"300 then, 400 now\); remove it"):
    prepare_text(str(small), prep, vocab_size=400, progress=False)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.md").write_text("mine", encoding="utf-8")
  with pytest.raises(DataError, match="busy is not empty and holds no dsjax prepared corpus"):
    prepare_text(str(small), tmp_path / "busy", vocab_size=VOCAB, progress=False)
  with pytest.raises(DataError, match="prepared with --vocab-size 300, but data.vocab_size "
                     "is 512; set --config.data.vocab_size=300"):
    get_dataset(_config(prep, vocab_size=512))


# --- bad inputs: one clear error each, nothing that looks complete --------------------------


def _refused(tmp_path, inputs, match: str, **kwargs) -> None:
  out = tmp_path / "out"
  with pytest.raises(DataError, match=match):
    prepare_text(inputs, out, progress=False, **({"vocab_size": VOCAB} | kwargs))
  assert not (out / "manifest.json").exists() and not list(out.glob("shard-*"))


def test_bad_inputs_are_refused_with_the_file_named(tmp_path):
  blank = tmp_path / "blank.txt"
  blank.write_text(" \n\n\t\n", encoding="utf-8")
  _refused(tmp_path, str(blank), "blank.txt.* hold no text")
  marks = _write_jsonl(tmp_path / "marks.jsonl", ["\u0301\u0302", ""])
  _refused(tmp_path, str(marks), "marks.jsonl.* hold 2 documents and none has a token")
  latin = tmp_path / "latin.txt"
  latin.write_bytes(b"hello there\n\ncaf\xe9 au lait")
  _refused(tmp_path, str(latin), r"latin.txt is not valid UTF-8 \(invalid continuation byte "
           r"at byte 16\)")
  lines = tmp_path / "lines.jsonl"
  lines.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  _refused(tmp_path, str(lines), "lines.jsonl is not valid UTF-8 .* at byte 28")
  lines.write_text('{"text": "fine"}\n\n{"body": "no text"}\n', encoding="utf-8")
  _refused(tmp_path, str(lines), r"lines.jsonl:3 has no string field 'text'")
  lines.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
  _refused(tmp_path, str(lines), r"lines.jsonl:2 is not JSON")
  _refused(tmp_path, str(tmp_path / "nowhere" / "**" / "*.txt"), "matches no file")
  (tmp_path / "notes.md").write_text("hi", encoding="utf-8")
  _refused(tmp_path, str(tmp_path / "notes.md"), "notes.md, which is not a .txt")
  _refused(tmp_path, [str(blank), str(tmp_path / "*.txt")], "blank.txt is matched by more")
  _refused(tmp_path, str(blank), "vocab_file .*missing.txt does not exist",
           vocab_size=None, vocab_file=str(tmp_path / "missing.txt"))
  # After the bad file is fixed, the same --out is taken up again (no shard was written).
  latin.write_text("hello there\n\ncafé au lait", encoding="utf-8")
  manifest = prepare_text(str(latin), tmp_path / "out", vocab_size=VOCAB, progress=False)
  assert manifest["counts"]["documents"] == 2


def test_manifest_of_another_version_is_refused(tmp_path, small):
  prep = tmp_path / "prep"
  prepare_text(str(small), prep, vocab_size=VOCAB, progress=False)
  manifest = json.loads((prep / "manifest.json").read_text())
  (prep / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
  with pytest.raises(DataError, match="format version 99, and this dsjax reads version 1"):
    get_dataset(_config(prep))
  (prep / "manifest.json").write_text('{"format')
  with pytest.raises(DataError, match="cannot read .*manifest.json"):
    shards.open_prepared(prep)


def test_parquet_and_datasets_folders(tmp_path, small, monkeypatch):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  docs = [json.loads(line)["text"] for line in small.read_text(encoding="utf-8").splitlines()]
  table = pa.table({"id": list(range(len(docs))), "text": docs})
  pq.write_table(table, tmp_path / "docs.parquet", row_group_size=5)
  folder = tmp_path / "saved"  # The layout of datasets.Dataset.save_to_disk.
  folder.mkdir()
  with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=4)
  (folder / "state.json").write_text(json.dumps(
      {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
  reference = prepare_text(str(small), tmp_path / "ref", vocab_size=VOCAB, progress=False)
  for source in (tmp_path / "docs.parquet", folder):
    manifest = prepare_text(str(source), tmp_path / f"prep-{source.stem}", vocab_size=VOCAB,
                            progress=False)
    assert manifest["shards"] == reference["shards"], source
  pq.write_table(pa.table({"body": docs}), tmp_path / "nocol.parquet")
  _refused(tmp_path, str(tmp_path / "nocol.parquet"), "nocol.parquet has no column 'text'")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # As if it were not installed.
  _refused(tmp_path, str(tmp_path / "docs.parquet"), r"needs pyarrow.*pip install 'dsjax\[data\]'")


# --- the command line -----------------------------------------------------------------------


def test_data_command(tmp_path, small, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.data_main(["dsjax-data", "--help"])
  assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: dsjax-data")
  missing = str(tmp_path / "nope" / "**" / "*.txt")
  for argv, expected in (
      (["prepare-text", "--input", missing, "--out", str(tmp_path / "p")], "matches no file"),
      (["prepare-text", "--out", str(tmp_path / "p")], "--input is required"),
      (["prepare-text", "--input", str(small), "extra.txt", "--out", "p"], "quote the --input"),
      (["prepare-text", "--input", str(small), "--out", "p", "--vocab-size", "300",
        "--vocab-file", "v.txt"], "not both"),
      (["prepare-text", "--input", str(small), "--out", "p", "--vocab-sample-mb", "5",
        "--vocab-file", "v.txt"], "--vocab-file trains none"),
      (["--input", str(small)], "give a command")):
    with pytest.raises(SystemExit) as exit_:
      cli.data_main(["dsjax-data", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dsjax-data: error: ") and expected in err
  prep = tmp_path / "prep"
  cli.data_main(["dsjax-data", "prepare-text", "--input", str(small), "--out", str(prep),
                 "--vocab-size", "300", "--workers", "1", "--vocab-sample-mb", "0"])
  out = capsys.readouterr().out
  assert "MB/s of text" in out and f"--config.data.data_dir={prep}" in out
  assert get_dataset(_config(prep)).num_classes == VOCAB
