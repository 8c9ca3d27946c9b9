"""The CenterNet detector: targets and decoding, its loss against a float64 reference, the
box-aware augmentation, and detection runs through the trainer (embedded and COCO data,
search and retrain, resume)."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import assert_trees_equal, final_state

from dsjax import config as config_lib
from dsjax import data
from dsjax.data import augment, detection
from dsjax.errors import ConfigError
from dsjax.models import centernet
from dsjax.train import search_architecture, train_and_evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg="tiny"):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.logging.progress_bar = False
  return config


def random_boxes(rng, batch, max_boxes, classes, side, stride):
  """Padded random boxes, at most one per output cell (a cell decodes one box)."""
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  labels = -np.ones((batch, max_boxes), np.int32)
  for b in range(batch):
    cells = set()
    for m in range(rng.integers(0, max_boxes + 1)):
      w, h = rng.uniform(2, side / 2, 2)
      x0, y0 = rng.uniform(0, side - w), rng.uniform(0, side - h)
      cell = (int((x0 + w / 2) // stride), int((y0 + h / 2) // stride))
      if cell in cells:
        continue
      cells.add(cell)
      boxes[b, m], labels[b, m] = (x0, y0, x0 + w, y0 + h), rng.integers(0, classes)
  return boxes, labels


def perfect_outputs(targets, labels, classes):
  """Model outputs that say exactly the targets: logit(heat), and at each centre a sure
  peak of the right class with the true size and offset."""
  heat = np.clip(np.asarray(targets["heatmap"], np.float64), 1e-6, 1 - 1e-6)
  batch, height, width, _ = heat.shape
  out = np.concatenate([np.log(heat / (1 - heat)), np.zeros((batch, height, width, 4))], -1)
  out = out.reshape(batch, height * width, -1)
  for b, m in zip(*np.nonzero(labels >= 0), strict=True):
    cell = targets["index"][b, m]
    out[b, cell, labels[b, m]] = 30.0
    out[b, cell, classes:] = np.concatenate([targets["size"][b, m], targets["offset"][b, m]])
  return jnp.asarray(out.reshape(batch, height, width, -1), jnp.float32)


@pytest.mark.parametrize("seed", range(5))
def test_encoded_boxes_decode_back(seed):
  """Property over random boxes: encoding into heatmap peaks, sizes and offsets, then
  decoding, gives every box back (float32 rounding: 1e-4 px) with its class, scored
  first; the decoded boxes past the objects score below the objects'."""
  rng = np.random.default_rng(seed)
  batch, max_boxes, classes, side, stride = 4, 6, 5, 48, 4
  boxes, labels = random_boxes(rng, batch, max_boxes, classes, side, stride)
  grid = (side // stride, side // stride)
  targets = jax.device_get(centernet.encode_targets(boxes, labels, grid, classes, stride))
  decoded = jax.device_get(centernet.decode(perfect_outputs(targets, labels, classes),
                                            classes, stride, 20))
  for b in range(batch):
    count = int(np.sum(labels[b] >= 0))
    got, got_classes = decoded["boxes"][b, :count], decoded["classes"][b, :count]
    for box, label in zip(boxes[b, :count], labels[b, :count], strict=True):
      match = np.argmin(np.abs(got - box).max(-1))
      np.testing.assert_allclose(got[match], box, atol=1e-4)
      assert got_classes[match] == label
    assert np.all(decoded["scores"][b, :count] > 0.999)
    assert np.all(decoded["scores"][b, count:] < 0.999)


def test_heatmap_targets_peak_at_centres_with_the_ttfnet_gaussian():
  boxes = np.asarray([[[8.0, 8.0, 24.0, 16.0], [0, 0, 0, 0]]], np.float32)  # 16 x 8 px.
  labels = np.asarray([[2, -1]], np.int32)
  targets = jax.device_get(centernet.encode_targets(boxes, labels, (12, 12), 3, 4))
  heat = targets["heatmap"][0]
  assert heat[3, 4, 2] == 1.0 and heat.max() == 1.0  # Centre (16, 12) px: cell (4, 3).
  assert np.all(heat[..., :2] == 0) and targets["valid"].tolist() == [[1.0, 0.0]]
  sigma_x, sigma_y = 0.54 * 4 / 6, 0.54 * 2 / 6  # Box 4 x 2 cells.
  np.testing.assert_allclose(heat[3, 5, 2], np.exp(-1 / (2 * sigma_x**2)), rtol=1e-5)
  np.testing.assert_allclose(heat[4, 4, 2], np.exp(-1 / (2 * sigma_y**2)), rtol=1e-5)
  np.testing.assert_allclose(targets["offset"][0, 0], [0.0, 0.0])
  np.testing.assert_allclose(targets["size"][0, 0], [4.0, 2.0])


def test_losses_match_a_float64_reference():
  """CenterNet's focal loss (alpha 2, beta 4) and the L1 terms, against numpy float64 on
  random outputs: float32 sums of a few hundred terms, rtol 1e-5."""
  rng = np.random.default_rng(0)
  classes, stride = 3, 4
  boxes, labels = random_boxes(rng, 2, 4, classes, 32, stride)
  targets = jax.device_get(centernet.encode_targets(boxes, labels, (8, 8), classes, stride))
  outputs = rng.normal(0, 2, (2, 8, 8, classes + 4)).astype(np.float32)
  losses = jax.device_get(centernet.detection_losses(jnp.asarray(outputs), targets, classes))
  x = outputs.astype(np.float64)
  prob, target = 1 / (1 + np.exp(-x[..., :classes])), targets["heatmap"].astype(np.float64)
  pos = -(1 - prob) ** 2 * np.log(prob)
  neg = -(1 - target) ** 4 * prob**2 * np.log(1 - prob)
  focal = np.where(target == 1, pos, neg).sum((1, 2, 3))
  flat = x.reshape(2, 64, -1)
  l1 = np.zeros((2, 2))
  for b, m in zip(*np.nonzero(labels >= 0), strict=True):
    at = flat[b, targets["index"][b, m]]
    l1[b] += [np.abs(at[classes:classes + 2] - targets["size"][b, m]).sum(),
              np.abs(at[classes + 2:] - targets["offset"][b, m]).sum()]
  np.testing.assert_allclose(losses["heatmap"], focal, rtol=1e-5)
  np.testing.assert_allclose(losses["size"], l1[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses["offset"], l1[:, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses["loss"], focal + 0.1 * l1[:, 0] + l1[:, 1], rtol=1e-5)


def test_flip_and_zoom_move_the_boxes_with_the_pixels():
  """A white rectangle's box follows it through the mirror and the zoom: the augmented
  box is where the augmented ink is (to the pixel the bilinear edge may blur), and a box
  pushed out of the frame becomes padding."""
  image = np.zeros((1, 32, 32, 1), np.float32)
  image[0, 4:12, 6:20] = 1.0
  boxes = np.asarray([[[6.0, 4.0, 20.0, 12.0], [0.0, 20.0, 4.0, 28.0]]], np.float32)
  labels = np.asarray([[1, 0]], np.int32)
  flips, scales, shifts = np.asarray([True]), np.asarray([1.5], np.float32), \
      np.asarray([[-16.0, -2.0]], np.float32)
  out, out_boxes, out_labels = jax.device_get(augment.apply_flip_scale(
      jnp.asarray(image), jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(flips),
      jnp.asarray(scales), jnp.asarray(shifts)))
  rows, cols = np.nonzero(out[0, ..., 0] > 0.5)
  ink = np.asarray([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)
  # Mirrored: x in [12, 26); zoomed by 1.5 and shifted: x in [2, 23), y in [4, 16).
  np.testing.assert_allclose(out_boxes[0, 0], [2.0, 4.0, 23.0, 16.0], atol=1e-4)
  np.testing.assert_allclose(ink, out_boxes[0, 0], atol=1.0)
  assert out_labels[0].tolist() == [1, -1]  # A third of the second box stays in the frame.
  np.testing.assert_array_equal(out_boxes[0, 1], 0.0)


def test_detection_needs_a_box_dataset():
  config = load_config("det_digits")
  config.data.name = "digits"
  with pytest.raises(ConfigError, match="has no boxes"):
    train_and_evaluate(config, "/tmp/unused-dsjax-det")


def test_backbone_type_must_match_the_model():
  config = load_config("det_digits")
  config.model.backbone.type = "DNAS"
  with pytest.raises(ConfigError, match="centernet-dnas"):
    config_lib.validate(config)


def check_summary(summary, workdir):
  for key in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
    assert -1.0 <= summary[f"test_{key}"] <= 1.0 and f"eval_{key}" in summary
  results = json.loads((workdir / "detections_test.json").read_text())
  assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)
  assert (workdir / "predictions.png").stat().st_size > 0
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert "eval_ap" in record


@pytest.mark.slow
def test_coco_config_trains_on_coco_format_files(tmp_path):
  """configs/coco_det.py on the embedded canvases written out in COCO format: the loader
  reads the files, and AP is scored against each split's own annotation file."""
  source = load_config("det_digits")
  source.data.num_examples = 32
  detection.write_coco(data.get_dataset(source.data), tmp_path / "coco")
  config = load_config("coco_det")
  config.data.data_dir = str(tmp_path / "coco")
  summary = train_and_evaluate(config, tmp_path / "run")
  check_summary(summary, tmp_path / "run")


@pytest.mark.slow
def test_detector_resume_is_bit_identical(tmp_path):
  """Under mixed precision (loss scaling and the per-layer controller included)."""
  def config(steps):
    config = load_config("det_digits")
    config.precision.policy = "mixed"
    config.train.steps = steps
    config.checkpoint.every_steps = 2
    config.optimizer.schedule = "constant"
    return config

  train_and_evaluate(config(4), tmp_path / "straight")
  train_and_evaluate(config(2), tmp_path / "resumed")
  train_and_evaluate(config(4), tmp_path / "resumed")
  step_a, state_a = final_state(tmp_path / "straight")
  step_b, state_b = final_state(tmp_path / "resumed")
  assert step_a == step_b == 4
  assert_trees_equal(state_a, state_b)


@pytest.mark.slow
def test_dnas_detector_searches_then_retrains(tmp_path):
  config = load_config("det_digits_dnas")
  summary = search_architecture(config, tmp_path / "search")
  architecture = json.loads((tmp_path / "search" / "architecture.json").read_text())
  assert summary["flops"] > 0 and len(architecture["blocks"]) == 3
  config = load_config("det_digits_dnas")
  config.model.architecture = str(tmp_path / "search" / "architecture.json")
  check_summary(train_and_evaluate(config, tmp_path / "retrain"), tmp_path / "retrain")


@pytest.mark.slow
def test_detector_on_a_data_parallel_mesh_matches_one_device(tmp_path):
  """The tiny config's two steps on one device and on a data=2 mesh: both report COCO AP
  and write their detections, and the logged losses agree to float32 reduction order
  (rtol 1e-5; the batch's sums split across two devices)."""
  losses = {}
  for devices in (1, 2):
    config = load_config("det_digits")
    config.mesh.num_devices = devices
    train_and_evaluate(config, tmp_path / f"devices{devices}")
    records = [json.loads(line) for line in
               (tmp_path / f"devices{devices}" / "metrics.jsonl").read_text().splitlines()]
    losses[devices] = [record["loss"] for record in records]
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)
  for devices in (1, 2):
    workdir = tmp_path / f"devices{devices}"
    check_summary(json.loads((workdir / "summary.json").read_text()), workdir)
