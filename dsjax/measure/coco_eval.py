"""COCO box AP of a detector, computed by pycocotools' own evaluator (COCOeval, "bbox"), so
the figures are the ones papers report: the trainer's detection evaluation turns a split's
model outputs into COCO results entries, writes them, and scores them against the
split's annotations."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsjax.errors import DataError

log = logging.getLogger(__name__)

# COCOeval.stats[0..5], in order: AP@[.5:.95], AP@.5, AP@.75, then AP@[.5:.95] by box area.
METRIC_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def detections_to_results(boxes: Any, scores: Any, classes: Any, image_ids: Any, letterbox: Any,
                          category_ids: Sequence[int], *,
                          score_threshold: float = 0.0) -> list[dict[str, Any]]:
  """COCO results entries of a split's detections, in the original images' pixels.

  Detections scoring at most `score_threshold` (nan included), of class < 0 (the padding
  of a fixed-size output) or of zero width or height once mapped back are dropped. Boxes
  are not clipped to the image: the letterbox does not say the original size.

  Args:
    boxes: float [N, K, 4] as (x0, y0, x1, y1) in model-input pixels.
    scores: [N, K].
    classes: int [N, K], contiguous class indices (< 0: padding).
    image_ids: int [N], the COCO image id of each row.
    letterbox: float [N, 3] = (scale, pad_x, pad_y): original = (input - pad) / scale.
    category_ids: class index -> COCO category id.
    score_threshold: keep scores strictly above this.

  Returns:
    `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` dicts of plain Python
    types (JSON-serialisable), coordinates rounded to 2 decimals, image by image.

  Raises:
    ValueError: on mismatched shapes, a non-positive scale or a kept class index that
      `category_ids` has no entry for.
  """
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  classes = np.asarray(classes)
  image_ids = np.asarray(image_ids).reshape(-1)
  letterbox = np.asarray(letterbox, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores: expected [N, K], got shape {scores.shape}")
  count, per_image = scores.shape
  expected = {"boxes": (boxes.shape, (count, per_image, 4)),
              "classes": (classes.shape, (count, per_image)),
              "image_ids": (image_ids.shape, (count,)), "letterbox": (letterbox.shape, (count, 3))}
  for name, (shape, want) in expected.items():
    if shape != want:
      raise ValueError(f"{name}: expected shape {want} (scores are {scores.shape}), got {shape}")
  scale, pad_x, pad_y = (letterbox[:, column, None] for column in range(3))
  if not np.all(scale > 0):
    raise ValueError(f"letterbox: scales must be > 0, got {letterbox[:, 0].tolist()}")
  x0 = (boxes[..., 0] - pad_x) / scale
  y0 = (boxes[..., 1] - pad_y) / scale
  # Width from the unrounded corners, then rounded: a box of rounded width 0 has no area.
  x, y = np.round(x0, 2), np.round(y0, 2)
  width = np.round((boxes[..., 2] - pad_x) / scale - x0, 2)
  height = np.round((boxes[..., 3] - pad_y) / scale - y0, 2)
  keep = (scores > score_threshold) & (classes >= 0) & (width > 0) & (height > 0)
  rows, columns = np.nonzero(keep)
  kept_classes = classes[rows, columns].astype(np.int64)
  if kept_classes.size and kept_classes.max() >= len(category_ids):
    raise ValueError(f"classes: index {int(kept_classes.max())} has no category id "
                     f"(category_ids has {len(category_ids)} entries)")
  lookup = np.asarray(category_ids, np.int64)
  return [{"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
          for image_id, category_id, bbox, score in zip(
              image_ids[rows].astype(np.int64).tolist(), lookup[kept_classes].tolist(),
              np.stack([x, y, width, height], -1)[rows, columns].tolist(),
              scores[rows, columns].tolist(), strict=True)]


def write_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> Path:
  """Writes COCO results entries as a JSON list, atomically (temporary file, then rename),
  so a reader never sees half a file.

  Args:
    path: the file (its folder is created).
    results: e.g. from `detections_to_results`.

  Returns:
    The path written.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      # numpy scalars (an entry built by hand from arrays) become Python numbers.
      json.dump([dict(entry) for entry in results], f, default=lambda value: value.item())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _ground_truth(ground_truth: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """A copy of the annotations with what pycocotools reads but a hand-made dict may lack:
  "info" (loadRes of pycocotools 2.0.9 and 2.0.10 indexes it), "licenses", and per
  annotation "id" (createIndex keys on it), "iscrowd" (0) and "area" (the box's)."""
  if isinstance(ground_truth, str | os.PathLike):
    try:
      dataset = json.loads(Path(ground_truth).read_text())
    except OSError as error:
      raise DataError(f"{ground_truth}: cannot read the COCO annotations ({error})") from error
    except json.JSONDecodeError as error:
      raise DataError(f"{ground_truth}: not valid JSON ({error})") from error
  else:
    dataset = ground_truth
  if not isinstance(dataset, Mapping):
    raise DataError(f"COCO annotations: expected an object, got {type(dataset).__name__}")
  missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
  if missing:
    raise DataError(f"COCO annotations: no {', '.join(repr(key) for key in missing)} key")
  annotations = [dict(annotation) for annotation in dataset["annotations"]]
  renumber = any("id" not in annotation for annotation in annotations)
  for index, annotation in enumerate(annotations):
    if any(key not in annotation for key in ("image_id", "category_id", "bbox")):
      raise DataError(f"COCO annotation {index}: needs 'image_id', 'category_id' and 'bbox', "
                      f"got {annotation}")
    if renumber:  # Ids only index the annotations: renumber all rather than risk a clash.
      annotation["id"] = index + 1
    annotation.setdefault("iscrowd", 0)
    annotation.setdefault("area", float(annotation["bbox"][2]) * float(annotation["bbox"][3]))
  return {**dataset, "info": dataset.get("info", {}), "licenses": dataset.get("licenses", []),
          "images": [dict(image) for image in dataset["images"]],
          "categories": [dict(category) for category in dataset["categories"]],
          "annotations": annotations}


def _check_entry(index: int, entry: Any, image_ids: set[int], category_ids: set[int]) -> None:
  """Raises ValueError naming a results entry pycocotools would reject with a bare assert
  (an image outside the ground truth) or silently ignore (an unknown category)."""
  if not isinstance(entry, Mapping) or any(
      key not in entry for key in ("image_id", "category_id", "bbox", "score")):
    raise ValueError(f"results entry {index}: expected a dict with 'image_id', 'category_id', "
                     f"'bbox' and 'score', got {entry!r}")
  if entry["image_id"] not in image_ids:
    raise ValueError(f"results entry {index}: image_id {entry['image_id']!r} is not an image "
                     f"of the ground truth ({entry!r})")
  if entry["category_id"] not in category_ids:
    raise ValueError(f"results entry {index}: category_id {entry['category_id']!r} is not a "
                     f"category of the ground truth {sorted(category_ids)} ({entry!r})")
  bbox = entry["bbox"]
  if len(bbox) != 4 or not all(math.isfinite(value) for value in bbox):
    raise ValueError(f"results entry {index}: bbox must be 4 finite numbers [x, y, w, h] "
                     f"({entry!r})")


def evaluate(ground_truth: Mapping[str, Any] | str | os.PathLike,
             results: Sequence[Mapping[str, Any]],
             image_ids: Sequence[int] | None = None) -> dict[str, float]:
  """COCO box AP of `results` against `ground_truth`, by pycocotools' COCOeval ("bbox").

  Evaluation covers every image of the ground truth (an image without detections counts
  its objects as missed) with COCOeval's defaults: IoU 0.50:0.05:0.95, at most 100
  detections per image (the highest scoring). What COCOeval prints is logged at debug
  level. Empty `results` are scored like any other set: 0.0, or -1 for a size range the
  ground truth has no object of (pycocotools' "undefined").

  Args:
    ground_truth: a COCO annotations dict ("images", "annotations", "categories"; "info",
      "licenses", and the annotations' "id", "iscrowd" and "area" are optional), or the
      path of such a JSON file. It is not modified.
    results: COCO results entries, e.g. from `detections_to_results`. Not modified.
    image_ids: score these images of the ground truth only (None: all of them).

  Returns:
    {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}: COCOeval.stats[0..5],
    -1 where the ground truth has no object of that size.

  Raises:
    ValueError: naming the first results entry that is malformed or whose image_id or
      category_id the ground truth does not have.
    DataError: the ground truth cannot be read or lacks a required key.
  """
  from pycocotools.coco import COCO  # noqa: PLC0415 - detection runs only; import stays light.
  from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

  dataset = _ground_truth(ground_truth)
  known = {image["id"] for image in dataset["images"]}
  image_ids = known if image_ids is None else set(image_ids)
  if not image_ids <= known:
    raise ValueError(f"image_ids {sorted(image_ids - known)[:5]} are not in the ground truth")
  category_ids = {category["id"] for category in dataset["categories"]}
  for index, entry in enumerate(results):
    _check_entry(index, entry, image_ids, category_ids)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    truth = COCO()
    truth.dataset = dataset
    truth.createIndex()
    if results:
      # loadRes adds keys (area, id, segmentation) to the entries it is given: give copies.
      detected = truth.loadRes([dict(entry) for entry in results])
    else:  # loadRes reads results[0]: build the empty detection set by hand.
      detected = COCO()
      detected.dataset = {"images": dataset["images"], "categories": dataset["categories"],
                          "annotations": []}
      detected.createIndex()
    evaluator = COCOeval(truth, detected, "bbox")
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  log.debug("COCOeval of %d detections on %d images:\n%s", len(results), len(image_ids),
            printed.getvalue())
  return {key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats[:6], strict=True)}
