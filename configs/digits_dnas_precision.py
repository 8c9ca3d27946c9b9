"""DNAS on the digits, searching each block's numeric format with its op, width and depth.

  dsjax-search --config configs/digits_dnas_precision.py --workdir runs/dnas-precision
  dsjax-train --config configs/digits_dnas_precision.py \\
      --architecture runs/dnas-precision/architecture.json --workdir runs/dnas-precision-qat

configs/digits_dnas.py's space and schedule, every block also choosing among float32,
bfloat16, int8 and int4 (weights per output channel, inputs per tensor; integers
fake-quantized with a straight-through gradient), under budgets on bit-ops and model bytes
instead of FLOPs. The fp32 `cnn-digits` baseline (configs/digits_cnn.py) has ~1.53M MACs
(1.56e9 bit-ops) and 397 KB of parameters; the issue's targets are 50x fewer bit-ops and a
20x smaller model. The stem and the classifier head stay float32 (the stem alone: 9216
MACs, 9.4e6 bit-ops). The retrain (`--architecture`) trains the integer blocks
quantization-aware. The formats are relaxed EdMIPS-style (`format_mixing="operands"`: each
op convolves the format-mixed inputs with the format-mixed kernel), one convolution per op
instead of one per op and format: the search takes half the time of the output mixture on
the 2-core CPU (docs/benchmarks.md).
"""

from dsjax import config as config_lib
from dsjax.configs import digits_dnas


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = digits_dnas.get_config("tiny" if variants.tiny else None)
  config.model.backbone.precision_choices = ("float32", "bfloat16", "int8", "int4")
  config.model.backbone.format_mixing = "operands"
  # Cosine decay (of the search's weights and the retrain): int4 QAT gains 0.3-0.8 points
  # on digits over digits_dnas.py's constant rate (docs/benchmarks.md).
  config.optimizer.schedule = "cosine"
  config.resource.target_flops = 0.0  # The bit-ops budget counts the work instead.
  config.resource.target_bitops = 2e7  # 78x fewer than cnn-digits' 1.56e9.
  config.resource.target_model_bytes = 1.5e4  # 26x smaller than its 397 KB.
  if variants.tiny:
    config.resource.target_bitops, config.resource.target_model_bytes = 1e6, 1e3
  return config
