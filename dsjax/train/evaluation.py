"""Evaluation of a split: the task's mean loss and accuracy, and what its outputs are
scored by (the ROC AUC of click scores, COCO box AP of decoded detections).

`evaluate` runs the jitted `step.make_eval_step(task)` over every example once, in padded
batches on the run's mesh; `evaluate_split` adds the metrics that need the whole split's
per-example outputs: a click model's AUC (`dsjax.measure.roc_auc`), or a detector's COCO
AP through pycocotools (`dsjax.measure.coco_eval`), which also writes the detections as
`WORKDIR/detections_<split>.json`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dsjax import data, measure, plots
from dsjax.data import detection
from dsjax.measure import coco_eval
from dsjax.parallel import distributed, sharding
from dsjax.parallel import mesh as parallel_mesh
from dsjax.train import tasks
from dsjax.train.state import TrainState

log = logging.getLogger(__name__)

_SUMS = ("loss_sum", "correct_sum", "count")
# The detections a run's predictions.png draws: enough for a readable grid.
_DRAWN_IMAGES = 16


def run_eval(state: TrainState, eval_fn: Any, arrays: dict[str, np.ndarray],
             batch_size: int, mesh: jax.sharding.Mesh | None = None, rules: Any = (),
             microbatches: int = 1) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Mean loss and accuracy over every example of a split, and the per-example outputs.

  Args:
    state: the train state.
    eval_fn: the jitted `step.make_eval_step(task)`.
    arrays: the split, e.g. `{'image': ..., 'label': ...}`.
    batch_size: examples per eval batch (the last one is padded and masked); rounded up
      to a multiple of the mesh's batch shards times `microbatches`.
    mesh: the device mesh the state lives on; None: the default device.
    rules: logical -> mesh axis rules.
    microbatches: the pipeline micro-batches the model splits a batch into (1: none).

  Returns:
    `({'loss': ..., 'accuracy': ...}, outputs)`: outputs maps each per-example score the
    task returns besides its sums (ctr's `score`, detection's `boxes`...) to a numpy
    array over the split's examples, in order.
  """
  # A split smaller than a batch is not padded up to a whole one (a 40-sequence split
  # would otherwise cost a 256-sequence forward pass).
  count = data.num_examples(arrays)
  batch_size = min(batch_size, count)
  ways = microbatches * (parallel_mesh.batch_divisor(mesh) if mesh is not None else 1)
  batch_size = -(-batch_size // ways) * ways
  totals = dict.fromkeys(_SUMS, 0.0)
  outputs: dict[str, list[np.ndarray]] = {}
  context = sharding.context(mesh, rules) if mesh is not None else contextlib.nullcontext()
  if mesh is not None:
    batch_sharding = sharding.batch_sharding(mesh)
    start, stop = sharding.local_rows(batch_sharding, batch_size)
  with context:
    for index, (batch, mask) in enumerate(data.eval_batches(arrays, batch_size)):
      # Random inputs (MLM masks) follow the example, not the batching: the same loss
      # whatever the batch size, the mesh's rounding of it or the pipeline's.
      batch[tasks.EXAMPLE_INDEX] = np.arange(index * batch_size, (index + 1) * batch_size,
                                             dtype=np.int32)
      if mesh is not None:  # This process's rows (and their mask) as global arrays.
        batch = sharding.global_batch(
            {"mask": mask[start:stop], **{k: v[start:stop] for k, v in batch.items()}},
            batch_sharding, batch_size)
        mask = batch.pop("mask")
      out = jax.device_get(eval_fn(state, batch, mask, jax.random.PRNGKey(0)))
      for key, value in out.items():
        if key in totals:
          totals[key] += float(value)
        else:
          outputs.setdefault(key, []).append(np.asarray(value))
  scored = max(totals["count"], 1.0)
  result = {"loss": totals["loss_sum"] / scored, "accuracy": totals["correct_sum"] / scored}
  # The padding of the last batch is cut off: one row per example, in split order.
  return result, {key: np.concatenate(parts)[:count] for key, parts in outputs.items()}


def evaluate(state: TrainState, eval_fn: Any, arrays: dict[str, np.ndarray],
             batch_size: int, mesh: jax.sharding.Mesh | None = None,
             rules: Any = (), microbatches: int = 1) -> dict[str, float]:
  """Mean loss and accuracy (AUC for click prediction) over every example of a split.

  Arguments as `run_eval`'s.

  Returns:
    `{'loss': ..., 'accuracy': ...}` (plus `'auc'` when the task scores examples).
  """
  result, outputs = run_eval(state, eval_fn, arrays, batch_size, mesh, rules, microbatches)
  if "score" in outputs:
    result["auc"] = measure.roc_auc(np.asarray(arrays["label"]), outputs["score"])
  return result


def evaluate_split(state: TrainState, eval_fn: Any, dataset: data.Dataset, split: str,
                   batch_size: int, workdir: Path, mesh: jax.sharding.Mesh | None = None,
                   rules: Any = (), microbatches: int = 1, *, draw: bool = False,
                   max_examples: int = 0) -> dict[str, float]:
  """`evaluate` of one split of a dataset, with COCO box AP when the task detects.

  A detector's decoded boxes go back to the original image coordinates, into
  `workdir/detections_<split>.json` (COCO results format, process 0 writes it), and are
  scored by pycocotools' COCOeval against the split's annotation file (COCO data) or the
  ground truth built from its arrays (embedded data, or a val split carved from train).

  Args:
    state, eval_fn, batch_size, mesh, rules, microbatches: as `run_eval`'s.
    dataset: the run's dataset.
    split: "val" or "test".
    workdir: where detections_<split>.json (and predictions.png) go.
    draw: also draw `workdir/predictions.png`, the split's first images with their true
      and predicted boxes (needs matplotlib, the `plot` extra; skipped with a warning
      without it).
    max_examples: evaluate on the split's first this many examples (0: all); a
      detector's COCO annotation file is then scored on their images only.

  Returns:
    `evaluate`'s metrics, plus `ap`, `ap50`, `ap75`, `ap_small`, `ap_medium`, `ap_large`
    for a detector (-1 where the split has no box of that size, as pycocotools reports).
  """
  arrays = dataset.splits[split]
  capped = 0 < max_examples < data.num_examples(arrays)
  if capped:
    arrays = {key: column[:max_examples] for key, column in arrays.items()}
  result, outputs = run_eval(state, eval_fn, arrays, batch_size, mesh, rules, microbatches)
  if "score" in outputs:
    result["auc"] = measure.roc_auc(np.asarray(arrays["label"]), outputs["score"])
  if "boxes" not in outputs:
    return result
  metadata = dataset.metadata
  categories = metadata["categories"]
  results = coco_eval.detections_to_results(
      outputs["boxes"], outputs["box_scores"], outputs["box_classes"], arrays["image_id"],
      arrays["letterbox"], [category["id"] for category in categories])
  ground_truth = _ground_truth(metadata, arrays, split)
  # An annotation file is scored on every image it lists, or on the capped split's only.
  image_ids = (np.asarray(arrays["image_id"]).tolist()
               if capped and not isinstance(ground_truth, dict) else None)
  result.update(coco_eval.evaluate(ground_truth, results, image_ids))
  if distributed.is_primary():
    coco_eval.write_results(workdir / f"detections_{split}.json", results)
    if draw:
      _draw(workdir / "predictions.png", arrays, outputs, categories)
  return result


def _ground_truth(metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                  split: str) -> Any:
  """The split's COCO annotation file where it is one, else its ground truth as a dict."""
  path = (metadata.get("ground_truth") or {}).get(split)
  return path if path else detection.coco_ground_truth(arrays, metadata["categories"])


def _draw(path: Path, arrays: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
          categories: Any) -> None:
  count = min(_DRAWN_IMAGES, len(arrays["image"]))
  try:
    plots.draw_detections(
        path, arrays["image"][:count],
        {"boxes": outputs["boxes"][:count], "scores": outputs["box_scores"][:count],
         "classes": outputs["box_classes"][:count]},
        {"boxes": arrays["boxes"][:count], "classes": arrays["classes"][:count]}, categories)
  except ImportError as error:
    log.warning("predictions.png not drawn (%s); pip install 'dsjax[plot]' to draw it", error)
