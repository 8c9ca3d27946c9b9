"""BERT-tiny (or BERT-mini) masked-LM pretraining on the embedded text corpus.

  dsjax-train --config configs/bert_tiny.py --workdir runs/bert-tiny
  dsjax-train --config configs/bert_tiny.py:model=bert-mini --workdir runs/bert-mini
  dsjax-train --config configs/bert_tiny.py:tiny --workdir /tmp/t   # 2 steps, for tests
"""

import dsjax.models.bert  # noqa: F401  (registers the bert-* models)
from dsjax import config as config_lib
from dsjax.errors import ConfigError

MODELS = ("bert-tiny", "bert-mini")


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`, `model=NAME`)."""
  variants = config_lib.parse_arg(arg, tiny=False, model="bert-tiny")
  if variants.model not in MODELS:
    raise ConfigError(f"configs/bert_tiny.py trains {' or '.join(MODELS)}, not "
                      f"{variants.model!r}; use configs/bert_base.py for bert-base")
  config = config_lib.with_model_defaults(config_lib.base_config(), variants.model)
  config.data.name = "text"
  config.data.seq_len = 64
  config.data.vocab_size = 4096
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.eval_every_steps = 100
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.01  # BERT's.
  config.optimizer.grad_clip_norm = 1.0
  config.checkpoint.every_steps = 100
  if variants.tiny:
    config.model.hidden, config.model.num_heads, config.model.mlp_dim = 32, 2, 64
    config.model.max_position = 32
    config.data.seq_len = 32
    config.data.vocab_size = 512
    config_lib.make_tiny(config, batch_size=8)
  return config
