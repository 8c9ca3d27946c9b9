"""Image-classification folders (ImageNet-style), decoded and augmented as training reads.

Layout: `DATA_DIR/<split>/<class>/*.jpg|jpeg|png` with a `train/` split folder and,
optionally, `val/` and `test/`; or `DATA_DIR/<class>/...` alone, which is all training
data. The classes are the sorted names of train's class folders (label = position);
val and test may hold only some of them. Without a `val/` folder, val is a deterministic
`data.val_fraction` of train (`data.split_seed`), as CIFAR-10's; without `test/`, test is
empty. Files of other types are not read.

Nothing is decoded up front. An image is read when its rows are (`ImageFiles.read`): with
Pillow, as RGB, its shorter side resized to `data.image_size` (bilinear; JPEGs decode at
the smallest scale that allows it) and centre-cropped square, then normalised per channel
with the ImageNet mean and standard deviation. Training batches are read by the grain
loader's threads or worker processes (`dsjax.data.loader`), which also augment them
(`data.augment`: `CropFlip`, the `dsjax.data.augment.random_crop_flip` recipe drawn per
example from the seed, epoch and example index), so the task does not augment again. A
missing folder, a split without classes, an empty class folder, a class val or test has
but train lacks, and a file Pillow cannot read are each refused with the path named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset, split_train_val
from dsjax.data.lazy import RecordSource, lazy_split
from dsjax.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_IMAGE_SIZE = 32
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)
SPLIT_FOLDERS = ("train", "val", "test")
_LAYOUT = ("image-folder reads DATA_DIR/<split>/<class>/*.jpg|png (split folders train/ and "
           "optionally val/, test/) or DATA_DIR/<class>/*.jpg|png")


def decode_image(path: str, size: int) -> np.ndarray:
  """One file as a normalised float32 [size, size, 3] image (see the module docstring).

  Raises:
    DataError: Pillow cannot read the file.
  """
  try:
    with Image.open(path) as picture:
      picture.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, >= size.
      rgb = picture.convert("RGB")
  except (OSError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError.
    raise DataError(f"image-folder: cannot read the image {path} ({e}); replace or remove "
                    "the file.") from e
  width, height = rgb.size
  scale = size / min(width, height)
  resized = rgb.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                       Image.BILINEAR)
  left, top = (resized.width - size) // 2, (resized.height - size) // 2
  pixels = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)
  return (pixels / 255.0 - MEAN) / STD


class ImageFiles(RecordSource):
  """A split's image files and labels, decoded when read.

  Args:
    files: the image paths.
    labels: their class indices.
    size: the side images are resized to.
  """

  def __init__(self, files: list[str], labels: np.ndarray, size: int):
    self.files, self.labels, self.size = files, np.asarray(labels, np.int32), int(size)
    self.spec = {"image": ((self.size, self.size, 3), np.dtype(np.float32)),
                 "label": ((), np.dtype(np.int32))}

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images = np.empty((len(indices), self.size, self.size, 3), np.float32)
    for position, index in enumerate(np.asarray(indices).tolist()):
      images[position] = decode_image(self.files[index], self.size)
    return {"image": images, "label": self.labels[indices]}


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays: a cheap, well-spread hash."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


class CropFlip:
  """Random crop of the zero-padded image and a mirror with probability 1/2, in numpy.

  Each example's draws come from a hash of (seed, epoch, its index in the split), so they
  do not depend on the batch, the process or the worker that reads it.

  Args:
    padding: pixels of zero padding on each side (zero is the mean colour here).
  """

  def __init__(self, padding: int = 4):
    self.padding = int(padding)

  def draws(self, indices: np.ndarray, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(offsets int [n, 2] in 0..2*padding, flips bool [n])` of these examples."""
    with np.errstate(over="ignore"):
      base = _mix(np.asarray([seed], np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                  + _mix(np.asarray([epoch], np.uint64) + np.uint64(0x632BE59BD9B4E019)))
      bits = _mix(np.asarray(indices, np.int64).astype(np.uint64) ^ base)
    span = np.uint64(2 * self.padding + 1)
    offsets = np.stack([bits % span, (bits >> np.uint64(16)) % span], -1).astype(np.int64)
    return offsets, ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)

  def __call__(self, batch: dict[str, np.ndarray], indices: np.ndarray, epoch: int,
               seed: int) -> dict[str, np.ndarray]:
    images = batch["image"]
    count, height, width, _ = images.shape
    offsets, flips = self.draws(indices, epoch, seed)
    pad = self.padding
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + np.arange(height)
    columns = offsets[:, 1:] + np.arange(width)
    columns = np.where(flips[:, None], columns[:, ::-1], columns)
    cropped = padded[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]
    return {**batch, "image": cropped}


