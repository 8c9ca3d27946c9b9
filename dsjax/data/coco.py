"""COCO-format detection data from local disk (`--config.data.data_dir`); nothing is downloaded.

Layout: `data_dir/annotations/instances_<name>.json` with the images of each file under
`data_dir/<name>/<file_name>`, where `<name>` is train, val or test, optionally followed
by digits (train2017). train is required; without a val file, `val_fraction` of the train
images (at least one) becomes val, chosen by `split_seed`; test is optional. With
`num_examples` > 0 only the first that many train images (file order) are read.

Arrays follow `dsjax.data.detection`'s contract: RGB images letterboxed to `image_size`
(default 512), at most `max_boxes` boxes (default 100; an image with more keeps its
largest). Classes are the train file's category ids in sorted order; the other files must
declare the same categories. Crowd annotations (iscrowd 1) are not targets, as in COCO's
own evaluation; neither are boxes of zero width or height (COCO train2017 has two), which
cannot be matched by any detection. `metadata["ground_truth"]` names the annotation file
of every split that is a whole file (so with crowd boxes, as COCOeval wants them); for
the others (a carved val, the train it was carved from, a truncated train) the evaluator
builds the ground truth with `coco_ground_truth`.

Everything is held in memory: the full COCO train2017 at 512 px is ~93 GB, so cap it with
num_examples or image_size. Malformed data raises one DataError naming the file, the
entry and the fix.
"""

import concurrent.futures
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsjax.data.dataset import Dataset, check_val_fraction, register_dataset, split_train_val
from dsjax.data.detection import detection_sizes, letterbox_image, pad_targets
from dsjax.errors import DataError

log = logging.getLogger(__name__)

COCO_IMAGE_SIZE = 512
COCO_MAX_BOXES = 100
SPLITS = ("train", "val", "test")
_FILE_PATTERN = re.compile(r"instances_(train|val|test)(\d*)\.json")
_SLACK = 1.0  # Pixels a box may overhang its image (annotation tools round outward).
_INT32_MAX = 2**31 - 1
_FIX = "correct or remove that entry"


def _split_files(data_dir: str) -> dict[str, Path]:
  """Finds the annotation file of each split, or raises a DataError listing the search."""
  wanted = ("COCO needs --config.data.data_dir=DIR holding annotations/instances_train"
            "[digits].json (and optionally instances_val*, instances_test*) with the images "
            "under DIR/train*/ etc.")
  if not data_dir:
    raise DataError(f"coco: {wanted}")
  folder = Path(data_dir) / "annotations"
  if not folder.is_dir():
    raise DataError(f"coco: looked for the folder {folder} and found none; {wanted}")
  found: dict[str, list[Path]] = {}
  for path in sorted(folder.iterdir()):
    match = _FILE_PATTERN.fullmatch(path.name)
    if match and path.is_file():
      found.setdefault(match.group(1), []).append(path)
  for split, paths in found.items():
    if len(paths) > 1:
      raise DataError(
          f"coco: {folder} holds several {split} files ({', '.join(p.name for p in paths)}); "
          "keep one of them there.")
  if "train" not in found:
    names = sorted(p.name for p in folder.iterdir())
    raise DataError(
        f"coco: looked for {folder}/instances_train.json or instances_train<digits>.json "
        f"(e.g. instances_train2017.json), found only {names}; {wanted}")
  return {split: paths[0] for split, paths in found.items()}


