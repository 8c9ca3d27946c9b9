"""CenterNet ("Objects as Points", Zhou et al. 2019): a one-stage, anchor-free detector.

Every object is the peak of a class heatmap at its box centre, on the backbone's output
grid (stride 4 in the configs), plus a box size and a sub-cell offset read at that peak.
Decoding keeps the local maxima of the heatmaps (a 3x3 max-pool instead of NMS) and takes
the top `max_detections`: static shapes from end to end, so training, evaluation and
export all run under `jit` with no host round trip.

The backbone is any dsjax backbone, chosen by `model.backbone.type`:
- "resnet": the residual stages of `dsjax.models.resnet` (a hand-designed network);
- "DNAS": the DNAS supernet of `dsjax.models.supernet` (searched by `dsjax-search`, the
  detection loss on validation batches steering its logits), or, given
  `model.architecture`, the discrete network derived from a search.
Its layers keep the paths they have in the classifiers (`stem`, `block_{i}`...), so a
searched detector's `arch` collection reads like a searched classifier's.

The head is CenterNet's, with one shared 3x3 trunk (`head_conv`, `head_channels` wide)
instead of one per output: three 1x1 convolutions give `num_classes` heatmap logits (bias
-2.19, a prior of 0.1, as the paper), 2 sizes and 2 offsets. The module returns them
concatenated, float32 [batch, H/stride, W/stride, num_classes + 4]. Targets and decoding
live with the training task (`dsjax.train.tasks.DetectionTask`) in `encode_targets` and
`decode` below; the output stride is read off the shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import nn as dsnn
from dsjax.models import registry, resnet, supernet
from dsjax.nas import space as space_lib
from dsjax.nas.derivation import choices_from_dict, load_architecture
from dsjax.nas.space import BlockChoice, SearchSpace
from dsjax.precision import LayerPrecision, PrecisionPlan

HEATMAP_PRIOR_BIAS = -2.19  # log(0.1 / 0.9): every cell starts at heat 0.1 (the paper's).
GAUSSIAN_ALPHA = 0.54  # TTFNet's elliptical targets: sigma = alpha * box side / 6.
SIZE_WEIGHT = 0.1  # The paper's lambda_size; the offset's weight is 1.
BACKBONES = ("resnet", "DNAS")


class CenterNet(nn.Module):
  """A backbone, a shared 3x3 head trunk and the heatmap, size and offset outputs.

  Attributes:
    num_classes: object classes (heatmap channels).
    space: the DNAS search space of a "DNAS" backbone; None for a ResNet backbone.
    architecture: the derived blocks of a searched backbone; None: the supernet.
    relaxation: the supernet's relaxation (`dsjax.nas.relaxation.RELAXATIONS`).
    stage_sizes: a ResNet backbone's blocks per stage.
    widths: a ResNet backbone's channels per stage.
    head_channels: width of the head trunk.
    precision: compute dtype and per-layer plan, handed to every layer.
  """

  num_classes: int
  space: SearchSpace | None = None
  architecture: tuple[BlockChoice, ...] | None = None
  relaxation: str = "gumbel"
  stage_sizes: tuple[int, ...] = (1, 1, 1)
  widths: tuple[int, ...] = (16, 32, 64)
  head_channels: int = 64
  precision: LayerPrecision = LayerPrecision()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, temperature: Any = 1.0,
               aux_skip: Any = 0.0) -> jax.Array:
    """Returns float32 [batch, h, w, num_classes + 4]: heatmap logits, sizes, offsets.

    Args:
      images: NHWC float images.
      train: batch statistics (and Gumbel sampling in a searched backbone).
      temperature: the supernet's relaxation temperature (a search's schedule).
      aux_skip: the supernet's DARTS- auxiliary skip weight.
    """
    precision = self.precision
    if self.space is not None:
      x = supernet.backbone_features(images, self.space, self.architecture, self.relaxation,
                                     precision, train=train, temperature=temperature,
                                     aux_skip=aux_skip)
    else:
      x = resnet.resnet_features(images, self.stage_sizes, self.widths, bn_momentum=0.9,
                                 precision=precision, train=train)
    x = nn.relu(dsnn.Conv(self.head_channels, (3, 3), precision=precision, name="head_conv")(x))
    heatmap = dsnn.Conv(self.num_classes, (1, 1), precision=precision, name="heatmap",
                        bias_init=nn.initializers.constant(HEATMAP_PRIOR_BIAS))(x)
    size = dsnn.Conv(2, (1, 1), precision=precision, name="size")(x)
    offset = dsnn.Conv(2, (1, 1), precision=precision, name="offset")(x)
    return jnp.concatenate([heatmap, size, offset], axis=-1).astype(jnp.float32)


def encode_targets(boxes: jax.Array, classes: jax.Array, grid: tuple[int, int],
                   num_classes: int, stride: int) -> dict[str, jax.Array]:
  """CenterNet's training targets for a batch of boxes, on device.

  Args:
    boxes: [batch, M, 4] (x0, y0, x1, y1) in input pixels.
    classes: [batch, M] class indices; -1 marks padding.
    grid: the output (height, width).
    num_classes: heatmap channels.
    stride: input pixels per output cell.

  Returns:
    `heatmap` [batch, h, w, num_classes]: per class, the max over its objects of an
    elliptical Gaussian (sigma = 0.54 x box side / 6, in cells) peaking at 1 on the
    object's centre cell; `index` [batch, M]: each object's centre cell, flattened;
    `size` and `offset` [batch, M, 2]: box (w, h) in cells and the centre's sub-cell
    offset (x, y); `valid` [batch, M]: 1 for real objects.
  """
  height, width = grid
  valid = classes >= 0
  centre = jnp.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2],
                     axis=-1) / stride
  cell = jnp.clip(jnp.floor(centre), 0, jnp.asarray([width - 1, height - 1], jnp.float32))
  size = jnp.stack([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], -1) / stride
  sigma = jnp.maximum(GAUSSIAN_ALPHA * size / 6.0, 1e-2)
  xs = jnp.arange(width, dtype=jnp.float32)
  ys = jnp.arange(height, dtype=jnp.float32)

  def add_object(heatmap, obj):
    cell_m, sigma_m, class_m, valid_m = obj  # [batch, 2], [batch, 2], [batch], [batch]
    gx = jnp.exp(-(xs - cell_m[:, :1]) ** 2 / (2 * sigma_m[:, :1] ** 2))  # [batch, w]
    gy = jnp.exp(-(ys - cell_m[:, 1:]) ** 2 / (2 * sigma_m[:, 1:] ** 2))  # [batch, h]
    onehot = jax.nn.one_hot(class_m, num_classes) * valid_m[:, None]  # [batch, classes]
    gaussian = gy[:, :, None, None] * gx[:, None, :, None] * onehot[:, None, None, :]
    return jnp.maximum(heatmap, gaussian), None

  # One object at a time: [batch, h, w, classes] of memory, not M times that (COCO: 100).
  heatmap = jnp.zeros((boxes.shape[0], height, width, num_classes), jnp.float32)
  objects = (cell.swapaxes(0, 1), sigma.swapaxes(0, 1), jnp.maximum(classes, 0).swapaxes(0, 1),
             valid.swapaxes(0, 1).astype(jnp.float32))
  heatmap, _ = jax.lax.scan(add_object, heatmap, objects)
  index = (cell[..., 1] * width + cell[..., 0]).astype(jnp.int32)
  return {"heatmap": heatmap, "index": index, "size": size, "offset": centre - cell,
          "valid": valid.astype(jnp.float32)}


def focal_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed per example.

  Args:
    logits: [batch, h, w, classes] heatmap logits.
    target: [batch, h, w, classes] Gaussian targets; cells equal to 1 are the positives.

  Returns:
    [batch] sums over cells and classes (the caller divides by the object count).
  """
  prob = jax.nn.sigmoid(logits)
  positive = target >= 1.0
  pos = -((1 - prob) ** 2) * jax.nn.log_sigmoid(logits)
  neg = -((1 - target) ** 4) * prob ** 2 * jax.nn.log_sigmoid(-logits)
  return jnp.sum(jnp.where(positive, pos, neg), axis=(1, 2, 3))


