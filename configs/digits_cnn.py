"""A small CNN on scikit-learn's handwritten digits (8x8, 10 classes), the default run.

  dsjax-train --config configs/digits_cnn.py --workdir runs/digits
  dsjax-train --config configs/digits_cnn.py:tiny --workdir /tmp/t   # 2 steps, for tests
"""

from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.train.steps = 400
  config.train.batch_size = 64
  config.train.eval_every_steps = 100
  config.optimizer.learning_rate = 3e-3
  # Constant after warm-up, so `--steps 300` then `--steps 600` on one workdir ends where a
  # fresh 600-step run does.
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 20
  config.checkpoint.every_steps = 100
  if variants.tiny:
    config.model.features = (4, 8)
    config.model.dense_features = 16
    config_lib.make_tiny(config, batch_size=16)
  return config
