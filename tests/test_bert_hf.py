"""The Hugging Face BERT reader: parity with `BertForMaskedLM` on a fixture, checkpoint errors."""

import importlib.util
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsjax.errors import CheckpointError
from dsjax.models import bert, bert_hf

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bert_tiny_hf"  # scripts/make_bert_fixture.py


@pytest.fixture(scope="module")
def hf():
  module, variables = bert.from_pretrained(FIXTURE)
  reference = dict(np.load(FIXTURE / "reference.npz"))
  return jax.jit(module.apply), module, variables, reference


def _apply(apply, variables, reference, **overrides):
  inputs = {key: reference[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
  return np.asarray(apply(variables, **{**inputs, **overrides}))


# ------------------------------------------------------------ Hugging Face parity


def test_from_pretrained_matches_hugging_face_logits(hf):
  apply, _, variables, reference = hf
  logits = _apply(apply, variables, reference)
  assert logits.shape == reference["logits"].shape == (2, 12, 99)
  # Both sides compute in float32; only the summation order of the matmuls, softmax and
  # LayerNorms differs (measured max difference ~1e-7 on logits of size ~0.7). 1e-4 leaves
  # room for other BLAS/XLA versions, while any mapping error (a kernel not transposed, a
  # dropped bias or LayerNorm scale: the fixture randomises all of them) moves logits by
  # 1e-2 or more.
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=0)


def test_from_pretrained_returns_plain_float32_params_in_init_layout(hf):
  _, module, variables, reference = hf
  expected = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), reference["input_ids"]))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in leaves)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, expected)
  assert variables["params"]["encoder"]["layers"]["attention"]["out"]["kernel"].shape == (
      2, 4, 8, 32)


def test_hf_config_to_model_fields():
  fields = bert_hf.hf_config_to_model_fields(json.loads((FIXTURE / "config.json").read_text()))
  assert fields == {"hidden": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 37,
                    "max_position": 64, "dropout_rate": 0.1}


def test_padding_tokens_do_not_change_real_tokens(hf):
  apply, _, variables, reference = hf
  mask = reference["attention_mask"]
  assert mask[1, 7:].sum() == 0 and mask[1, :7].all()  # row 1: 7 tokens, 5 padding
  garbage = reference["input_ids"].copy()
  garbage[1, 7:] = np.arange(5) + 40
  types = reference["token_type_ids"].copy()
  types[1, 7:] = 1
  padded = _apply(apply, variables, reference)
  changed = _apply(apply, variables, reference, input_ids=garbage, token_type_ids=types)
  np.testing.assert_allclose(changed[1, :7], padded[1, :7], atol=1e-6, rtol=0)
  assert np.abs(changed[1, 7:] - padded[1, 7:]).max() > 1e-3  # The padding itself did change.


# ------------------------------------------------------------ checkpoint errors


def _copy_fixture(tmp_path):
  folder = tmp_path / "ckpt"
  shutil.copytree(FIXTURE, folder)
  return folder


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    bert.from_pretrained(tmp_path / "nowhere")
  tmp_path.joinpath("empty").mkdir()
  with pytest.raises(CheckpointError, match="no config.json"):
    bert.from_pretrained(tmp_path / "empty")


def test_missing_tensor_is_named(tmp_path):
  folder = _copy_fixture(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  del tensors["bert.encoder.layer.1.attention.self.key.weight"]
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"no tensor 'bert\.encoder\.layer\.1\.attention"
                                            r"\.self\.key\.weight'"):
    bert.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"intermediate_size": 40}, r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' .* "
                                r"shape \(37, 32\)"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
])
def test_mismatched_config_is_a_clear_error(tmp_path, change, message):
  folder = _copy_fixture(tmp_path)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(CheckpointError, match=message):
    bert.from_pretrained(folder)


def test_old_tensor_spellings_load_the_same_params(hf, tmp_path):
  # Original Google conversions say LayerNorm.gamma/beta and keep the output bias as
  # cls.predictions.decoder.bias (and sometimes a copy of the tied decoder weight).
  _, _, variables, _ = hf
  folder = _copy_fixture(tmp_path)
  renames = {".LayerNorm.weight": ".LayerNorm.gamma", ".LayerNorm.bias": ".LayerNorm.beta",
             "cls.predictions.bias": "cls.predictions.decoder.bias"}
  tensors = {}
  for name, value in load_file(folder / "model.safetensors").items():
    for old, new in renames.items():
      name = name.replace(old, new)
    tensors[name] = value
  tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
  save_file(tensors, folder / "model.safetensors")
  _, renamed = bert.from_pretrained(folder)
  jax.tree.map(np.testing.assert_array_equal, renamed, variables)


def test_pytorch_bin_without_torch_says_to_convert(tmp_path):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed: pytorch_model.bin is readable")
  folder = _copy_fixture(tmp_path)
  (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="convert it to model.safetensors"):
    bert.from_pretrained(folder)


def test_load_pretrained_gives_config_fields_params_and_vocab(hf, tmp_path):
  _, _, variables, _ = hf
  fields, params, vocab = bert_hf.load_pretrained(str(FIXTURE))
  assert fields == bert_hf.hf_config_to_model_fields(
      json.loads((FIXTURE / "config.json").read_text()))
  assert vocab is None  # The fixture has no vocab.txt.
  jax.tree.map(np.testing.assert_array_equal, params, variables["params"])
  folder = _copy_fixture(tmp_path)
  (folder / "vocab.txt").write_text("[PAD]\n")
  assert bert_hf.load_pretrained(str(folder))[2] == str(folder / "vocab.txt")
