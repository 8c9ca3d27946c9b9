"""Writes tests/fixtures/bert_tiny_hf/: a tiny random Hugging Face BERT and its logits.

The fixture lets `tests/test_bert_hf.py` check `dsjax.models.bert.from_pretrained` against
`transformers.BertForMaskedLM` without torch or transformers in the project environment.
It holds `config.json` + `model.safetensors` (as `save_pretrained` writes them) and
`reference.npz` with fixed `input_ids`, `attention_mask` (padding in row 1),
`token_type_ids` (1s in row 0) and the float32 eval-mode logits.

Regenerate it (rarely: only if the fixture's shapes or inputs must change) in a throwaway
virtual environment, never the project's:

  python -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
  /tmp/hfvenv/bin/python scripts/make_bert_fixture.py

Weights are random (seed 0), so the output is reproducible only up to the torch version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bert_tiny_hf"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=OUT, help="fixture folder")
  args = parser.parse_args()

  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
      hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
      layer_norm_eps=1e-12, attn_implementation="eager")
  model = transformers.BertForMaskedLM(config).eval()
  # The default init leaves biases at zero and LayerNorms at identity, which would not
  # catch a swapped or dropped bias/scale in the conversion: randomise every tensor.
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "LayerNorm.weight" in name:
        tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
      elif name.endswith("bias"):
        tensor.copy_(0.1 * torch.randn_like(tensor))
  args.out.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(args.out, safe_serialization=True)

  rng = np.random.default_rng(0)
  input_ids = rng.integers(1, config.vocab_size, size=(2, 12)).astype(np.int32)
  attention_mask = np.ones_like(input_ids)
  attention_mask[1, 7:] = 0
  input_ids[1, 7:] = 0  # [PAD]
  token_type_ids = np.zeros_like(input_ids)
  token_type_ids[0, 6:] = 1
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(input_ids).long(),
                   attention_mask=torch.from_numpy(attention_mask).long(),
                   token_type_ids=torch.from_numpy(token_type_ids).long()).logits
  np.savez_compressed(args.out / "reference.npz", input_ids=input_ids,
                      attention_mask=attention_mask, token_type_ids=token_type_ids,
                      logits=logits.float().numpy())
  print(f"wrote {args.out} (torch {torch.__version__}, transformers {transformers.__version__})")


if __name__ == "__main__":
  main()
