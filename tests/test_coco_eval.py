"""dsjax.measure.coco_eval: box AP from pycocotools' COCOeval on a hand-made ground truth
whose answers are known (perfect boxes, boxes shifted to a chosen IoU, no boxes)."""

import copy
import json

import numpy as np
import pytest

from dsjax import plots
from dsjax.errors import DataError
from dsjax.measure import coco_eval

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
CATEGORY_IDS = [1, 5, 9]  # Class index -> COCO id: non-contiguous, as COCO's are.


def ground_truth():
  """Four images, boxes of every COCO size range (small < 32², medium < 96², large), with
  neither "info", "licenses" nor the annotations' "area"/"iscrowd" (evaluate fills them)."""
  images = [{"id": 3, "width": 64, "height": 64}, {"id": 8, "width": 100, "height": 80},
            {"id": 21, "width": 200, "height": 200}, {"id": 42, "width": 200, "height": 200}]
  boxes = [(3, 1, [4, 6, 20, 10]),  # Small: 200 px².
           (3, 5, [30, 30, 25, 25]),  # Small: 625 px².
           (8, 5, [10, 20, 50, 40]),  # Medium: 2000 px².
           (8, 9, [60, 5, 35, 70]),  # Medium: 2450 px².
           (21, 1, [20, 30, 120, 100]),  # Large: 12000 px².
           (42, 9, [0, 0, 150, 80]),  # Large: 12000 px².
           (42, 1, [100, 120, 40, 60])]  # Medium: 2400 px².
  annotations = [{"id": index + 1, "image_id": image_id, "category_id": category_id,
                  "bbox": bbox} for index, (image_id, category_id, bbox) in enumerate(boxes)]
  categories = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]
  return {"images": images, "annotations": annotations, "categories": categories}


def as_results(truth, shift=0.0):
  """The ground-truth boxes as detections of score 1, each moved right by `shift` x its
  width."""
  return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
           "bbox": [a["bbox"][0] + shift * a["bbox"][2], *a["bbox"][1:]]}
          for a in truth["annotations"]]


def test_perfect_detections_score_one_and_inputs_are_not_modified():
  truth = ground_truth()
  results = as_results(truth)
  before = copy.deepcopy((truth, results))
  metrics = coco_eval.evaluate(truth, results)
  assert set(metrics) == {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}
  for key, value in metrics.items():
    assert value == pytest.approx(1.0, abs=1e-9), key
  assert (truth, results) == before  # COCOeval and loadRes add keys, to copies only.


def test_boxes_shifted_to_iou_072_match_half_the_thresholds():
  # A w x h box moved right by dx overlaps its original in (w - dx) h of (w + dx) h:
  # IoU = (w - dx) / (w + dx) = t for dx = w (1 - t) / (1 + t), whatever the box.
  iou = 0.72
  metrics = coco_eval.evaluate(ground_truth(), as_results(ground_truth(), (1 - iou) / (1 + iou)))
  # Every detection matches at the thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (<= 0.72) with
  # precision 1, and none at 0.75 ... 0.95: AP@[.5:.95] = 5 / 10, AP@.5 = 1, AP@.75 = 0.
  assert metrics["ap"] == pytest.approx(0.5, abs=1e-9)
  assert metrics["ap50"] == pytest.approx(1.0, abs=1e-9)
  assert metrics["ap75"] == pytest.approx(0.0, abs=1e-9)
  for size in ("small", "medium", "large"):
    assert metrics[f"ap_{size}"] == pytest.approx(0.5, abs=1e-9)


def test_images_without_detections_count_as_misses(tmp_path):
  truth = ground_truth()
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(truth))
  # Image 21 (its one object: a large cat) gets no detection. AP is a mean over categories:
  # cats recall 2 of 3 at precision 1, so their AP is the share of COCO's 101 recall
  # thresholds 0.00 ... 1.00 reached, 0.00 ... 0.66: 67 / 101; dogs and birds score 1.
  # Of large objects, cats (one) score 0, birds (one) 1, dogs have none (-1, left out).
  results = [r for r in as_results(truth) if r["image_id"] != 21]
  metrics = coco_eval.evaluate(path, results)
  assert metrics["ap"] == pytest.approx((67 / 101 + 1 + 1) / 3, abs=1e-9)
  assert metrics["ap_large"] == pytest.approx(0.5, abs=1e-9)
  assert metrics["ap_small"] == pytest.approx(1.0, abs=1e-9)


def test_image_ids_score_those_images_only(tmp_path):
  """Evaluation restricted to some images (train.eval_examples on a COCO file) scores as
  a ground truth of those images alone would; an id outside it is refused."""
  truth = ground_truth()
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(truth))
  results = [r for r in as_results(truth) if r["image_id"] != 21]
  assert coco_eval.evaluate(path, results, [3, 8, 42]) == pytest.approx(
      {key: 1.0 for key in coco_eval.METRIC_KEYS})
  only = {**truth, "images": [i for i in truth["images"] if i["id"] in (3, 21)],
          "annotations": [a for a in truth["annotations"] if a["image_id"] in (3, 21)]}
  subset = [r for r in results if r["image_id"] == 3]
  assert coco_eval.evaluate(path, subset, [3, 21]) == coco_eval.evaluate(only, subset)
  with pytest.raises(ValueError, match=r"image_ids \[7\] are not in the ground truth"):
    coco_eval.evaluate(path, results, [3, 7])


