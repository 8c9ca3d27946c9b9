"""Tests for the detection data: digits-detection, the COCO loader, writer and helpers."""

import json
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dsjax.data import DATASETS, get_dataset
from dsjax.data.detection import (
    coco_ground_truth,
    digit_pools,
    letterbox_image,
    render_canvases,
    write_coco,
)
from dsjax.errors import DataError

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "cow"}]


def _config(name: str = "digits-detection", data_dir: str = "",
            **fields) -> ml_collections.ConfigDict:
  values = dict(name=name, data_dir=str(data_dir), val_fraction=0.1, split_seed=0,
                num_examples=32, image_size=0, max_boxes=0)
  values.update(fields)
  return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def digits():
  return get_dataset(_config())


def _write_split(root, split="train", images=None, annotations=(), categories=None):
  """Writes a small COCO split (json + RGB PNGs of the declared sizes) under root."""
  images = images if images is not None else [
      {"id": 1, "file_name": "a.png", "width": 20, "height": 10}]
  (root / split).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(len(images))
  for image in images:
    pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / split / image["file_name"])
  (root / "annotations").mkdir(exist_ok=True)
  path = root / "annotations" / f"instances_{split}.json"
  path.write_text(json.dumps({"images": images, "annotations": list(annotations),
                              "categories": categories or CATEGORIES}))
  return path


def _ann(ann_id, image_id=1, category_id=3, bbox=(2, 1, 5, 4), **extra):
  return {"id": ann_id, "image_id": image_id, "category_id": category_id,
          "bbox": list(bbox), **extra}


def _coco_api(ground_truth):
  from pycocotools.coco import COCO  # noqa: PLC0415 - only these tests need it.

  api = COCO()
  api.dataset = ground_truth
  api.createIndex()
  return api


# --- digits-detection --------------------------------------------------------


def test_registered():
  assert {"digits-detection", "coco"} <= set(DATASETS)