def detection_losses(outputs: jax.Array, targets: dict[str, jax.Array], num_classes: int
                     ) -> dict[str, jax.Array]:
  """Per-example loss sums of the model's outputs against `encode_targets`' targets.

  Returns:
    `heatmap` (focal), `size` and `offset` (L1 at the centre cells) per example, and
    `loss` = heatmap + 0.1 size + offset (the paper's weights); divided by the batch's
    object count they are CenterNet's losses.
  """
  batch, height, width, _ = outputs.shape
  flat = outputs.reshape(batch, height * width, -1)
  at_centres = jnp.take_along_axis(flat, targets["index"][..., None], axis=1)  # [b, M, c+4]
  valid = targets["valid"][..., None]
  size = jnp.sum(jnp.abs(at_centres[..., num_classes:num_classes + 2] - targets["size"]) * valid,
                 axis=(1, 2))
  offset = jnp.sum(jnp.abs(at_centres[..., num_classes + 2:] - targets["offset"]) * valid,
                   axis=(1, 2))
  heatmap = focal_loss(outputs[..., :num_classes], targets["heatmap"])
  return {"heatmap": heatmap, "size": size, "offset": offset,
          "loss": heatmap + SIZE_WEIGHT * size + offset}


def decode(outputs: jax.Array, num_classes: int, stride: int, max_detections: int
           ) -> dict[str, jax.Array]:
  """The top `max_detections` heatmap peaks of each image as boxes.

  A peak is a cell whose heat is the maximum of its 3x3 neighbourhood (CenterNet's
  replacement for NMS); its box is centred at (cell + offset) with the predicted size.

  Args:
    outputs: [batch, h, w, num_classes + 4] model outputs.
    num_classes: heatmap channels.
    stride: input pixels per output cell.
    max_detections: boxes kept per image (COCO scores at most 100).

  Returns:
    `boxes` [batch, K, 4] (x0, y0, x1, y1) in input pixels, `scores` [batch, K] (heat in
    (0, 1), descending) and `classes` [batch, K] int32, K = min(max_detections, cells x
    classes).
  """
  batch, height, width, _ = outputs.shape
  heat = jax.nn.sigmoid(outputs[..., :num_classes])
  pooled = jax.lax.reduce_window(heat, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                 "SAME")
  heat = jnp.where(heat == pooled, heat, 0.0)
  count = min(max_detections, height * width * num_classes)
  scores, flat_index = jax.lax.top_k(heat.reshape(batch, -1), count)
  cell, classes = jnp.divmod(flat_index, num_classes)
  ys, xs = jnp.divmod(cell, width)
  flat = outputs.reshape(batch, height * width, -1)
  at_peaks = jnp.take_along_axis(flat, cell[..., None], axis=1)
  size = at_peaks[..., num_classes:num_classes + 2]
  centre_x = xs.astype(jnp.float32) + at_peaks[..., num_classes + 2]
  centre_y = ys.astype(jnp.float32) + at_peaks[..., num_classes + 3]
  boxes = jnp.stack([centre_x - size[..., 0] / 2, centre_y - size[..., 1] / 2,
                     centre_x + size[..., 0] / 2, centre_y + size[..., 1] / 2], -1) * stride
  return {"boxes": boxes, "scores": scores, "classes": classes.astype(jnp.int32)}