def _read_json(path: Path) -> dict[str, Any]:
  """Loads an annotation file and checks its top level is COCO's."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(
        f"coco: {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
        "re-export or re-download the annotation file.") from e
  except (OSError, ValueError) as e:
    raise DataError(f"coco: cannot read {path} ({e}); check the file.") from e
  if not isinstance(data, dict):
    raise DataError(
        f"coco: {path} is not a COCO annotation file (its top level is a "
        f"{type(data).__name__}, not an object with 'images', 'annotations' and "
        "'categories'); point data_dir at COCO instances files.")
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key), list):
      raise DataError(
          f"coco: {path} is not a COCO annotation file: it has no {key!r} list (top-level "
          f"keys: {sorted(data)}); point data_dir at COCO instances files.")
  return data


def _field(path: Path, where: str, entry: Any, key: str, kind: str) -> Any:
  """entry[key], checked to be an 'id' (an int32 >= 0), a 'size' (an int > 0) or a 'str'."""
  if not isinstance(entry, dict):
    raise DataError(f"coco: {path}: {where} is a {type(entry).__name__}, not an object; {_FIX}.")
  value = entry.get(key)
  if kind == "str":
    ok, want = isinstance(value, str) and bool(value), "a non-empty string"
  else:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    low = 0 if kind == "id" else 1
    ok, want = is_int and low <= value <= _INT32_MAX, f"an integer in {low}..2**31-1"
  if not ok:
    raise DataError(f"coco: {path}: {where} has {key}={value!r}, expected {want}; {_FIX}.")
  return value


def _categories(path: Path, data: dict[str, Any]) -> dict[int, str]:
  """Category id -> name of one file."""
  out: dict[int, str] = {}
  for i, entry in enumerate(data["categories"]):
    cat_id = _field(path, f"categories[{i}]", entry, "id", "id")
    if cat_id in out:
      raise DataError(
          f"coco: {path}: categories[{i}] repeats category id {cat_id}; {_FIX}.")
    out[cat_id] = str(entry.get("name", cat_id))
  if not out:
    raise DataError(f"coco: {path} declares no categories; add the 'categories' entries.")
  return out


def _parse(path: Path, data: dict[str, Any], class_of: dict[int, int],
           limit: int) -> tuple[list[dict[str, Any]], dict[int, list[tuple[list[float], int]]]]:
  """Checks a file's images and annotations; returns the images (file order, at most
  `limit` if > 0) and image id -> [(x0, y0, x1, y1), class] of its target boxes."""
  images, seen = [], {}
  for i, entry in enumerate(data["images"]):
    where = f"images[{i}]"
    image_id = _field(path, where, entry, "id", "id")
    where = f"images[{i}] (id {image_id})"
    if image_id in seen:
      raise DataError(
          f"coco: {path}: {where} repeats the image id of images[{seen[image_id]}]; image ids "
          f"must be unique: {_FIX}.")
    seen[image_id] = i
    images.append({"id": image_id, "where": where,
                   "file_name": _field(path, where, entry, "file_name", "str"),
                   "width": _field(path, where, entry, "width", "size"),
                   "height": _field(path, where, entry, "height", "size")})
  if limit > 0:
    images = images[:limit]
  sizes = {image["id"]: (image["width"], image["height"]) for image in images}
  targets: dict[int, list[tuple[list[float], int]]] = {image["id"]: [] for image in images}
  degenerate: list[str] = []
  for i, entry in enumerate(data["annotations"]):
    where = f"annotations[{i}]"
    if isinstance(entry, dict) and "id" in entry:
      where += f" (id {entry['id']})"
    image_id = _field(path, where, entry, "image_id", "id")
    if image_id not in seen:
      raise DataError(
          f"coco: {path}: {where} refers to image_id {image_id}, which no entry of 'images' "
          f"has; add the image to 'images' or {_FIX}.")
    cat_id = _field(path, where, entry, "category_id", "id")
    if cat_id not in class_of:
      raise DataError(
          f"coco: {path}: {where} has category_id {cat_id}, which is not among the "
          f"categories {sorted(class_of)}; declare the category in 'categories' or {_FIX}.")
    bbox = entry.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in bbox)):
      raise DataError(
          f"coco: {path}: {where} has bbox={bbox!r}, expected 4 finite numbers [x, y, width, "
          f"height]; {_FIX}.")
    if image_id not in sizes:
      continue  # Beyond num_examples.
    x, y, w, h = (float(v) for v in bbox)
    width, height = sizes[image_id]
    if w < 0 or h < 0:
      raise DataError(
          f"coco: {path}: {where} has a box of negative size (bbox {bbox}, i.e. [x, y, "
          f"width, height]); {_FIX}.")
    if x < -_SLACK or y < -_SLACK or x + w > width + _SLACK or y + h > height + _SLACK:
      raise DataError(
          f"coco: {path}: {where} has bbox {bbox} ([x, y, width, height]) outside its "
          f"{width}x{height} image {image_id}; {_FIX}.")
    if w == 0 or h == 0:
      degenerate.append(where)
      continue
    if entry.get("iscrowd", 0):
      continue  # Crowd regions are never targets, as in COCOeval.
    box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
           min(x + w, float(width)), min(y + h, float(height))]
    targets[image_id].append((box, class_of[cat_id]))
  if degenerate:
    log.warning("coco: %s: skipped %d boxes of zero width or height (%s).", path,
                len(degenerate), ", ".join(degenerate[:5]))
  return images, targets


def _decode(path: Path, file: Path, image: dict[str, Any],
            size: int) -> tuple[np.ndarray, float, int, int]:
  """Reads one image as RGB and letterboxes it; checks it has its declared size."""
  try:
    with Image.open(file) as picture:
      rgb = picture.convert("RGB")
  except (OSError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError.
    raise DataError(
        f"coco: {path}: {image['where']}: cannot read the image {file} ({e}); replace the "
        "file.") from e
  if rgb.size != (image["width"], image["height"]):
    raise DataError(
        f"coco: {path}: {image['where']} declares a {image['width']}x{image['height']} image "
        f"but {file} is {rgb.size[0]}x{rgb.size[1]}; fix width/height or the file.")
  return letterbox_image(rgb, size)


def _build(path: Path, folder: Path, images: list[dict[str, Any]],
           targets: dict[int, list[tuple[list[float], int]]], size: int,
           max_boxes: int) -> tuple[dict[str, np.ndarray], int]:
  """One split's arrays; also returns how many images lost boxes to max_boxes."""
  files = [folder / image["file_name"] for image in images]
  # Checked before decoding anything, so a missing file fails in seconds, not after hours.
  for image, file in zip(images, files, strict=True):
    if not file.is_file():
      raise DataError(
          f"coco: {path}: {image['where']} names the image {file}, which does not exist; put "
          f"the image there or {_FIX}.")
  n = len(images)
  arrays = {"image": np.zeros((n, size, size, 3), np.uint8),
            "boxes": np.zeros((n, max_boxes, 4), np.float32),
            "classes": np.full((n, max_boxes), -1, np.int32),
            "image_id": np.array([image["id"] for image in images], np.int32).reshape(n),
            "letterbox": np.zeros((n, 3), np.float32),
            "orig_size": np.array([(image["height"], image["width"]) for image in images],
                                  np.int32).reshape(n, 2)}

  def decode(row: int) -> None:
    pixels, scale, pad_x, pad_y = _decode(path, files[row], images[row], size)
    arrays["image"][row] = pixels
    arrays["letterbox"][row] = (scale, pad_x, pad_y)

  # Pillow releases the GIL while decoding and resizing, so threads overlap the work.
  pool = concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1))
  try:
    for _ in pool.map(decode, range(n)):
      pass
  finally:
    pool.shutdown(cancel_futures=True)  # After an error, do not decode the rest.
  truncated = 0
  for row, image in enumerate(images):
    found = targets[image["id"]]
    if len(found) > max_boxes:
      truncated += 1
      area = [(b[2] - b[0]) * (b[3] - b[1]) for b, _ in found]
      keep = np.sort(np.argsort(-np.asarray(area), kind="stable")[:max_boxes])
      found = [found[k] for k in keep]
    if found:
      scale, pad_x, pad_y = arrays["letterbox"][row].astype(np.float64)
      boxes = np.asarray([b for b, _ in found], np.float64) * scale
      boxes += (pad_x, pad_y, pad_x, pad_y)
      arrays["boxes"][row], arrays["classes"][row] = pad_targets(
          np.clip(boxes, 0, size), np.asarray([c for _, c in found]), max_boxes)
  return arrays, truncated


