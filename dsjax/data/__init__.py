"""Datasets and deterministic batching.

Importing this package registers every built-in loader in `DATASETS`, so
`get_dataset` works however the package is first imported.
"""

from dsjax.data import cifar10 as _cifar10  # noqa: F401  (registers 'cifar10')
from dsjax.data import coco as _coco  # noqa: F401  (registers 'coco')
from dsjax.data import ctr as _ctr  # noqa: F401  (registers 'ctr-synthetic', 'criteo')
from dsjax.data import detection as _detection  # noqa: F401  (registers 'digits-detection')
from dsjax.data import digits as _digits  # noqa: F401  (registers 'digits')
from dsjax.data import image_folder as _image_folder  # noqa: F401  (registers 'image-folder')
from dsjax.data import text as _text  # noqa: F401  (registers 'text')
from dsjax.data.dataset import (
    DATASETS,
    BatchIterator,
    Dataset,
    eval_batches,
    get_dataset,
    num_examples,
)
from dsjax.data.loader import GrainLoader, loader_kind, train_iterator

__all__ = [
    "DATASETS",
    "BatchIterator",
    "Dataset",
    "GrainLoader",
    "eval_batches",
    "get_dataset",
    "loader_kind",
    "num_examples",
    "train_iterator",
]
