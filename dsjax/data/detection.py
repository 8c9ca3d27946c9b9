"""Object-detection data: the embedded `digits-detection` canvases and shared COCO helpers.

Every detection loader (this one and `coco` in `dsjax.data.coco`) gives each split these
arrays, all of leading size N:

- `image`: uint8 [N, S, S, C], S the input side (`image_size`).
- `boxes`: float32 [N, M, 4] as (x0, y0, x1, y1) in continuous input-pixel coordinates
  (a box over pixel columns 3..7 has x0=3, x1=8), after letterboxing; padding rows are 0.
- `classes`: int32 [N, M], contiguous class 0..K-1 for real boxes (first), -1 for padding.
- `image_id`: int32 [N], the COCO image id (unique across the splits of a dataset).
- `letterbox`: float32 [N, 3] = (scale, pad_x, pad_y): original = (input - pad) / scale.
- `orig_size`: int32 [N, 2] = (height, width) of the original image.

`metadata` holds "categories" (list index = class, entries {"id", "name"}), "image_size",
"max_boxes" and "ground_truth" ({split: COCO annotation json}, only for splits that are
whole files on disk; the evaluator builds the others with `coco_ground_truth`).

`digits-detection` scatters scikit-learn's 8x8 digits, upscaled 1x..2.5x, over noisy S x S
canvases (default 48, 2..4 digits each, M = 6). Train, val and test canvases draw their
digits from disjoint pools of the 1797 source images, so test scores measure unseen
digits. Train holds `num_examples` canvases (default 3000), val max(round(val_fraction *
train), 16) and test max(round(train / 6), 16): with the defaults 3000 / 300 / 500, the
500 test canvases holding about 1500 digits, enough for a stable AP. Category ids are
1..10 for the digits "0".."9" (class d is category d + 1), so the id mapping is
exercised as with real COCO ids.
"""

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset
from dsjax.errors import DataError

DIGITS_IMAGE_SIZE = 48
DIGITS_MAX_BOXES = 6
DIGITS_TRAIN_EXAMPLES = 3000
DIGITS_CATEGORIES = tuple({"id": d + 1, "name": str(d)} for d in range(10))
# Shares of the 1797 source digits kept for test and val canvases; train gets the rest.
POOL_FRACTIONS = {"test": 0.2, "val": 0.1}
_MIN_EVAL_EXAMPLES = 16
_TEST_SHARE = 1 / 6
_SPLIT_ORDER = ("train", "val", "test")
_POOL_SALT = 0xD161_7500
_CANVAS_SALT = 0xD161_7501
_SOURCE_SIDE = 8
_SOURCE_MAX = 16.0  # sklearn digit intensities are integers 0..16.
_DIGIT_COUNT = (2, 4)
_SCALE_RANGE = (1.0, 2.5)
_INK_THRESHOLD = 0.25  # Ink: pixels above this share of the scaled digit's maximum.
_MAX_IOU = 0.3
_PLACEMENT_TRIES = 8
# Distractors stay well below a digit's stroke (~255 at its core), so ink stays the
# brightest thing on the canvas and the task stays learnable.
_NOISE_STD = 6.0
_DISTRACTOR_COUNT = (1, 3)
_DISTRACTOR_LEVEL = (40, 90)


def detection_sizes(data_config: Any, dataset: str, default_size: int,
                    default_boxes: int) -> tuple[int, int]:
  """Reads (image_size, max_boxes) from the config, 0 meaning the loader's default.

  Args:
    data_config: ConfigDict with optional fields image_size and max_boxes.
    dataset: loader name, for error messages.
    default_size: S when image_size is 0 or absent.
    default_boxes: M when max_boxes is 0 or absent.

  Returns:
    (S, M), both positive.

  Raises:
    DataError: if either is negative.
  """
  size = int(data_config.get("image_size", 0) or 0) or default_size
  boxes = int(data_config.get("max_boxes", 0) or 0) or default_boxes
  if size < 1 or boxes < 1:
    raise DataError(
        f"{dataset}: image_size and max_boxes must be positive (0: the default), got "
        f"{size} and {boxes}; fix --config.data.image_size / --config.data.max_boxes.")
  return size, boxes