def test_empty_results_score_zero_and_minus_one_for_sizes_without_objects():
  metrics = coco_eval.evaluate(ground_truth(), [])
  assert metrics == dict.fromkeys(coco_eval.METRIC_KEYS, 0.0)
  small_only = ground_truth()
  small_only["images"] = small_only["images"][:1]
  small_only["annotations"] = small_only["annotations"][:2]
  metrics = coco_eval.evaluate(small_only, [])
  assert metrics == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ap_small": 0.0,
                     "ap_medium": -1.0, "ap_large": -1.0}


def test_unknown_image_or_category_is_a_value_error_naming_the_entry():
  results = as_results(ground_truth())
  results[2] = {**results[2], "image_id": 999}
  with pytest.raises(ValueError, match=r"results entry 2: image_id 999 is not an image"):
    coco_eval.evaluate(ground_truth(), results)
  results = as_results(ground_truth())
  results[0] = {**results[0], "category_id": 2}
  with pytest.raises(ValueError, match=r"results entry 0: category_id 2"):
    coco_eval.evaluate(ground_truth(), results)
  with pytest.raises(DataError, match="no 'categories' key"):
    coco_eval.evaluate({"images": [], "annotations": []}, [])


def test_detections_to_results_undo_the_letterbox():
  # Image 0 was scaled by 0.5 and padded 4 px left (original = (input - (4, 0)) / 0.5);
  # image 1 kept its size and was padded 10 px at the top.
  letterbox = np.array([[0.5, 4.0, 0.0], [1.0, 0.0, 10.0]])
  boxes = np.array([[[14, 10, 54, 30], [0, 0, 8, 8], [20, 20, 20, 40], [4, 4, 8, 8]],
                    [[1, 11, 3.5, 15], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]], np.float32)
  scores = np.array([[0.9, 0.2, 0.8, 0.7], [0.4, 0.3, 0.0, 0.95]])
  classes = np.array([[0, 1, 1, -1], [2, 0, 0, 0]])
  results = coco_eval.detections_to_results(boxes, scores, classes, np.array([3, 8]),
                                            letterbox, CATEGORY_IDS, score_threshold=0.3)
  # Dropped: score 0.2 and 0.3 (at the threshold) and 0.0, the zero-width box (20 .. 20) and
  # class -1 (padding).
  assert results == [
      {"image_id": 3, "category_id": 1, "bbox": [20.0, 20.0, 80.0, 40.0],
       "score": pytest.approx(0.9)},
      {"image_id": 8, "category_id": 9, "bbox": [1.0, 1.0, 2.5, 4.0], "score": 0.4},
      {"image_id": 8, "category_id": 1, "bbox": [0.0, -10.0, 1.0, 1.0], "score": 0.95}]
  assert all(type(r["image_id"]) is int and type(r["score"]) is float for r in results)
  json.dumps(results)  # Plain Python types.


def test_letterboxed_truths_round_trip_to_ap_one(tmp_path):
  truth = ground_truth()
  images = [image["id"] for image in truth["images"]]
  letterbox = np.array([[0.5, 4.0, 0.0], [2.0, 0.0, 6.0], [0.25, 3.0, 3.0], [1.0, 0.0, 0.0]])
  boxes = np.zeros((4, 2, 4))
  classes = np.full((4, 2), -1)
  for a in truth["annotations"]:
    row = images.index(a["image_id"])
    column = int((classes[row] >= 0).sum())
    scale, pad_x, pad_y = letterbox[row]
    x, y, w, h = a["bbox"]
    boxes[row, column] = [x * scale + pad_x, y * scale + pad_y, (x + w) * scale + pad_x,
                          (y + h) * scale + pad_y]
    classes[row, column] = CATEGORY_IDS.index(a["category_id"])
  results = coco_eval.detections_to_results(boxes, np.where(classes >= 0, 0.9, 0.0), classes,
                                            images, letterbox, CATEGORY_IDS)
  assert len(results) == len(truth["annotations"])
  path = coco_eval.write_results(tmp_path / "eval" / "results.json", results)
  assert json.loads(path.read_text()) == results
  assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # No temporary left.
  assert coco_eval.evaluate(truth, json.loads(path.read_text()))["ap"] == pytest.approx(1.0)


@pytest.mark.parametrize("channels, dtype", [(3, np.uint8), (1, np.float32)])
def test_draw_detections_writes_a_png(tmp_path, channels, dtype):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255 if dtype == np.uint8 else 1, (3, 64, 64, channels)).astype(dtype)
  predictions = {"boxes": np.tile([[4.0, 6.0, 24.0, 16.0], [30, 30, 90, 60]], (3, 1, 1)),
                 "scores": np.tile([0.9, 0.1], (3, 1)), "classes": np.tile([0, 7], (3, 1))}
  truths = {"boxes": np.tile([[4.0, 6.0, 24.0, 16.0], [0, 0, 0, 0]], (3, 1, 1)),
            "classes": np.tile([0, -1], (3, 1))}
  path = plots.draw_detections(tmp_path / "boxes.png", images, predictions, truths,
                               ["cat", "dog"], max_images=2)
  data = path.read_bytes()
  assert data.startswith(PNG_HEADER) and len(data) > 1000
