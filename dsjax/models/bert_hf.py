"""A reader of Hugging Face BERT checkpoints (`save_pretrained` folders) for `dsjax.models.bert`.

It maps `config.json` to the `Bert` module's fields and the tensors of `BertForMaskedLM`
to its parameter tree (encoder layers stacked on axis 0, as the module's `nn.scan` keeps
them), checking every name and shape. It knows the layout, not the module:
`dsjax.models.bert.from_pretrained` builds the module from what this reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.errors import CheckpointError

# The bert models' config fields a checkpoint fixes, and their names in `config.json`.
_CONFIG_FIELDS = {"hidden": "hidden_size", "num_layers": "num_hidden_layers",
                  "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size",
                  "max_position": "max_position_embeddings",
                  "dropout_rate": "hidden_dropout_prob"}

def hf_config_to_model_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
  """Maps a Hugging Face BERT `config.json` to the bert models' config fields.

  Args:
    hf_config: the parsed `config.json`.

  Returns:
    {hidden, num_layers, num_heads, mlp_dim, max_position, dropout_rate}; the vocabulary
    size (`hf_config["vocab_size"]`) is the data's business and not included. The dropout
    rate is `hidden_dropout_prob`; the attention dropout follows it unless the run's config
    sets `attention_dropout_rate` (BERT's attention dropout is the same 0.1).

  Raises:
    CheckpointError: a field is missing, or the config asks for something `Bert` does
      not compute (another activation, relative positions, a decoder, untied weights).
  """
  unsupported = {
      "model_type": (hf_config.get("model_type", "bert"), "bert"),
      "hidden_act": (hf_config.get("hidden_act", "gelu"), "gelu"),
      "position_embedding_type": (hf_config.get("position_embedding_type", "absolute"),
                                  "absolute"),
      "is_decoder": (hf_config.get("is_decoder", False), False),
      "add_cross_attention": (hf_config.get("add_cross_attention", False), False),
      "tie_word_embeddings": (hf_config.get("tie_word_embeddings", True), True),
  }
  for key, (value, supported) in unsupported.items():
    if value != supported:
      raise CheckpointError(f"config.json has {key}={value!r}, but dsjax's Bert supports only "
                            f"{key}={supported!r}; use a standard BERT checkpoint")
  missing = [key for key in (*_CONFIG_FIELDS.values(), "vocab_size") if key not in hf_config]
  if missing:
    raise CheckpointError(f"config.json lacks {', '.join(missing)}; it is not a BERT config "
                          "(re-export it with transformers' save_pretrained)")
  return {field: hf_config[key] for field, key in _CONFIG_FIELDS.items()}


def _read_tensors(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
  safetensors_file, torch_file = folder / "model.safetensors", folder / "pytorch_model.bin"
  if safetensors_file.is_file():
    try:
      from safetensors.numpy import load_file
    except ImportError as error:
      raise CheckpointError(f"reading {safetensors_file} needs the safetensors package: "
                            "pip install safetensors") from error
    try:
      return safetensors_file, load_file(safetensors_file)
    except Exception as error:  # safetensors raises its own and OS errors alike.
      raise CheckpointError(f"cannot read {safetensors_file} ({error}); the file is corrupt "
                            "or not float data: re-export it with save_pretrained") from error
  if torch_file.is_file():
    try:
      import torch
    except ImportError as error:
      raise CheckpointError(f"{torch_file} is a PyTorch pickle and torch is not installed; "
                            "convert it to model.safetensors (save_pretrained(..., "
                            "safe_serialization=True)) where torch is available") from error
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    return torch_file, {name: tensor.float().numpy() for name, tensor in state.items()}
  raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin; "
                        "pass the folder that save_pretrained wrote")


def _convert(tensors: dict[str, np.ndarray], source: Path,
             fields: dict[str, Any]) -> dict[str, Any]:
  """Maps Hugging Face tensors to Bert's parameter tree, checking names and shapes."""
  hidden, heads, mlp = fields["hidden"], fields["num_heads"], fields["mlp_dim"]
  head_dim = hidden // heads
  prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""

  def take(*names: str, shape: tuple[int, ...]) -> np.ndarray:
    # `names` are spellings of one tensor (old checkpoints say LayerNorm.gamma/beta).
    for name in names:
      if name in tensors:
        value = np.asarray(tensors[name], dtype=np.float32)
        if value.shape != shape:
          raise CheckpointError(f"tensor {name!r} in {source} has shape {value.shape}, but "
                                f"config.json implies {shape}: the config and weights do not "
                                "belong together")
        return value
    raise CheckpointError(f"{source} has no tensor {names[0]!r}; the checkpoint is incomplete "
                          "or not a BertForMaskedLM (re-export it with save_pretrained)")

  def dense(name: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
    return {"kernel": take(f"{name}.weight", shape=(n_out, n_in)).T,
            "bias": take(f"{name}.bias", shape=(n_out,))}

  def norm(name: str) -> dict[str, np.ndarray]:
    return {"scale": take(f"{name}.weight", f"{name}.gamma", shape=(hidden,)),
            "bias": take(f"{name}.bias", f"{name}.beta", shape=(hidden,))}

  def layer(i: int) -> dict[str, Any]:
    base = f"{prefix}encoder.layer.{i}."
    attention = {}
    for name in ("query", "key", "value"):
      projection = dense(f"{base}attention.self.{name}", hidden, hidden)
      attention[name] = {"kernel": projection["kernel"].reshape(hidden, heads, head_dim),
                         "bias": projection["bias"].reshape(heads, head_dim)}
    out = dense(f"{base}attention.output.dense", hidden, hidden)
    attention["out"] = {"kernel": out["kernel"].reshape(heads, head_dim, hidden),
                        "bias": out["bias"]}
    return {"attention": attention, "attention_norm": norm(f"{base}attention.output.LayerNorm"),
            "mlp_in": dense(f"{base}intermediate.dense", hidden, mlp),
            "mlp_out": dense(f"{base}output.dense", mlp, hidden),
            "mlp_norm": norm(f"{base}output.LayerNorm")}

  embeddings = f"{prefix}embeddings."
  word = take(f"{embeddings}word_embeddings.weight", shape=(fields["vocab_size"], hidden))
  decoder = tensors.get("cls.predictions.decoder.weight")
  if decoder is not None and not np.array_equal(np.asarray(decoder, np.float32), word):
    raise CheckpointError(f"tensor 'cls.predictions.decoder.weight' in {source} differs from "
                          "the word embeddings; dsjax's Bert ties them, so untied checkpoints "
                          "are not supported")
  layers = [layer(i) for i in range(fields["num_layers"])]
  params = {
      "word_embeddings": {"embedding": word},
      "position_embeddings": {"embedding": take(f"{embeddings}position_embeddings.weight",
                                                shape=(fields["max_position"], hidden))},
      "token_type_embeddings": {"embedding": take(f"{embeddings}token_type_embeddings.weight",
                                                  shape=(fields["type_vocab_size"], hidden))},
      "embeddings_norm": norm(f"{embeddings}LayerNorm"),
      "encoder": {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)},
      "mlm_dense": dense("cls.predictions.transform.dense", hidden, hidden),
      "mlm_norm": norm("cls.predictions.transform.LayerNorm"),
      "mlm_bias": take("cls.predictions.bias", "cls.predictions.decoder.bias",
                       shape=(fields["vocab_size"],)),
  }
  return jax.tree.map(jnp.asarray, params)


def read_pretrained(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a Hugging Face BERT checkpoint folder (`save_pretrained` output).

  Args:
    path: folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`,
      which needs torch).

  Returns:
    `(fields, params)`: `fields` are the `dsjax.models.bert.Bert` attributes the
    checkpoint fixes (sizes, dropout, `layer_norm_eps`, `type_vocab_size`, `vocab_size`);
    `params` is Bert's parameter tree of plain (unboxed) float32 arrays, layers stacked
    on axis 0.

  Raises:
    CheckpointError: the folder or a file is missing, the config is unsupported, or a
      tensor is missing or has the wrong shape; the message names it.
  """
  folder = Path(path).expanduser()
  if not folder.is_dir():
    raise CheckpointError(f"BERT checkpoint folder {folder} does not exist; pass the folder "
                          "holding config.json and model.safetensors")
  hf_config = _read_config(folder)
  fields = hf_config_to_model_fields(hf_config)
  if fields["hidden"] % fields["num_heads"]:
    raise CheckpointError(f"config.json has hidden_size={fields['hidden']}, not divisible by "
                          f"num_attention_heads={fields['num_heads']}")
  fields = {"vocab_size": hf_config["vocab_size"], **fields,
            "type_vocab_size": hf_config.get("type_vocab_size", 2),
            "layer_norm_eps": hf_config.get("layer_norm_eps", 1e-12)}
  source, tensors = _read_tensors(folder)
  return fields, _convert(tensors, source, fields)


def load_pretrained(path: str) -> tuple[dict[str, Any], Any, str | None]:
  """`--init-from` (the registry's `load_pretrained`): a Hugging Face BERT folder's
  model config fields (`hf_config_to_model_fields`), params and vocab.txt (or None)."""
  fields, params = read_pretrained(path)
  vocab = Path(path).expanduser() / "vocab.txt"
  return ({field: fields[field] for field in _CONFIG_FIELDS}, params,
          str(vocab) if vocab.is_file() else None)


def _read_config(folder: Path) -> dict[str, Any]:
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{folder} has no config.json; pass the folder that "
                          "save_pretrained wrote")
  try:
    return json.loads(config_file.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{config_file} is not valid JSON ({error}); re-export the "
                          "checkpoint") from error
