"""A small convolutional classifier for the digits (8x8) and CIFAR-10 (32x32) data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dsjax import nn as dsnn
from dsjax.models import registry
from dsjax.precision import LayerPrecision, PrecisionPlan


class CNN(nn.Module):
  """Stages of two 3x3 convolutions and a 2x2 average pool, then an MLP head.

  Attributes:
    features: channels of each stage.
    dense_features: width of the hidden dense layer.
    num_classes: number of output logits.
    dropout_rate: dropout before the classifier, active in training only.
    precision: compute dtype, per-layer plan and the dense layers' matmul implementation
      (`dsjax.precision.LayerPrecision`), handed to every layer.
  """

  features: Sequence[int]
  dense_features: int
  num_classes: int
  dropout_rate: float = 0.0
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = images
    for stage, width in enumerate(self.features):
      for layer in range(2):
        x = nn.relu(dsnn.Conv(width, (3, 3), precision=self.precision,
                              name=f"conv{stage}_{layer}")(x))
      if min(x.shape[-3:-1]) >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    # Tensor parallel on `model`: the hidden layer column-split, the classifier row-split.
    x = nn.relu(dsnn.Dense(self.dense_features, kernel_axes=("embed", "mlp"),
                           precision=self.precision, name="hidden")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = dsnn.Dense(self.num_classes, kernel_axes=("mlp", None), precision=self.precision,
                        name="classifier")(x)
    # Losses and softmax are numerically sensitive: hand them float32 logits.
    return logits.astype(jnp.float32)


def _build(model_config: Any, num_classes: int, compute_dtype: Any,
           plan: PrecisionPlan | None = None) -> CNN:
  return CNN(features=tuple(model_config.features), dense_features=model_config.dense_features,
             num_classes=num_classes, dropout_rate=model_config.dropout_rate,
             precision=LayerPrecision(compute_dtype, plan, model_config.matmul_impl))


def _check(model_config: Any) -> list[str]:
  problems = []
  if not model_config.features or any(int(f) < 1 for f in model_config.features):
    problems.append(f"features must be positive channel counts, got {model_config.features}")
  if model_config.dense_features < 1:
    problems.append(f"dense_features must be >= 1, got {model_config.dense_features}")
  return problems + registry.check_shared_fields(model_config)


_DEFAULTS = {"features": (32, 64), "dense_features": 128, "dropout_rate": 0.0,
             "matmul_impl": "xla"}
registry.register(registry.ModelSpec(
    name="cnn-digits", build=_build, defaults=_DEFAULTS, dataset="digits",
    config_file="digits_cnn.py", check=_check))
registry.register(registry.ModelSpec(
    name="cnn-cifar10", build=_build, defaults={**_DEFAULTS, "features": (32, 64, 128)},
    dataset="cifar10", config_file="cifar10_cnn.py", check=_check))
