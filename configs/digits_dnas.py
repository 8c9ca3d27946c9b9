"""DNAS on the digits: search a small CNN under a FLOPs budget, then retrain it.

  dsjax-search --config configs/digits_dnas.py --workdir runs/dnas        # ~3 min on CPU
  dsjax-train --config configs/digits_dnas.py --architecture runs/dnas/architecture.json \\
      --workdir runs/dnas-retrain

The hand-designed baseline on the same data is configs/digits_cnn.py. The search space
follows the seed's example (`model.backbone.type: DNAS` with channel and depth ranges),
scaled to 8x8 images.
"""

from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "dnas-digits")
  backbone = config.model.backbone
  backbone.min_channels, backbone.max_channels, backbone.channel_choices = 8, 24, 3
  backbone.depth_range = (2, 4)
  backbone.kernel_sizes = (3, 5)
  backbone.stem_channels = 16
  backbone.strides = (1, 2)  # Block 1 halves the resolution; blocks 2-3 are optional.
  # Gumbel-softmax: with a plain softmax mixture the weights rescale to undo the mixing,
  # and a resource penalty then drives the search to parameter-free ops.
  config.model.relaxation = "gumbel"

  config.search.steps = 800
  config.search.warmup_steps = 200
  config.search.arch_learning_rate = 3e-2
  config.search.temperature_start, config.search.temperature_end = 2.0, 0.5
  config.resource.target_flops = 3e5
  config.resource.penalty_weight = 0.1

  # Retraining the derived network (dsjax-train) and the search's weight optimizer.
  config.train.steps = 1000
  config.train.batch_size = 64
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 250
  config.checkpoint.every_steps = 250
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 20
  if variants.tiny:
    backbone.min_channels, backbone.max_channels, backbone.channel_choices = 4, 8, 2
    backbone.depth_range = (1, 2)
    backbone.kernel_sizes = (3,)
    backbone.stem_channels = 4
    backbone.strides = (1,)
    config.search.steps, config.search.warmup_steps = 2, 0
    config_lib.make_tiny(config, batch_size=16)
  return config