@register_dataset("coco")
def load_coco(data_config: Any) -> Dataset:
  """Loads COCO-format detection data from `data_config.data_dir`.

  Args:
    data_config: ConfigDict with data_dir, val_fraction, split_seed and the optional
      num_examples (0: every train image), image_size (0: 512) and max_boxes (0: 100).

  Returns:
    Dataset with train, val and (if its file exists) test splits per the contract of
    `dsjax.data.detection`, num_classes = the number of train categories.

  Raises:
    DataError: for a missing folder or file, a file that is not COCO JSON, or an entry
      that is malformed (the message names the file, the entry and the fix).
  """
  val_fraction = check_val_fraction(data_config.val_fraction, "coco")
  size, max_boxes = detection_sizes(data_config, "coco", COCO_IMAGE_SIZE, COCO_MAX_BOXES)
  limit = int(data_config.get("num_examples", 0) or 0)
  data_dir = str(data_config.get("data_dir", "") or "")
  files = _split_files(data_dir)
  contents = {split: _read_json(path) for split, path in files.items()}
  names = _categories(files["train"], contents["train"])
  for split, path in files.items():
    theirs = _categories(path, contents[split])
    if theirs != names:
      raise DataError(
          f"coco: {path} declares the categories {sorted(theirs.items())} but "
          f"{files['train']} declares {sorted(names.items())}; every split must declare the "
          "train file's categories.")
  class_of = {cat_id: index for index, cat_id in enumerate(sorted(names))}
  parsed = {}
  for split, path in files.items():
    folder = Path(data_dir) / path.name[len("instances_"):-len(".json")]
    if not folder.is_dir():
      raise DataError(
          f"coco: {path} has no image folder {folder}; put its images there.")
    images, targets = _parse(path, contents[split], class_of, limit if split == "train" else 0)
    if split == "train" and not images:
      raise DataError(f"coco: {path} lists no images; the train split needs at least one.")
    parsed[split] = (folder, images, targets)
  owner: dict[int, str] = {}  # Image ids name images across splits (metrics, results).
  for split, (_, images, _) in parsed.items():
    for image in images:
      other = owner.setdefault(image["id"], split)
      if other != split:
        raise DataError(
            f"coco: {files[split]}: {image['where']} reuses an image id of {files[other]}; "
            "image ids must be unique across the split files: renumber one of them.")
  # A split is a whole file unless it was cut short or has val carved out of it.
  cut = 0 < limit < len(contents["train"]["images"]) or "val" not in files
  whole = {split for split in files if split != "train" or not cut}
  del contents  # The raw JSON of COCO train is gigabytes of Python objects.
  if "val" not in files:
    folder, images, targets = parsed["train"]
    if len(images) < 2:
      raise DataError(
          f"coco: {files['train']} has {len(images)} image, too few to carve a validation "
          "split from; add images or an instances_val.json.")
    n_val = min(max(round(val_fraction * len(images)), 1), len(images) - 1)
    train_idx, val_idx = split_train_val(len(images), n_val, int(data_config.split_seed))
    parsed["train"] = (folder, [images[i] for i in train_idx], targets)
    parsed["val"] = (folder, [images[i] for i in val_idx], targets)
  splits, truncated = {}, 0
  for split in (s for s in SPLITS if s in parsed):
    folder, images, targets = parsed[split]
    splits[split], lost = _build(files.get(split, files["train"]), folder, images, targets,
                                 size, max_boxes)
    truncated += lost
  if truncated:
    log.warning("coco: %d images have more than max_boxes=%d target boxes; kept the %d "
                "largest of each (raise --config.data.max_boxes to keep all).",
                truncated, max_boxes, max_boxes)
  metadata = {"categories": [{"id": cat_id, "name": names[cat_id]} for cat_id in class_of],
              "image_size": size, "max_boxes": max_boxes,
              "ground_truth": {split: str(files[split].resolve()) for split in sorted(whole)}}
  return Dataset(name="coco", splits=splits, num_classes=len(class_of), metadata=metadata)
