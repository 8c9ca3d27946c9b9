"""A CNN on CIFAR-10, read from the standard python batches in `data.data_dir`.

  dsjax-train --config configs/cifar10_cnn.py --config.data.data_dir=~/data/cifar10 \\
      --workdir runs/cifar10
"""

from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-cifar10")
  config.train.steps = 5000
  config.train.batch_size = 128
  config.train.eval_every_steps = 500
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.checkpoint.every_steps = 500
  config.data.val_fraction = 0.1
  if variants.tiny:
    config.model.features = (4, 8)
    config.model.dense_features = 16
    config_lib.make_tiny(config, batch_size=8)
  return config
