"""DNAS on CIFAR-10 (a GPU-sized search), data from `--config.data.data_dir`.

  dsjax-search --config configs/cifar10_dnas.py --config.data.data_dir=~/data/cifar10 \\
      --workdir runs/cifar10-dnas
  dsjax-train --config configs/cifar10_dnas.py --config.data.data_dir=~/data/cifar10 \\
      --architecture runs/cifar10-dnas/architecture.json --workdir runs/cifar10-retrain

The backbone is the seed's example: 16 to 128 channels, 3 to 8 blocks, kernels 3/5/7.
"""

from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "dnas-cifar10")
  backbone = config.model.backbone
  backbone.min_channels, backbone.max_channels, backbone.channel_choices = 16, 128, 4
  backbone.depth_range = (3, 8)
  backbone.kernel_sizes = (3, 5, 7)
  backbone.stem_channels = 32
  backbone.strides = (1, 2, 2)
  backbone.batch_norm = True  # DARTS' ops are conv + BatchNorm; deep stacks need it.
  config.model.relaxation = "gumbel"

  config.search.steps = 20000
  config.search.warmup_steps = 5000
  config.search.order = 2
  config.search.aux_skip = 1.0  # DARTS-: decaying auxiliary skip against collapse.
  config.resource.target_params = 3.3e6
  config.resource.penalty_weight = 0.1

  config.train.steps = 50000
  config.train.batch_size = 96
  config.train.eval_every_steps = 2500
  config.checkpoint.every_steps = 2500
  config.optimizer.name = "momentum"
  config.optimizer.learning_rate = 0.025
  config.optimizer.weight_decay = 3e-4
  config.optimizer.warmup_steps = 500
  if variants.tiny:
    backbone.min_channels, backbone.max_channels, backbone.channel_choices = 4, 8, 2
    backbone.depth_range = (1, 2)
    backbone.kernel_sizes = (3,)
    backbone.stem_channels = 4
    backbone.strides = (2,)
    config.search.steps, config.search.warmup_steps, config.search.order = 2, 0, 1
    config.search.aux_skip = 0.0
    config_lib.make_tiny(config, batch_size=8)
  return config
