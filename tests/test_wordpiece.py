"""Tests for dsjax.data.wordpiece: the fast encoder gives the tokenizer's own ids."""

from __future__ import annotations

import random

import pytest

from dsjax.data import text, wordpiece

VOCAB = 400

# Letters of several scripts and cases, digits, ASCII and Unicode punctuation, every kind
# of whitespace and control character, CJK (spaced apart), accents precomposed and
# combining (NFD reorders those: the fallback), symbols, a lone surrogate's neighbours.
_ALPHABET = (
    [chr(c) for c in range(0x00, 0x250)] + [chr(c) for c in range(0x300, 0x3ff)]
    + [chr(c) for c in range(0x400, 0x460)] + [chr(c) for c in range(0x2000, 0x2070)]
    + [chr(c) for c in range(0x3000, 0x3010)] + [chr(c) for c in range(0x4e00, 0x4e10)]
    + [chr(c) for c in range(0x890, 0x8a0)] + [chr(c) for c in range(0x900, 0x940)]
    + list("\u0130\u1e9e\ufb01\ufffd\uffff\U0001f600\u00ad\u200b\ufeff"))


@pytest.fixture(scope="module")
def tokenizer():
  return text.train_tokenizer(text.default_documents()[:40], VOCAB)


def _reference(tokenizer, documents):
  tokenizer.encode_special_tokens = True
  return [e.ids for e in tokenizer.encode_batch(documents, add_special_tokens=False)]


def test_embedded_corpus_same_ids(tokenizer):
  documents = text.default_documents()
  assert wordpiece.FastEncoder(tokenizer).encode(documents) == _reference(tokenizer, documents)


def test_random_text_same_ids(tokenizer):
  """Random strings over many scripts: mostly plain words (as a corpus is) with every kind
  of character between them; any difference would show within a few hundred strings."""
  rng = random.Random(0)
  documents = []
  for _ in range(3000):
    size = rng.randint(0, 60)
    documents.append("".join(rng.choice(_ALPHABET) if rng.random() < 0.3
                             else rng.choice("the cAt, Sat. on [MASK] 42 ") for _ in range(size)))
  documents += ["x" * 100, "x" * 101, "[MASK] [CLS]x[SEP] [PAD]", "Cafe\u0301 caf\u00e9",
                "A\u0301\u0323b \u0130stanbul", "\u03a3\u039f\u03a3 \u03c3\u03bf\u03c2", "",
                " \t\n ", "\x00\x01\x7f"]
  encoder = wordpiece.FastEncoder(tokenizer)
  assert encoder.encode(documents) == _reference(tokenizer, documents)
  assert encoder.encode(documents[::-1]) == _reference(tokenizer, documents[::-1])


def test_combining_marks_take_the_tokenizer(tokenizer):
  """A character whose normalized form keeps a combining mark (this Arabic mark is not one
  the tokenizer strips) sends its document to the tokenizer; plain text never goes there."""
  encoder = wordpiece.FastEncoder(tokenizer)
  marked = "word\u0898s and \u0915\u093f\u0901 more"
  assert encoder.table[0x898] == wordpiece._FALLBACK
  assert all(encoder.table[ord(c)] != wordpiece._FALLBACK for c in "plain words, here.")
  documents = ["plain words, here.", marked, "plain"]
  assert encoder.encode(documents) == _reference(tokenizer, documents)
