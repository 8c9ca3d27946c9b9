"""ResNet-20 for CIFAR-10 (He et al., "Deep Residual Learning for Image Recognition", 2016).

The CIFAR network of the paper's section 4.2: a 3x3 convolution to 16 channels, then three
stages of n basic blocks (two 3x3 convolutions each) at 16, 32 and 64 channels, the
second and third starting with a stride-2 block, then global average pooling and a dense
classifier: 6n + 2 weighted layers, n = 3 for ResNet-20.

Shortcuts are the paper's option A, as it used on CIFAR: parameter-free identities, and
where a stage halves the resolution and widens the channels, a stride-2 subsample
(`x[:, ::2, ::2]`) zero-padded with the new channels (half before, half after the old
ones). ResNet-20 then has 269,722 parameters (0.27M, the paper's figure). The 3x3
convolutions pad one pixel on each side, as the reference implementations do, so that a
stride-2 convolution's output pixel i is centred on input pixel 2i, the pixel the
shortcut keeps ("SAME" padding would pad only after and centre it on 2i + 1).

Every layer is a precision-plan-aware `dsjax.nn` layer with path `stem_conv`, `stem_bn`,
`stage{s}_block{b}/conv{1,2}`, `stage{s}_block{b}/bn{1,2}` and `classifier`, so
`--precision mixed` and the adaptive plan work as for the other models. Batch
statistics are float32 whatever the compute dtype (`dsjax.nn.norm.BatchNorm`) and live in
the "batch_stats" collection, which the train step treats as model state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import nn as dsnn
from dsjax.models import registry
from dsjax.nn.norm import BatchNorm
from dsjax.precision import LayerPrecision, PrecisionPlan

_PAD_1 = ((1, 1), (1, 1))


def _shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
  """Option A: subsample by `stride`, then zero-pad the channels up to `features`."""
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = features - x.shape[-1]
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-relu-conv3x3-BN, plus the option-A shortcut, then relu.

  Attributes:
    features: output channels (at least the input channels).
    stride: stride of the first convolution and of the shortcut's subsample.
    bn_momentum: momentum of the batch-norm running averages.
    precision: compute dtype and per-layer plan of the block's layers.
  """

  features: int
  stride: int = 1
  bn_momentum: float = 0.9
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = {"kernel_size": (3, 3), "padding": _PAD_1, "use_bias": False,
            "kernel_init": nn.initializers.he_normal(), "precision": self.precision}
    bn = {"momentum": self.bn_momentum, "param_axis": "conv_out", "precision": self.precision}
    y = dsnn.Conv(self.features, strides=self.stride, name="conv1", **conv)(x)
    y = nn.relu(BatchNorm(name="bn1", **bn)(y, use_running_average=not train))
    y = dsnn.Conv(self.features, name="conv2", **conv)(y)
    y = BatchNorm(name="bn2", **bn)(y, use_running_average=not train)
    return nn.relu(y + _shortcut(x, self.features, self.stride))


class ResNet(nn.Module):
  """The CIFAR ResNet of He et al. (2016), option-A shortcuts.

  Attributes:
    stage_sizes: basic blocks per stage; (3, 3, 3) is ResNet-20, (n, n, n) ResNet-(6n+2).
    widths: channels of each stage; the stem has `widths[0]`. Non-decreasing (option-A
      shortcuts can only add channels).
    num_classes: number of output logits.
    bn_momentum: momentum of the batch-norm running averages.
    precision: compute dtype, per-layer plan and the classifier's matmul implementation
      (`dsjax.precision.LayerPrecision`), handed to every layer.
  """

  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10
  bn_momentum: float = 0.9
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Classifies NHWC `images`.

    Args:
      images: [batch, height, width, channels].
      train: normalise with batch statistics and update the running averages (the
        "batch_stats" collection must be mutable); False uses the running averages.

    Returns:
      [batch, num_classes] float32 logits.
    """
    x = resnet_features(images, self.stage_sizes, self.widths, bn_momentum=self.bn_momentum,
                        precision=self.precision, train=train)
    # Global average pool in float32: a sum over the whole feature map.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = dsnn.Dense(self.num_classes, precision=self.precision, name="classifier")(x)
    # Losses and softmax are numerically sensitive: hand them float32 logits.
    return logits.astype(jnp.float32)


def resnet_features(images: jax.Array, stage_sizes: Sequence[int], widths: Sequence[int], *,
                    bn_momentum: float, precision: LayerPrecision, train: bool) -> jax.Array:
  """The stem and the residual stages: the feature map before pooling (stride 2^(stages-1)).

  Call it inside a compact method: its layers (`stem_conv`, `stem_bn`, `stage{s}_block{b}`)
  become children of the calling module, so the classifier and the detector
  (`dsjax.models.centernet`) share parameter paths.

  Args:
    images: [batch, height, width, channels].
    stage_sizes: basic blocks per stage; stages after the first start with a stride 2.
    widths: channels of each stage; the stem has `widths[0]`.
    bn_momentum: momentum of the batch-norm running averages.
    precision: compute dtype and per-layer plan of every layer.
    train: normalise with batch statistics and update the running averages.

  Returns:
    The last stage's activations, in the compute dtype.
  """
  x = dsnn.Conv(widths[0], (3, 3), padding=_PAD_1, use_bias=False,
                kernel_init=nn.initializers.he_normal(), precision=precision,
                name="stem_conv")(images)
  x = nn.relu(BatchNorm(momentum=bn_momentum, param_axis="conv_out", precision=precision,
                        name="stem_bn")(x, use_running_average=not train))
  for stage, (blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      x = BasicBlock(width, stride, bn_momentum=bn_momentum, precision=precision,
                     name=f"stage{stage + 1}_block{block + 1}")(x, train=train)
  return x


def _build(model_config: Any, num_classes: int, compute_dtype: Any,
           plan: PrecisionPlan | None = None) -> ResNet:
  return ResNet(stage_sizes=tuple(model_config.stage_sizes), widths=tuple(model_config.widths),
                num_classes=num_classes,
                precision=LayerPrecision(compute_dtype, plan, model_config.matmul_impl))


def check_config(model_config: Any) -> list[str]:
  """Problems of `stage_sizes` and `widths` (and the shared fields)."""
  problems = []
  stage_sizes, widths = tuple(model_config.stage_sizes), tuple(model_config.widths)
  if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
    problems.append(f"stage_sizes must be positive block counts, got {stage_sizes}")
  if not widths or any(int(w) < 1 for w in widths):
    problems.append(f"widths must be positive channel counts, got {widths}")
  elif any(b < a for a, b in zip(widths, widths[1:], strict=False)):
    problems.append(f"widths must be non-decreasing (option-A shortcuts zero-pad channels, "
                    f"they cannot drop them), got {widths}")
  if len(stage_sizes) != len(widths):
    problems.append(f"stage_sizes ({len(stage_sizes)} stages) and widths ({len(widths)}) "
                    "must have the same length")
  return problems + registry.check_shared_fields(model_config)


_DEFAULTS = {"stage_sizes": (3, 3, 3), "widths": (16, 32, 64), "matmul_impl": "xla"}
registry.register(registry.ModelSpec(
    name="resnet20", build=_build, defaults=_DEFAULTS, dataset="cifar10",
    config_file="cifar10_resnet.py", check=check_config))
