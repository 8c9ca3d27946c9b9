"""CenterNet with a DNAS backbone on digits-detection: search it, then retrain the result.

The backbone is configured as the seed's detection example (`model.backbone.type: DNAS`,
min_channels 16, max_channels 128, depth_range [3, 8]): eight blocks, the first two
striding to the detector's stride 4 and the last five optional, each choosing a 3x3
convolution or identity (the strided two: a convolution) and a width of 16 to 128
channels; the depth gates skip blocks. The search minimises
the CenterNet loss on validation batches (the other half of the training split) under a
FLOPs budget per image for the backbone.

  dsjax-search --config configs/det_digits_dnas.py --workdir runs/det_dnas
  dsjax-train --config configs/det_digits_dnas.py \\
      --architecture runs/det_dnas/architecture.json --workdir runs/det_dnas_retrain

The hand-designed baseline is configs/det_digits.py (the same head and training recipe).
"""

from __future__ import annotations

from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "centernet-dnas")
  backbone = config.model.backbone
  backbone.min_channels, backbone.max_channels, backbone.channel_choices = 16, 128, 4
  backbone.depth_range = (3, 8)
  # Plain 3x3 convolutions and identity: XLA:CPU runs depthwise convolutions slowly (a
  # search step with separable ops took longer than with full convolutions), and the
  # budget is a 15-minute search on 2 cores. No zero op: in this chain of blocks a zero
  # block would cut the image off (a search with it drove the first strided block to
  # zero, p = 0.92, with the FLOPs penalty); skipping is the depth gates' job.
  backbone.ops = ("conv", "identity")
  backbone.kernel_sizes = (3,)
  backbone.stem_channels = 16
  backbone.strides = (2, 2)  # Blocks 0 and 1 bring the canvas to stride 4.
  backbone.batch_norm = True
  backbone.head = "none"  # The detector's head is its own.
  config.model.relaxation = "gumbel"
  config.model.head_channels = 64

  config.search.steps = 500  # About 10 minutes on 2 cores.
  config.search.warmup_steps = 125
  config.search.arch_learning_rate = 3e-2
  config.search.temperature_start, config.search.temperature_end = 2.0, 0.5
  config.resource.target_flops = 1.5e7  # Backbone FLOPs per 48x48 canvas (ResNet: 54M).
  config.resource.penalty_weight = 0.1

  # Retraining the derived backbone (dsjax-train): the recipe of configs/det_digits.py.
  config.data.augment = True
  config.train.steps = 3000
  config.train.batch_size = 32
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 500
  config.train.eval_batch_size = 128
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 1e-4
  config.checkpoint.every_steps = 500
  if variants.tiny:
    config.data.num_examples = 32
    backbone.min_channels, backbone.max_channels, backbone.channel_choices = 4, 8, 2
    backbone.depth_range = (2, 3)
    backbone.stem_channels = 4
    config.model.head_channels = 8
    config.search.steps, config.search.warmup_steps = 2, 0
    config_lib.make_tiny(config, batch_size=8)
  return config
