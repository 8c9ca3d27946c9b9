"""BERT-base masked-LM pretraining on the embedded text corpus, in mixed precision.

  dsjax-train --config configs/bert_base.py --workdir runs/bert-base         # a GPU run
  dsjax-train --config configs/bert_base.py:tiny --workdir /tmp/t   # 2 steps, for tests

A global batch of 1024 sequences of 128 tokens, as 8 accumulated micro-batches of 128.
"""

import dsjax.models.bert  # noqa: F401  (registers the bert-* models)
from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-base")
  config.data.name = "text"
  config.data.seq_len = 128
  config.data.vocab_size = 8192
  config.train.steps = 2000
  config.train.batch_size = 1024
  config.train.grad_accum_steps = 8
  config.train.eval_every_steps = 500
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.01  # BERT's.
  config.optimizer.grad_clip_norm = 1.0
  config.precision.policy = "mixed"
  config.checkpoint.every_steps = 500
  if variants.tiny:
    config.model.hidden, config.model.num_layers = 32, 2
    config.model.num_heads, config.model.mlp_dim = 2, 64
    config.model.max_position = 32
    config.data.seq_len = 32
    config.data.vocab_size = 512
    config_lib.make_tiny(config, batch_size=8)
    config.train.grad_accum_steps = 2  # Keeps the accumulation path exercised.
  return config