# The `model` sections (`ModelSpec.defaults`). The DNAS space's own `head` stays "none":
# the detector's head is its own.
_HEAD = {"head_channels": 64}
RESNET_DEFAULTS = {"backbone": {"type": "resnet", "stage_sizes": (1, 1, 1),
                                "widths": (16, 32, 64)}, **_HEAD}
DNAS_DEFAULTS = {"backbone": {"type": "DNAS", **dataclasses.asdict(SearchSpace(head="none"))},
                 "relaxation": "gumbel", "architecture": "", **_HEAD}


def _backbone_type(model_config: Any) -> str:
  kind = str(model_config["backbone"].get("type", ""))
  return "DNAS" if kind.upper() == "DNAS" else kind.lower()


def build(model_config: Any, num_classes: int, compute_dtype: Any,
          plan: PrecisionPlan | None = None) -> CenterNet:
  """The registry `build` function of the CenterNet models (`ModelSpec.build`).

  Args:
    model_config: the `model` section: `backbone` (`type` "resnet" with `stage_sizes` and
      `widths`, or "DNAS" with the search-space fields), `head_channels`, and for DNAS
      `relaxation` and `architecture` (a searched architecture.json; empty: the supernet).
    num_classes: object classes.
    compute_dtype: compute dtype.
    plan: per-layer precision plan, or None.

  Returns:
    The detector.
  """
  precision = LayerPrecision(compute_dtype, plan)
  head_channels = int(model_config["head_channels"])
  backbone = model_config["backbone"]
  if _backbone_type(model_config) == "resnet":
    return CenterNet(num_classes=num_classes, stage_sizes=tuple(backbone["stage_sizes"]),
                     widths=tuple(backbone["widths"]), head_channels=head_channels,
                     precision=precision)
  space = space_lib.from_config(backbone)
  path = model_config.get("architecture") or ""
  architecture = choices_from_dict(load_architecture(path, space)) if path else None
  return CenterNet(num_classes=num_classes, space=space, architecture=architecture,
                   relaxation=model_config.get("relaxation", "gumbel"),
                   head_channels=head_channels, precision=precision)


