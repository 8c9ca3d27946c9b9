"""Model zoo. Importing this package registers every model by name."""

from dsjax.models import (
    bert,  # noqa: F401  (registers bert-tiny, bert-mini, bert-base)
    centernet,  # noqa: F401  (registers centernet-resnet, centernet-dnas)
    cnn,  # noqa: F401  (registers cnn-digits, cnn-cifar10)
    resnet,  # noqa: F401  (registers resnet20)
    supernet,  # noqa: F401  (registers dnas-digits, dnas-cifar10)
    wide_deep,  # noqa: F401  (registers wide-deep)
)
from dsjax.models.registry import ModelSpec, get_spec, known_models, register

__all__ = ["ModelSpec", "get_spec", "known_models", "register"]