def test_digits_contract(digits):
  assert digits.num_classes == 10
  meta = digits.metadata
  assert json.loads(json.dumps(meta)) == meta
  assert meta["categories"][0] == {"id": 1, "name": "0"}
  assert (meta["image_size"], meta["max_boxes"], meta["ground_truth"]) == (48, 6, {})
  sizes = {k: len(v["image"]) for k, v in digits.splits.items()}
  assert sizes == {"train": 32, "val": 16, "test": 16}
  ids = np.concatenate([v["image_id"] for v in digits.splits.values()])
  assert len(np.unique(ids)) == len(ids)
  for n, split in zip(sizes.values(), digits.splits.values(), strict=True):
    want = {"image": ((n, 48, 48, 1), np.uint8), "boxes": ((n, 6, 4), np.float32),
            "classes": ((n, 6), np.int32), "image_id": ((n,), np.int32),
            "letterbox": ((n, 3), np.float32), "orig_size": ((n, 2), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in split.items()} == want
    np.testing.assert_array_equal(split["letterbox"], [[1, 0, 0]] * n)
    np.testing.assert_array_equal(split["orig_size"], [[48, 48]] * n)


def test_digits_deterministic(digits):
  again = get_dataset(_config())
  other = get_dataset(_config(split_seed=1))
  for split, arrays in digits.splits.items():
    for key, value in arrays.items():
      np.testing.assert_array_equal(value, again.splits[split][key])
  assert not np.array_equal(digits.splits["train"]["image"], other.splits["train"]["image"])


def test_digits_boxes_and_padding(digits):
  for arrays in digits.splits.values():
    real = arrays["classes"] >= 0
    counts = real.sum(1)
    assert counts.min() >= 1 and counts.max() <= 4
    # Real boxes first, then padding (zero rows, class -1).
    np.testing.assert_array_equal(real, np.arange(6) < counts[:, None])
    assert np.all(arrays["boxes"][~real] == 0)
    assert set(np.unique(arrays["classes"][real])) <= set(range(10))
    boxes = arrays["boxes"][real]
    assert np.all(boxes >= 0) and np.all(boxes <= 48)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all(boxes == np.round(boxes))  # Tight pixel boxes of the scaled ink.
    for image, row_boxes, row_real in zip(arrays["image"][..., 0], arrays["boxes"],
                                          real, strict=True):
      for x0, y0, x1, y1 in row_boxes[row_real].astype(int):
        patch = image[y0:y1, x0:x1].astype(int)
        # Each border row and column of a tight box holds ink, well above the noise.
        for line in (patch[0], patch[-1], patch[:, 0], patch[:, -1]):
          assert line.max() > 30


def test_digits_pools_disjoint(digits):
  pools = digit_pools(0)
  assert sum(len(p) for p in pools.values()) == 1797
  assert len(np.unique(np.concatenate(list(pools.values())))) == 1797
  arrays, sources = render_canvases("test", 16, split_seed=0, image_size=48, max_boxes=6)
  # The loader's test split is exactly these canvases, built from unseen digits only.
  np.testing.assert_array_equal(arrays["image"], digits.splits["test"]["image"])
  np.testing.assert_array_equal(arrays["classes"], digits.splits["test"]["classes"])
  used = sources[sources >= 0]
  assert np.isin(used, pools["test"]).all()
  assert not np.isin(used, pools["train"]).any()


def test_digits_bad_config():
  with pytest.raises(DataError, match="image_size=4.*at least 8"):
    get_dataset(_config(image_size=4))
  with pytest.raises(DataError, match="num_examples must be >= 0"):
    get_dataset(_config(num_examples=-1))


# --- write_coco / coco round trip --------------------------------------------


def test_write_coco_round_trip(digits, tmp_path):
  out = write_coco(digits, tmp_path / "coco")
  assert sorted(p.name for p in (out / "annotations").iterdir()) == [
      "instances_test.json", "instances_train.json", "instances_val.json"]
  back = get_dataset(_config("coco", out, image_size=48, max_boxes=6, num_examples=0))
  assert back.num_classes == 10
  assert back.metadata["categories"] == digits.metadata["categories"]
  assert set(back.metadata["ground_truth"]) == {"train", "val", "test"}
  for split, arrays in digits.splits.items():
    got = back.splits[split]
    assert got["image"].shape == arrays["image"].shape[:3] + (3,)
    for channel in range(3):
      np.testing.assert_array_equal(got["image"][..., channel], arrays["image"][..., 0])
    np.testing.assert_allclose(got["boxes"], arrays["boxes"], atol=1e-4)
    for key in ("classes", "image_id", "letterbox", "orig_size"):
      np.testing.assert_array_equal(got[key], arrays[key])
    # pycocotools reads both the dict and the written file.
    truth = coco_ground_truth(arrays, digits.metadata["categories"])
    assert len(_coco_api(truth).getAnnIds()) == int((arrays["classes"] >= 0).sum())
    with open(back.metadata["ground_truth"][split]) as f:
      written = json.load(f)
    api = _coco_api(written)
    assert sorted(api.getImgIds()) == sorted(arrays["image_id"].tolist())
    assert [a["bbox"] for a in written["annotations"]] == [
        a["bbox"] for a in truth["annotations"]]


def test_letterbox_non_square(tmp_path):
  images = [{"id": 5, "file_name": "wide.png", "width": 60, "height": 30},
            {"id": 6, "file_name": "tall.png", "width": 30, "height": 60}]
  annotations = [_ann(1, 5, bbox=(10, 5, 20, 10)), _ann(2, 6, category_id=7, bbox=(5, 10, 10, 20))]
  _write_split(tmp_path, images=images, annotations=annotations)
  val_images = [dict(image, id=image["id"] + 10) for image in images]
  val_annotations = [dict(a, image_id=a["image_id"] + 10) for a in annotations]
  _write_split(tmp_path, "val", images=val_images, annotations=val_annotations)
  data = get_dataset(_config("coco", tmp_path, image_size=48))
  val = data.splits["val"]
  np.testing.assert_allclose(val["letterbox"], [[0.8, 0, 12], [0.8, 12, 0]], rtol=1e-6)
  np.testing.assert_array_equal(val["orig_size"], [[30, 60], [60, 30]])
  np.testing.assert_allclose(val["boxes"][:, 0], [[8, 16, 24, 24], [16, 8, 24, 24]], atol=1e-4)
  assert np.all(val["image"][0, :12] == 0) and np.all(val["image"][1, :, :12] == 0)
  truth = coco_ground_truth(val, data.metadata["categories"])
  np.testing.assert_allclose([a["bbox"] for a in truth["annotations"]],
                             [[10, 5, 20, 10], [5, 10, 10, 20]], atol=1e-4)
  assert [a["category_id"] for a in truth["annotations"]] == [3, 7]
  pixels, scale, pad_x, pad_y = letterbox_image(Image.new("L", (60, 30), 200), 48)
  assert (pixels.shape, scale, pad_x, pad_y) == ((48, 48, 1), 0.8, 0, 12)
  assert pixels[12:36].min() == 200 and pixels[:12].max() == 0


def test_crowd_dropped_and_category_ids(tmp_path, caplog):
  images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 10}]  # No annotations.
  annotations = [_ann(1, category_id=90), _ann(2, category_id=3, iscrowd=1),
                 _ann(3, category_id=7), _ann(4, category_id=3, bbox=(0, 0, 3, 0))]
  train = _write_split(tmp_path, images=images, annotations=annotations)
  _write_split(tmp_path, "val", images=[dict(images[0], id=3)])
  with caplog.at_level(logging.WARNING, logger="dsjax.data.coco"):
    data = get_dataset(_config("coco", tmp_path, image_size=20))
  # COCO train2017 itself has boxes of height 0: they are skipped with a warning, not fatal.
  assert any("zero width or height (annotations[3] (id 4))" in r.getMessage()
             for r in caplog.records)
  assert data.num_classes == 3
  assert [c["id"] for c in data.metadata["categories"]] == [3, 7, 90]
  classes = data.splits["train"]["classes"]
  np.testing.assert_array_equal(classes[:, :3], [[2, 1, -1], [-1, -1, -1]])
  assert "test" not in data.splits
  assert data.metadata["ground_truth"]["train"] == str(train.resolve())


