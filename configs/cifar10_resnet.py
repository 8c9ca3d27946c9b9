"""ResNet-20 on CIFAR-10 (He et al., 2016), read from the standard python batches.

Momentum SGD at 0.1 with a cosine decay, weight decay 5e-4, batches of 128, random crop
and flip augmentation; 64k steps (about 180 epochs of the 45k training images left after
the validation split), the paper's iteration count.

  dsjax-train --config configs/cifar10_resnet.py --config.data.data_dir=~/data/cifar10 \\
      --workdir runs/cifar10_resnet
"""

from __future__ import annotations

from dsjax import config as config_lib
from dsjax.models import resnet  # noqa: F401  (registers resnet20)


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "resnet20")
  config.data.augment = True
  config.data.val_fraction = 0.1
  config.train.steps = 64_000
  config.train.batch_size = 128
  config.train.eval_every_steps = 2000
  config.optimizer.name = "momentum"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 5e-4
  config.checkpoint.every_steps = 2000
  if variants.tiny:
    config.model.stage_sizes = (1, 1, 1)
    config.model.widths = (4, 8, 16)
    config_lib.make_tiny(config, batch_size=8)
  return config
