"""DNAS on CIFAR-10 searching each block's numeric format too (a GPU-sized search).

  dsjax-search --config configs/cifar10_dnas_precision.py \\
      --config.data.data_dir=~/data/cifar10 --workdir runs/cifar10-dnas-precision
  dsjax-train --config configs/cifar10_dnas_precision.py \\
      --config.data.data_dir=~/data/cifar10 \\
      --architecture runs/cifar10-dnas-precision/architecture.json \\
      --workdir runs/cifar10-precision-qat

configs/cifar10_dnas.py's space and schedule, every block also choosing float32,
bfloat16, int8 or int4, under budgets on bit-ops and model bytes (Wu et al. 2018 report
ResNets on CIFAR-10 21x smaller, or 104x fewer bit-ops, than fp32 at equal accuracy).
"""

from dsjax import config as config_lib
from dsjax.configs import cifar10_dnas


def get_config(arg: str | None = None):
  """Returns the config; `arg` is a comma-separated list of variants (`tiny`)."""
  variants = config_lib.parse_arg(arg, tiny=False)
  config = cifar10_dnas.get_config("tiny" if variants.tiny else None)
  config.model.backbone.precision_choices = ("float32", "bfloat16", "int8", "int4")
  config.resource.target_params = 0.0
  # A 3.3M-parameter fp32 network is ~1.3e7 bytes; 20x smaller is 6.6e5. The bit-ops
  # budget is per example (an fp32 network of ~3e8 MACs has ~3e11 bit-ops).
  config.resource.target_model_bytes = 6.6e5
  config.resource.target_bitops = 3e9
  if variants.tiny:
    config.resource.target_model_bytes, config.resource.target_bitops = 1e3, 1e6
  return config