def output_stride(model_config: Any) -> int:
  """Input pixels per output cell of a CenterNet model's backbone."""
  backbone = model_config["backbone"]
  if _backbone_type(model_config) == "resnet":
    return 2 ** (len(tuple(backbone["stage_sizes"])) - 1)
  space = space_lib.from_config(backbone)
  stride = 1
  for index in range(space.num_blocks):
    stride *= space.stride(index)
  return stride


def _check(expected: str, other_model: str) -> Any:
  def check(model_config: Any) -> list[str]:
    kind = _backbone_type(model_config)
    if kind != expected:
      return [f"backbone.type must be {expected!r} for this model, got "
              f"{model_config['backbone'].get('type')!r}; for a {kind!r} backbone use "
              f"--model {other_model}"]
    problems = []
    if int(model_config["head_channels"]) < 1:
      problems.append(f"head_channels must be >= 1, got {model_config['head_channels']}")
    if expected == "resnet":
      problems += resnet.check_config(model_config["backbone"])
    else:
      problems += supernet.check_config(model_config)
      if not problems and space_lib.from_config(model_config["backbone"]).head != "none":
        problems.append("backbone.head must be 'none': the detector's head is its own "
                        "(heatmap, size and offset convolutions)")
    if not problems and output_stride(model_config) < 2:
      problems.append("the backbone does not downsample (output stride 1): CenterNet "
                      "predicts on a strided grid; give it stride-2 stages or blocks")
    return problems
  return check


registry.register(registry.ModelSpec(
    name="centernet-resnet", build=build, defaults=RESNET_DEFAULTS, dataset="digits-detection",
    config_file="det_digits.py", check=_check("resnet", "centernet-dnas"), task="detection"))
registry.register(registry.ModelSpec(
    name="centernet-dnas", build=build, defaults=DNAS_DEFAULTS, dataset="digits-detection",
    config_file="det_digits_dnas.py", check=_check("DNAS", "centernet-resnet"),
    searchable=True, task="detection"))
