"""Wide & Deep on synthetic click logs with a known Bayes ceiling (`ctr-synthetic`).

  dsjax-train --config configs/ctr_wide_deep.py --workdir runs/ctr
  dsjax-train --config configs/ctr_wide_deep.py:tiny --workdir /tmp/t   # 2 steps, for tests

300,000 examples (240,000 train), 1,500 steps of 512 (about 3 epochs): on a 2-core CPU
the training steps take about 35 s and reach ~0.98 of the Bayes AUC in the dataset's
metadata. For Criteo set `--config.data.name=criteo --config.data.data_dir=DIR` and raise
the table sizes (`model.embedding_rows`, `model.wide_rows`).
"""

from __future__ import annotations

from dsjax import config as config_lib
from dsjax.models import wide_deep  # noqa: F401  (registers wide-deep)


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "wide-deep")
  config.data.num_examples = 300_000
  config.train.steps = 1500
  config.train.batch_size = 512
  config.train.eval_every_steps = 250
  config.train.eval_batch_size = 2048
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  config.checkpoint.every_steps = 200
  if variants.tiny:
    config.data.num_examples = 2_000
    config.model.embedding_rows = 64
    config.model.embedding_dim = 4
    config.model.mlp_dims = (16,)
    config.model.wide_rows = 256
    config.train.eval_batch_size = 256
    config_lib.make_tiny(config, batch_size=32)
  return config