def test_val_carved_from_train(tmp_path):
  images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 11)]
  _write_split(tmp_path, "train2017", images=images)
  data = get_dataset(_config("coco", tmp_path, image_size=8, val_fraction=0.2, num_examples=0))
  train, val = (set(data.splits[s]["image_id"].tolist()) for s in ("train", "val"))
  assert len(val) == 2 and len(train) == 8 and not train & val
  assert data.metadata["ground_truth"] == {}  # Neither split is a whole file now.
  again = get_dataset(_config("coco", tmp_path, image_size=8, val_fraction=0.2, num_examples=0))
  np.testing.assert_array_equal(again.splits["val"]["image_id"], data.splits["val"]["image_id"])


def test_max_boxes_keeps_largest(tmp_path, caplog):
  sizes = [2, 6, 3, 5, 1]
  annotations = [_ann(i + 1, bbox=(i, 0, s, s)) for i, s in enumerate(sizes)]
  images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 20}]
  _write_split(tmp_path, images=images, annotations=annotations)
  with caplog.at_level(logging.WARNING, logger="dsjax.data.coco"):
    data = get_dataset(_config("coco", tmp_path, image_size=20, max_boxes=2, val_fraction=0.5))
  boxes = np.concatenate([data.splits[s]["boxes"] for s in ("train", "val")])
  kept = boxes[np.abs(boxes).sum(-1) > 0]
  np.testing.assert_allclose(kept, [[1, 0, 7, 6], [3, 0, 8, 5]])  # File order, largest two.
  assert sum("more than max_boxes=2" in r.getMessage() for r in caplog.records) == 1


# --- bad data: one DataError naming the file and the entry ---------------------


# Damages to the annotation json: how -> (edit of the parsed file, what the error names).
_JSON_EDITS = {
    "wrong image size": (lambda d: d["images"][0].update(width=21),
                         ["images[0] (id 1)", "declares a 21x10 image"]),
    "box outside": (lambda d: d["annotations"].append(_ann(7, bbox=(15, 2, 7, 3))),
                    ["annotations[1] (id 7)", "outside its 20x10 image"]),
    "negative box": (lambda d: d["annotations"][0].update(bbox=[2, 2, -3, 4]),
                     ["annotations[0] (id 1)", "negative size"]),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=4),
                         ["annotations[0] (id 1)", "category_id 4"]),
    "duplicate image id": (lambda d: d["images"].append(dict(d["images"][0], file_name="c.png")),
                           ["images[2] (id 1)", "must be unique"]),
    "orphan annotation": (lambda d: d["annotations"][0].update(image_id=9),
                          ["annotations[0] (id 1)", "image_id 9"]),
    "bad bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
                 ["annotations[0] (id 1)", "4 finite numbers"]),
}


def _break(root, how):
  """Writes a valid train split, damages it as `how` says, returns what the error names."""
  # Two images, so that val can be carved from train and loading gets to the images.
  images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 10}]
  path = _write_split(root, images=images, annotations=[_ann(1)])
  if how in _JSON_EDITS:
    edit, names = _JSON_EDITS[how]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return [str(path), *names]
  if how == "invalid json":
    path.write_text('{"images": [')
    return [str(path), "not valid JSON", "line 1"]
  if how == "not coco":
    path.write_text(json.dumps({"images": [], "annotations": []}))
    return [str(path), "no 'categories' list"]
  if how == "missing image":
    (root / "train" / "a.png").unlink()
    return [str(path), "images[0] (id 1)", "a.png", "does not exist"]
  if how == "corrupt image":
    (root / "train" / "b.png").write_bytes(b"not a png")
    return [str(path), "images[1] (id 2)", "b.png", "cannot read the image"]
  if how == "id in two splits":
    val = _write_split(root, "val", images=images[1:])
    return [str(val), "images[0] (id 2)", str(path), "unique across"]
  assert how == "other categories", how
  val = _write_split(root, "val", images=[dict(images[0], id=3)], categories=CATEGORIES[:2])
  return [str(val), str(path), "every split must declare"]


@pytest.mark.parametrize("how", [
    *_JSON_EDITS, "invalid json", "not coco", "missing image", "corrupt image",
    "id in two splits", "other categories"])
def test_bad_files(tmp_path, how):
  expected = _break(tmp_path, how)
  with pytest.raises(DataError) as error:
    get_dataset(_config("coco", tmp_path, image_size=16))
  message = str(error.value)
  assert all(part in message for part in expected), (expected, message)


def test_missing_folders(tmp_path):
  with pytest.raises(DataError, match="needs --config.data.data_dir"):
    get_dataset(_config("coco", ""))
  with pytest.raises(DataError, match="looked for the folder .*annotations"):
    get_dataset(_config("coco", tmp_path / "nowhere"))
  (tmp_path / "annotations").mkdir()
  (tmp_path / "annotations" / "captions_train2017.json").write_text("{}")
  with pytest.raises(DataError, match="instances_train.json.*captions_train2017.json"):
    get_dataset(_config("coco", tmp_path))