def pad_targets(boxes: np.ndarray, classes: np.ndarray,
                max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads one image's targets to `max_boxes` rows (real boxes first, then padding).

  Args:
    boxes: [n, 4] boxes, n <= max_boxes.
    classes: [n] contiguous classes.
    max_boxes: M.

  Returns:
    (float32 [M, 4] with zero padding rows, int32 [M] with -1 padding).
  """
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_classes = np.full((max_boxes,), -1, np.int32)
  out_boxes[:len(boxes)] = boxes
  out_classes[:len(classes)] = classes
  return out_boxes, out_classes


def letterbox_image(image: Image.Image, size: int) -> tuple[np.ndarray, float, int, int]:
  """Resizes to fit a size x size square, keeping the aspect ratio, centred on zeros.

  Args:
    image: any Pillow image; its mode fixes the channels ("L": 1, "RGB": 3).
    size: the square's side S.

  Returns:
    (uint8 [S, S, C], scale, pad_x, pad_y) with scale = S / max(height, width) and
    integer pads, so original = (input - pad) / scale.
  """
  width, height = image.size
  scale = size / max(width, height)
  new_w = min(size, max(1, round(width * scale)))
  new_h = min(size, max(1, round(height * scale)))
  resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR), np.uint8)
  if resized.ndim == 2:
    resized = resized[..., None]
  pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
  canvas = np.zeros((size, size, resized.shape[2]), np.uint8)
  canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
  return canvas, float(scale), int(pad_x), int(pad_y)


def coco_ground_truth(arrays: dict[str, np.ndarray],
                      categories: list[dict[str, Any]]) -> dict[str, Any]:
  """The COCO ground truth of one split, in the original images' coordinates.

  Args:
    arrays: a split of a detection Dataset (boxes, classes, image_id, letterbox,
      orig_size).
    categories: `metadata["categories"]`; class c is category `categories[c]["id"]`.

  Returns:
    {"images", "annotations", "categories", "info", "licenses"} that pycocotools' COCO
    accepts; annotation ids run from 1, area is the box's w * h, iscrowd 0.
  """
  letterbox = arrays["letterbox"].astype(np.float64)
  images, annotations = [], []
  for row, image_id in enumerate(arrays["image_id"].tolist()):
    height, width = arrays["orig_size"][row].tolist()
    images.append({"id": image_id, "width": width, "height": height})
    scale, pad_x, pad_y = letterbox[row]
    for box, cls in zip(arrays["boxes"][row].astype(np.float64),
                        arrays["classes"][row].tolist(), strict=True):
      if cls < 0:
        continue
      x0, x1 = (box[[0, 2]] - pad_x) / scale
      y0, y1 = (box[[1, 3]] - pad_y) / scale
      w, h = float(x1 - x0), float(y1 - y0)
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id,
          "category_id": int(categories[cls]["id"]),
          "bbox": [float(x0), float(y0), w, h], "area": w * h, "iscrowd": 0})
  return {"images": images, "annotations": annotations,
          "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
          "info": {"description": "written by dsjax"}, "licenses": []}


def _original_image(image: np.ndarray, letterbox: np.ndarray,
                    orig_size: np.ndarray) -> Image.Image:
  """Undoes the letterbox of one input image (exact when it is the identity)."""
  scale, pad_x, pad_y = letterbox.tolist()
  height, width = orig_size.tolist()
  pixels = image[..., 0] if image.shape[-1] == 1 else image
  new_w = min(image.shape[1], max(1, round(width * scale)))
  new_h = min(image.shape[0], max(1, round(height * scale)))
  crop = pixels[int(pad_y):int(pad_y) + new_h, int(pad_x):int(pad_x) + new_w]
  picture = Image.fromarray(np.ascontiguousarray(crop))
  if picture.size != (width, height):
    picture = picture.resize((width, height), Image.BILINEAR)
  return picture


def write_coco(dataset: Dataset, out_dir: str | os.PathLike,
               splits: tuple[str, ...] = _SPLIT_ORDER) -> Path:
  """Writes a detection Dataset in the standard COCO layout, in original coordinates.

  Files: `out_dir/annotations/instances_<split>.json` and `out_dir/<split>/<id>.png`
  (grey-scale images stay single-channel). The `coco` loader reads the folder back.

  Args:
    dataset: a detection Dataset (see the module docstring).
    out_dir: destination folder, created if needed.
    splits: which splits to write; ones the dataset lacks are skipped.

  Returns:
    out_dir as a Path.
  """
  out = Path(out_dir)
  (out / "annotations").mkdir(parents=True, exist_ok=True)
  categories = dataset.metadata["categories"]
  for split in splits:
    if split not in dataset.splits:
      continue
    arrays = dataset.splits[split]
    truth = coco_ground_truth(arrays, categories)
    (out / split).mkdir(exist_ok=True)
    for row, entry in enumerate(truth["images"]):
      entry["file_name"] = f"{entry['id']:012d}.png"
      picture = _original_image(arrays["image"][row], arrays["letterbox"][row],
                                arrays["orig_size"][row])
      picture.save(out / split / entry["file_name"])
    with open(out / "annotations" / f"instances_{split}.json", "w") as f:
      json.dump(truth, f)
  return out


def digit_pools(split_seed: int) -> dict[str, np.ndarray]:
  """Disjoint pools of source-digit indices (into sklearn's 1797) for each split.

  Args:
    split_seed: fixes the pools.

  Returns:
    {"train", "val", "test"} -> sorted int64 indices, together covering all 1797.
  """
  perm = np.random.default_rng([int(split_seed), _POOL_SALT]).permutation(1797)
  n_test = round(POOL_FRACTIONS["test"] * len(perm))
  n_val = round(POOL_FRACTIONS["val"] * len(perm))
  return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
          "train": np.sort(perm[n_test + n_val:])}


@functools.cache
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's digits as read-only uint8 [1797, 8, 8] (0..255) and int labels."""
  from sklearn import datasets as sk_datasets  # noqa: PLC0415 - slow import, used only here.

  raw = sk_datasets.load_digits()
  pixels = np.round(raw.images * (255.0 / _SOURCE_MAX)).astype(np.uint8)
  labels = raw.target.astype(np.int32)
  pixels.flags.writeable = labels.flags.writeable = False  # Shared by every later call.
  return pixels, labels


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
  inter_w = min(a[2], b[2]) - max(a[0], b[0])
  inter_h = min(a[3], b[3]) - max(a[1], b[1])
  if inter_w <= 0 or inter_h <= 0:
    return 0.0
  inter = inter_w * inter_h
  area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
  return inter / (area(a) + area(b) - inter)


def _distractors(rng: np.random.Generator, size: int) -> np.ndarray:
  """A canvas holding a few faint line segments and blobs that are not digits."""
  layer = Image.new("L", (size, size))
  draw = ImageDraw.Draw(layer)
  for _ in range(rng.integers(_DISTRACTOR_COUNT[0], _DISTRACTOR_COUNT[1] + 1)):
    level = int(rng.integers(_DISTRACTOR_LEVEL[0], _DISTRACTOR_LEVEL[1] + 1))
    x, y = rng.integers(0, size, 2).tolist()
    if rng.random() < 0.5:
      dx, dy = rng.integers(-size // 3, size // 3 + 1, 2).tolist()
      draw.line((x, y, x + dx, y + dy), fill=level, width=1)
    else:
      radius = int(rng.integers(1, 3))
      draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=level)
  return np.asarray(layer, np.uint8).copy()


def render_canvases(split: str, count: int, *, split_seed: int, image_size: int,
                    max_boxes: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Draws `count` digits-detection canvases of one split from its pool of source digits.

  Args:
    split: "train", "val" or "test": picks the pool (`digit_pools`) and the random stream.
    count: number of canvases.
    split_seed: with `split`, fixes every canvas.
    image_size: canvas side S (at least 8).
    max_boxes: M; a canvas holds min(2..4, M) digits, fewer when a placement fails.

  Returns:
    (arrays, sources): arrays has image, boxes and classes per the module's contract
    (image_id, letterbox and orig_size are the loader's); sources is int32 [count, M],
    the source-digit index (into sklearn's 1797) of each box, -1 for padding.
  """
  digit_indices = digit_pools(split_seed)[split]
  seed = [int(split_seed), _CANVAS_SALT, _SPLIT_ORDER.index(split)]
  pixels, labels = _source_digits()
  rng = np.random.default_rng(seed)
  images = np.zeros((count, image_size, image_size), np.uint8)
  boxes = np.zeros((count, max_boxes, 4), np.float32)
  classes = np.full((count, max_boxes), -1, np.int32)
  sources = np.full((count, max_boxes), -1, np.int32)
  for i in range(count):
    canvas = _distractors(rng, image_size)
    placed: list[tuple[int, ...]] = []
    wanted = min(int(rng.integers(_DIGIT_COUNT[0], _DIGIT_COUNT[1] + 1)), max_boxes)
    for _ in range(wanted):
      source = int(digit_indices[rng.integers(len(digit_indices))])
      side = min(image_size, round(_SOURCE_SIDE * rng.uniform(*_SCALE_RANGE)))
      tile = np.asarray(Image.fromarray(pixels[source]).resize((side, side), Image.BILINEAR))
      ink = tile > _INK_THRESHOLD * tile.max()
      rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
      for _ in range(_PLACEMENT_TRIES):
        y, x = rng.integers(0, image_size - side + 1, 2).tolist()
        box = (x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1)
        if all(_iou(box, other) <= _MAX_IOU for other in placed):
          break
      else:
        continue  # No room left that keeps the digits apart: skip this one.
      window = canvas[y:y + side, x:x + side]
      np.maximum(window, tile, out=window)
      boxes[i, len(placed)] = box
      classes[i, len(placed)] = labels[source]
      sources[i, len(placed)] = source
      placed.append(box)
    images[i] = canvas
  noise = rng.normal(0.0, _NOISE_STD, images.shape)
  images = np.clip(np.round(images + noise), 0, 255).astype(np.uint8)
  return {"image": images[..., None], "boxes": boxes, "classes": classes}, sources


def digits_split_sizes(num_train: int, val_fraction: float) -> dict[str, int]:
  """Canvases per split: train, val = max(round(val_fraction * train), 16), test =
  max(round(train / 6), 16)."""
  return {"train": num_train,
          "val": max(round(val_fraction * num_train), _MIN_EVAL_EXAMPLES),
          "test": max(round(_TEST_SHARE * num_train), _MIN_EVAL_EXAMPLES)}


@register_dataset("digits-detection")
def load_digits_detection(data_config: Any) -> Dataset:
  """Generates the embedded digits-detection dataset (deterministic, no download).

  Args:
    data_config: ConfigDict with val_fraction, split_seed and the optional num_examples
      (train canvases; 0: 3000), image_size (0: 48) and max_boxes (0: 6); data_dir is
      ignored.

  Returns:
    Dataset with single-channel images, 10 classes and identity letterboxes.

  Raises:
    DataError: for a negative num_examples or an image_size below 8.
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "digits-detection")
  size, max_boxes = detection_sizes(data_config, "digits-detection", DIGITS_IMAGE_SIZE,
                                    DIGITS_MAX_BOXES)
  if size < _SOURCE_SIDE:
    raise DataError(
        f"digits-detection: image_size={size} cannot hold an {_SOURCE_SIDE}x{_SOURCE_SIDE} "
        f"digit; set --config.data.image_size to at least {_SOURCE_SIDE} (0: 48).")
  num_train = int(data_config.get("num_examples", 0) or 0)
  if num_train < 0:
    raise DataError(
        f"digits-detection: num_examples must be >= 0 (0: {DIGITS_TRAIN_EXAMPLES}), got "
        f"{num_train}; fix --config.data.num_examples.")
  sizes = digits_split_sizes(num_train or DIGITS_TRAIN_EXAMPLES, val_fraction)
  splits, first_id = {}, 1
  for split in _SPLIT_ORDER:
    n = sizes[split]
    arrays, _ = render_canvases(split, n, split_seed=int(data_config.split_seed),
                                image_size=size, max_boxes=max_boxes)
    arrays["image_id"] = np.arange(first_id, first_id + n, dtype=np.int32)
    arrays["letterbox"] = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (n, 1))
    arrays["orig_size"] = np.full((n, 2), size, np.int32)
    splits[split] = arrays
    first_id += n
  metadata = {"categories": [dict(c) for c in DIGITS_CATEGORIES], "image_size": size,
              "max_boxes": max_boxes, "ground_truth": {}}
  return Dataset(name="digits-detection", splits=splits, num_classes=len(DIGITS_CATEGORIES),
                 metadata=metadata)
