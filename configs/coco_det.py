"""CenterNet-ResNet on a COCO-format dataset read from `--config.data.data_dir`.

The standard layout: `DIR/annotations/instances_<split>.json` with the images under
`DIR/<split>/` (`train`, `val`, optionally `test`, or `train2017`, `val2017`), JPEG or
PNG. Images are letterboxed to 512x512 with their boxes, flipped and zoomed in training;
AP comes from pycocotools against the split's own annotation file (crowd boxes ignored
as COCO does).

  dsjax-train --config configs/coco_det.py --config.data.data_dir=~/data/coco \\
      --workdir runs/coco_det
  dsjax-train --config configs/coco_det.py:backbone=dnas ...   # a searched backbone

`backbone=dnas` swaps in the DNAS detector of configs/det_digits_dnas.py (search it with
dsjax-search on this config, then retrain with --architecture).
"""

from __future__ import annotations

from dsjax import config as config_lib
from dsjax.errors import ConfigError


def get_config(arg: str | None = None):
  """Returns the config; `arg`: `backbone=resnet|dnas`, `tiny` (comma-separated)."""
  variants = config_lib.parse_arg(arg, tiny=False, backbone="resnet")
  if variants.backbone not in ("resnet", "dnas"):
    raise ConfigError(
        f"coco_det.py: backbone must be resnet or dnas, got {variants.backbone!r}")
  model = "centernet-resnet" if variants.backbone == "resnet" else "centernet-dnas"
  config = config_lib.with_model_defaults(config_lib.base_config(), model)
  config.data.name = "coco"
  config.data.image_size = 512
  config.data.max_boxes = 100
  config.data.augment = True
  if variants.backbone == "resnet":
    config.model.backbone.stage_sizes = (2, 2, 2)
    config.model.backbone.widths = (64, 128, 256)
  else:
    backbone = config.model.backbone
    backbone.min_channels, backbone.max_channels, backbone.channel_choices = 32, 256, 4
    backbone.depth_range = (3, 8)
    backbone.ops = ("conv", "sep_conv", "identity", "zero")
    backbone.stem_channels = 32
    backbone.strides = (2, 2)
    backbone.batch_norm = True
    backbone.head = "none"
  config.model.head_channels = 128
  config.train.steps = 90_000
  config.train.batch_size = 64
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 5000
  config.train.eval_batch_size = 64
  config.optimizer.learning_rate = 5e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 1000
  config.checkpoint.every_steps = 5000
  if variants.tiny:
    config.data.image_size = 64
    config.data.max_boxes = 8
    config.model.head_channels = 8
    if variants.backbone == "resnet":
      config.model.backbone.stage_sizes = (1, 1, 1)
      config.model.backbone.widths = (4, 8, 8)
    config_lib.make_tiny(config, batch_size=4)
  return config
