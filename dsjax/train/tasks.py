"""Training tasks: what a model is fed, and how its outputs become a loss and metrics.

A task turns a batch of host data into the model's call arguments (after any on-device
preparation: MLM masking, image augmentation) and scores the model's outputs. Scores are
per example: `loss` and `correct` are sums over the example's scored units (1 for an
image or a click, the masked tokens of a sequence) and `weight` counts those units, so
the mean loss of a batch is `sum(loss) / sum(weight)` whatever the task.

Each task is a `Task` subclass registered under its name (a model's `ModelSpec.task`):
`ClassificationTask`, `CtrTask`, `MlmTask`, `DetectionTask`. A new task is a new subclass with
`@register_task`; `make_task` builds one from the data config and the dataset's metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from dsjax.data import augment, text
from dsjax.errors import ConfigError
from dsjax.models import centernet

Batch = Mapping[str, jax.Array]
# An evaluation batch's position of each example in its split (`dsjax.train.evaluate`):
# random evaluation inputs (MLM masks) are drawn per example from it.
EXAMPLE_INDEX = "example_index"

_REGISTRY: dict[str, type[Task]] = {}


@dataclasses.dataclass(frozen=True)
class Task:
  """How one kind of model is trained and evaluated: the base of the registered tasks.

  `Task(name, **fields)` builds the task registered under `name`: `Task("classification")`
  is a `ClassificationTask()`, `Task("mlm", mask_id=4)` an `MlmTask(mask_id=4)`.

  Attributes:
    name: the registry name (`known_tasks()`); each subclass fixes its own.
    input_keys: the batch entries the model reads.
    target_keys: the batch entries the score reads besides the inputs (a dataset must
      have both; see `check_dataset`).
  """

  name: str
  input_keys: ClassVar[tuple[str, ...]] = ()
  target_keys: ClassVar[tuple[str, ...]] = ("label",)

  def __new__(cls, *args: Any, **kwargs: Any) -> Task:
    if cls is Task:
      cls = task_class(args[0] if args else kwargs.get("name"))
    return super().__new__(cls)

  def __post_init__(self) -> None:
    if _REGISTRY.get(self.name) is not type(self):
      raise ConfigError(f"{type(self).__name__} is registered as task "
                        f"{_task_name(type(self))!r}, not {self.name!r}")

  @classmethod
  def from_data(cls, data_config: Any, metadata: Mapping[str, Any]) -> Task:
    """The task of a run on this data (see `make_task`); the base needs nothing of it."""
    del data_config, metadata
    return cls()

  def prepare(self, batch: Batch, rng: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """On-device preparation inside the jitted step (deterministic given `rng`).

    A batch with an `EXAMPLE_INDEX` entry (evaluation) draws each example's randomness
    from `rng` folded with its index; the entry is dropped. The base passes the rest on.
    """
    del rng, train
    batch = dict(batch)
    batch.pop(EXAMPLE_INDEX, None)
    return batch

  def model_args(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of `model.apply` (besides the variables)."""
    return tuple(batch[key] for key in self.input_keys), {}

  def score(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Per-example `loss`, `correct` and `weight` sums (and `score` for ctr), float32."""
    raise NotImplementedError(f"task {self.name!r} does not score its outputs")

  def example_batch(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """One example of a split, for shape inference at init."""
    return {key: arrays[key][:1] for key in self.input_keys}


def register_task(cls: type[Task]) -> type[Task]:
  """Class decorator: registers a `Task` subclass under its `name` field's default."""
  name = _task_name(cls)
  if name in _REGISTRY:
    raise ValueError(f"task {name!r} is registered twice")
  _REGISTRY[name] = cls
  return cls


def _task_name(cls: type[Task]) -> str:
  return next(field.default for field in dataclasses.fields(cls) if field.name == "name")


def known_tasks() -> list[str]:
  """The registered task names, sorted."""
  return sorted(_REGISTRY)


def task_class(name: str) -> type[Task]:
  """The registered `Task` subclass of a name.

  Raises:
    ConfigError: the name is not registered; the message lists the known ones.
  """
  if name not in _REGISTRY:
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
  return _REGISTRY[name]


@register_task
@dataclasses.dataclass(frozen=True)
class ClassificationTask(Task):
  """Images to class logits, scored by softmax cross-entropy and top-1 accuracy.

  Attributes:
    augment: random crop + flip of training images on device (`dsjax.data.augment`); off
      where the loader already augments them (`metadata["augmented_in_loader"]`).
  """

  name: str = "classification"
  augment: bool = False
  input_keys: ClassVar[tuple[str, ...]] = ("image",)

  @classmethod
  def from_data(cls, data_config: Any, metadata: Mapping[str, Any]) -> Task:
    return cls(augment=bool(data_config.augment)
               and not metadata.get("augmented_in_loader", False))

  def prepare(self, batch: Batch, rng: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    batch = super().prepare(batch, rng, train=train)
    if self.augment and train:
      batch["image"] = augment.random_crop_flip(rng, batch["image"])
    return batch

  def score(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    outputs = outputs.astype(jnp.float32)
    labels = batch["label"]
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(outputs, labels),
            "correct": (jnp.argmax(outputs, -1) == labels).astype(jnp.float32),
            "weight": jnp.ones(labels.shape, jnp.float32)}


@register_task
@dataclasses.dataclass(frozen=True)
class CtrTask(Task):
  """Click prediction: one logit per example, scored by sigmoid cross-entropy; `score`
  (the click probability) feeds the evaluation's ROC AUC."""

  name: str = "ctr"
  input_keys: ClassVar[tuple[str, ...]] = ("dense", "sparse")

  def score(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    outputs = outputs.astype(jnp.float32)
    labels = batch["label"].astype(jnp.float32)
    return {"loss": optax.sigmoid_binary_cross_entropy(outputs, labels),
            "correct": ((outputs > 0) == (labels > 0.5)).astype(jnp.float32),
            "weight": jnp.ones(labels.shape, jnp.float32),
            "score": jax.nn.sigmoid(outputs)}


@register_task
@dataclasses.dataclass(frozen=True)
class MlmTask(Task):
  """Masked-language modelling: tokens masked on device, the masked ones predicted.

  Attributes:
    mlm_probability: share of tokens masked and predicted.
    mask_id: the [MASK] token id.
    vocab_size: the vocabulary size.
    special_ids: token ids never masked ([PAD], [CLS], [SEP], ...).
    max_predictions: positions per sequence the MLM head scores in training
      (`data.max_predictions`; see `prediction_slots`); 0: every position.
  """

  name: str = "mlm"
  mlm_probability: float = 0.15
  mask_id: int = 0
  vocab_size: int = 0
  special_ids: tuple[int, ...] = ()
  max_predictions: int = -1
  input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
  target_keys: ClassVar[tuple[str, ...]] = ()  # The labels are the masked tokens.

  @classmethod
  def from_data(cls, data_config: Any, metadata: Mapping[str, Any]) -> Task:
    missing = [key for key in ("mask_id", "vocab_size", "special_ids") if key not in metadata]
    if missing:
      raise ConfigError(f"dataset {data_config.name!r} has no token metadata "
                        f"({', '.join(missing)}); masked-LM models train on "
                        "--config.data.name=text")
    return cls(mlm_probability=float(data_config.mlm_probability),
               mask_id=int(metadata["mask_id"]), vocab_size=int(metadata["vocab_size"]),
               special_ids=tuple(int(i) for i in metadata["special_ids"]),
               max_predictions=int(data_config.get("max_predictions", -1)))

  def prediction_slots(self, length: int) -> int:
    """How many positions of a `length`-token sequence the MLM head scores in training.

    `max_predictions` when set; -1 derives it from the masking rate: the mean masked count
    plus 4 standard deviations (binomial), so a sequence masks more only about once in
    10^5 (seq 128 at 15%: 36 of 128). 0, or a count not below `length`: every position.
    """
    if self.max_predictions > 0:
      slots = self.max_predictions
    elif self.max_predictions == 0:
      return 0
    else:
      mean = length * self.mlm_probability
      slots = math.ceil(mean + 4.0 * math.sqrt(mean * (1.0 - self.mlm_probability)))
    return slots if slots < length else 0

  def prepare(self, batch: Batch, rng: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Masks the tokens (`dsjax.data.text.mask_tokens`), per example in evaluation.

    An evaluation batch (one with `EXAMPLE_INDEX`) masks each sequence from `rng` folded
    with its index, so an example is corrupted the same way whatever the batch size, mesh
    or pipeline that evaluates it.

    Training batches (`train`, `prediction_slots(length) > 0`) also get `mlm_positions`
    [batch, slots]: the masked positions, which the model gathers before its vocabulary
    projection (as NVIDIA's BERT does), and `mlm_labels` / `mlm_weights` for those slots
    (padded slots weigh 0). A sequence that masked more tokens than there are slots keeps
    its first `slots` and gets the others back unmasked, so the loss is the full head's
    on the batch the model sees. Evaluation scores every position.
    """
    index = batch.get(EXAMPLE_INDEX)
    batch = super().prepare(batch, rng, train=train)
    mask = functools.partial(
        text.mask_tokens, mlm_probability=self.mlm_probability, mask_id=self.mask_id,
        vocab_size=self.vocab_size, special_ids=self.special_ids)
    if index is not None:
      keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, index)
      mask = jax.vmap(mask)
    else:
      keys = rng
    batch["input_ids"], batch["mlm_labels"], batch["mlm_weights"] = mask(
        keys, batch["input_ids"], batch["attention_mask"])
    slots = self.prediction_slots(batch["input_ids"].shape[-1]) if train else 0
    if slots and index is None:
      batch.update(_gather_predictions(batch, slots))
    return batch

  def model_args(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs = {"attention_mask": batch["attention_mask"],
              "token_type_ids": batch["token_type_ids"]}
    if "mlm_positions" in batch:  # Training: the head scores the masked positions only.
      kwargs["mlm_positions"] = batch["mlm_positions"]
    return (batch["input_ids"],), kwargs

  def score(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    outputs = outputs.astype(jnp.float32)
    weights = batch["mlm_weights"]
    token_loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["mlm_labels"])
    token_correct = (first_argmax(outputs) == batch["mlm_labels"]).astype(jnp.float32)
    return {"loss": jnp.sum(token_loss * weights, -1),
            "correct": jnp.sum(token_correct * weights, -1),
            "weight": jnp.sum(weights, -1)}


@register_task
@dataclasses.dataclass(frozen=True)
class DetectionTask(Task):
  """Boxes as CenterNet heatmap peaks (`dsjax.models.centernet`), scored by its losses.

  The images arrive as uint8 and are scaled to [0, 1] on device; training batches may be
  mirrored and zoomed with their boxes (`data.augment`). The targets are encoded on device
  from the padded boxes at the model's output grid (the stride is the input side over the
  output's). Per example, `loss` is the focal + 0.1 size + offset sum and `weight` the
  object count, so the batch loss is CenterNet's (normalised by the objects of the batch);
  `correct` counts the objects whose centre cell scores their class at least 0.3 (the
  evaluation's `accuracy` is that recall). `boxes`, `box_scores` and `box_classes` are the
  decoded top `max_detections` peaks, which the evaluation hands to the COCO evaluator.

  Attributes:
    num_classes: object classes.
    augment: random flip and zoom of training batches.
    max_detections: boxes decoded per image (COCO's evaluation reads at most 100).
  """

  name: str = "detection"
  num_classes: int = 0
  augment: bool = False
  max_detections: int = 100
  input_keys: ClassVar[tuple[str, ...]] = ("image",)
  target_keys: ClassVar[tuple[str, ...]] = ("boxes", "classes")
  recall_threshold: ClassVar[float] = 0.3

  @classmethod
  def from_data(cls, data_config: Any, metadata: Mapping[str, Any]) -> Task:
    if "categories" not in metadata:
      raise ConfigError(f"dataset {data_config.name!r} has no boxes; detection models train "
                        "on --config.data.name=digits-detection or coco")
    return cls(num_classes=len(metadata["categories"]), augment=bool(data_config.augment))

  def prepare(self, batch: Batch, rng: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    batch = super().prepare(batch, rng, train=train)
    image = batch["image"]
    batch["image"] = (image.astype(jnp.float32) / 255.0 if image.dtype == jnp.uint8
                      else image.astype(jnp.float32))
    if self.augment and train:
      batch["image"], batch["boxes"], batch["classes"] = augment.random_flip_scale(
          rng, batch["image"], batch["boxes"], batch["classes"])
    return batch

  def example_batch(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": jnp.asarray(arrays["image"][:1], jnp.float32)}  # As `prepare` gives.

  def score(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    stride = _output_stride(batch["image"].shape[1:3], outputs.shape[1:3])
    targets = centernet.encode_targets(batch["boxes"], batch["classes"], outputs.shape[1:3],
                                       self.num_classes, stride)
    losses = centernet.detection_losses(outputs, targets, self.num_classes)
    batch_size, height, width, _ = outputs.shape
    flat = outputs.reshape(batch_size, height * width, -1)
    at_centres = jnp.take_along_axis(flat, targets["index"][..., None], axis=1)
    own_class = jnp.take_along_axis(at_centres, jnp.maximum(batch["classes"], 0)[..., None],
                                    axis=-1)[..., 0]
    found = jax.nn.sigmoid(own_class) >= self.recall_threshold
    decoded = centernet.decode(outputs, self.num_classes, stride, self.max_detections)
    return {"loss": losses["loss"],
            "correct": jnp.sum(found * targets["valid"], -1),
            "weight": jnp.sum(targets["valid"], -1),
            "boxes": decoded["boxes"], "box_scores": decoded["scores"],
            "box_classes": decoded["classes"]}


def _output_stride(image_shape: tuple[int, ...], grid: tuple[int, ...]) -> int:
  """Input pixels per output cell; a side the backbone's stride does not divide is refused."""
  stride = image_shape[0] // grid[0]
  if tuple(size * stride for size in grid) != tuple(image_shape):
    raise ConfigError(f"the detector's output grid {tuple(grid)} is not the input "
                      f"{tuple(image_shape)} divided by one stride; set "
                      "--config.data.image_size to a multiple of the backbone's stride")
  return stride


def first_argmax(logits: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, -1)`, from two plain reductions (a max, then the first index that
  reaches it; a NaN wins as in argmax). XLA:CPU runs argmax's (value, index) reduction
  unvectorised: over bert-tiny's vocabulary it was 4% of a training step, twice this."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  hit = (logits == top) | jnp.isnan(logits)
  size = logits.shape[-1]
  return jnp.min(jnp.where(hit, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def _gather_predictions(batch: Batch, slots: int) -> dict[str, jax.Array]:
  """The first `slots` masked positions of each sequence, their labels and 0/1 weights.

  A one-hot rank match rather than a scatter: elementwise work and a sum over the length
  axis, which shards over the batch like the rest of the step.
  """
  selected = batch["mlm_weights"] > 0
  rank = jnp.cumsum(selected.astype(jnp.int32), axis=-1) - 1  # Slot of each masked token.
  kept = selected & (rank < slots)
  length = selected.shape[-1]
  match = kept[..., :, None] & (rank[..., :, None] == jnp.arange(slots))  # [..., L, slots]
  positions = jnp.sum(jnp.where(match, jnp.arange(length)[:, None], 0), axis=-2,
                      dtype=jnp.int32)
  labels = batch["mlm_labels"]
  return {"mlm_positions": positions,
          "mlm_labels": jnp.take_along_axis(labels, positions, axis=-1),
          "mlm_weights": jnp.any(match, axis=-2).astype(jnp.float32),
          # Masked tokens beyond the slots are not predicted: give them back their token.
          "input_ids": jnp.where(selected & ~kept, labels, batch["input_ids"])}


def make_task(name: str, data_config: Any, metadata: Mapping[str, Any]) -> Task:
  """Builds the task a model declares, from the data config and the dataset's metadata.

  Args:
    name: the model's task (`ModelSpec.task`), a registered name (`known_tasks()`).
    data_config: the `data` config section.
    metadata: `Dataset.metadata`.

  Returns:
    The Task.

  Raises:
    ConfigError: an unknown task, or a dataset that lacks what the task needs.
  """
  return task_class(name).from_data(data_config, metadata)


def check_dataset(task: Task, splits: Mapping[str, Mapping[str, Any]], model: str,
                  dataset: str) -> None:
  """Raises ConfigError when the dataset does not provide what the model's task reads."""
  missing = sorted(set(task.input_keys + task.target_keys) - set(splits["train"]))
  if missing:
    raise ConfigError(f"model {model} ({task.name}) cannot train on dataset {dataset!r}: it "
                      f"has no {', '.join(missing)}; pick a dataset with "
                      "--config.data.name that matches the model")
