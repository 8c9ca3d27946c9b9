"""CenterNet with a hand-designed ResNet backbone on the embedded digits-detection canvases.

48x48 canvases of 2-4 scikit-learn digits (10 classes, exact boxes, distractor noise):
a ResNet-8-style backbone (16, 32, 64 channels, output stride 4), CenterNet's head, AdamW
with a cosine decay, flip and zoom augmentation. Evaluated with pycocotools (COCO box AP
in summary.json, detections_<split>.json, predictions.png).

  dsjax-train --config configs/det_digits.py --workdir runs/det_digits

The searched counterpart is configs/det_digits_dnas.py; the same model on COCO-format data
is configs/coco_det.py.
"""

from __future__ import annotations

from dsjax import config as config_lib


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.with_model_defaults(config_lib.base_config(), "centernet-resnet")
  config.model.backbone.stage_sizes = (1, 1, 1)
  config.model.backbone.widths = (16, 32, 64)
  config.model.head_channels = 64
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
    config.model.backbone.widths = (4, 8, 8)
    config.model.head_channels = 8
    config_lib.make_tiny(config, batch_size=8)
  return config