def _class_folders(folder: Path) -> list[Path]:
  return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.name)


def _images(class_folder: Path) -> list[str]:
  files = sorted(str(p) for p in class_folder.iterdir()
                 if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file())
  if not files:
    raise DataError(f"image-folder: the class folder {class_folder} holds no "
                    f"{'/'.join(e[1:] for e in EXTENSIONS)} image; add images or remove it.")
  return files


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[str], np.ndarray, list[str]]:
  """(files, labels, class names) of one split folder; `classes`: train's names."""
  found = _class_folders(folder)
  if not found:
    raise DataError(f"image-folder: {folder} holds no class folder; {_LAYOUT}.")
  names = [p.name for p in found] if classes is None else classes
  unknown = sorted({p.name for p in found} - set(names))
  if unknown:
    raise DataError(f"image-folder: {folder} has class folder(s) {', '.join(unknown)} that "
                    f"{folder.parent / 'train'} lacks; every class must have training images.")
  files, labels = [], []
  for class_folder in found:
    images = _images(class_folder)
    files += images
    labels += [names.index(class_folder.name)] * len(images)
  return files, np.asarray(labels, np.int32), names


@register_dataset("image-folder")
def load_image_folder(data_config: Any) -> Dataset:
  """An image-classification folder as lazily decoded splits (see the module docstring).

  Args:
    data_config: the `data` section: data_dir, image_size (0: DEFAULT_IMAGE_SIZE),
      val_fraction, split_seed, augment.

  Returns:
    Dataset 'image-folder': splits of float32 [N, S, S, 3] 'image' and int32 'label'
    (`dsjax.data.lazy.LazyColumn`s); num_classes; metadata `classes` (the class names),
    `image_size` and `augmented_in_loader`; `transform` the `CropFlip` augmentation when
    `data.augment`.

  Raises:
    DataError: a missing data_dir, a split without class folders, an empty class folder,
      a val/test class train lacks, or a bad val_fraction.
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "image-folder")
  data_dir = getattr(data_config, "data_dir", "") or ""
  root = Path(data_dir).expanduser()
  if not data_dir or not root.is_dir():
    where = f"data_dir {data_dir!r} does not exist" if data_dir else "data_dir is not set"
    raise DataError(f"image-folder: {where}; set --config.data.data_dir to a folder: "
                    f"{_LAYOUT}.")
  size = int(getattr(data_config, "image_size", 0) or DEFAULT_IMAGE_SIZE)
  split_layout = (root / "train").is_dir()
  files, labels, classes = _scan(root / "train" if split_layout else root, None)
  splits: dict[str, tuple[list[str], np.ndarray]] = {}
  if split_layout and (root / "val").is_dir():
    splits["train"] = (files, labels)
    splits["val"] = _scan(root / "val", classes)[:2]
  else:
    count = int(round(val_fraction * len(files)))
    train_idx, val_idx = split_train_val(len(files), count, int(data_config.split_seed))
    splits["train"] = ([files[i] for i in train_idx], labels[train_idx])
    splits["val"] = ([files[i] for i in val_idx], labels[val_idx])
  has_test = split_layout and (root / "test").is_dir()
  splits["test"] = _scan(root / "test", classes)[:2] if has_test else ([], labels[:0])
  augment = bool(getattr(data_config, "augment", False))
  return Dataset(
      name="image-folder",
      splits={name: lazy_split(ImageFiles(*split, size)) for name, split in splits.items()},
      num_classes=len(classes),
      metadata={"classes": classes, "image_size": size, "augmented_in_loader": augment},
      transform=CropFlip() if augment else None)
