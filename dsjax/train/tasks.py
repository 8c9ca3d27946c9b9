"""Training tasks: what a model is fed, and how its outputs become a loss and metrics.

A task turns a batch of host data into the model's call arguments (after any on-device
preparation: MLM masking, image augmentation) and scores the model's outputs. Scores are
per example: `loss` and `correct` are sums over the example's scored units (1 for an
image or a click, the masked tokens of a sequence) and `weight` counts those units, so
the mean loss of a batch is `sum(loss) / sum(weight)` whatever the task.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsjax.errors import ConfigError

Batch = Mapping[str, jax.Array]
TASKS = ("classification", "mlm", "ctr")
# An evaluation batch's position of each example in its split (`dsjax.train.evaluate`):
# random evaluation inputs (MLM masks) are drawn per example from it.
EXAMPLE_INDEX = "example_index"


@dataclasses.dataclass(frozen=True)
class Task:
  """How one kind of model is trained and evaluated.

  Attributes:
    name: one of `TASKS`.
    augment: classification only: random crop + flip of training images.
    mlm_probability: mlm only: share of tokens masked and predicted.
    mask_id: mlm only: the [MASK] token id.
    vocab_size: mlm only: the vocabulary size.
    special_ids: mlm only: token ids never masked ([PAD], [CLS], [SEP], ...).
    max_predictions: mlm only: positions per sequence the MLM head scores in training
      (`data.max_predictions`; see `prediction_slots`); 0: every position.
  """

  name: str
  augment: bool = False
  mlm_probability: float = 0.15
  mask_id: int = 0
  vocab_size: int = 0
  special_ids: tuple[int, ...] = ()
  max_predictions: int = -1

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

  @property
  def input_keys(self) -> tuple[str, ...]:
    """The batch entries the model reads (the rest are targets)."""
    return {"classification": ("image",), "ctr": ("dense", "sparse"),
            "mlm": ("input_ids", "attention_mask", "token_type_ids")}[self.name]

  def prepare(self, batch: Batch, rng: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """On-device preparation inside the jitted step (deterministic given `rng`).

    A batch with an `EXAMPLE_INDEX` entry (evaluation) draws each example's randomness
    (its MLM mask) from `rng` folded with its index, so an example is corrupted the same
    way whatever the batch size, mesh or pipeline that evaluates it.

    MLM training batches (`train`, `prediction_slots(length) > 0`) also get
    `mlm_positions` [batch, slots]: the masked positions, which the model gathers before
    its vocabulary projection (as NVIDIA's BERT does), and `mlm_labels` / `mlm_weights`
    for those slots (padded slots weigh 0). A sequence that masked more tokens than there
    are slots keeps its first `slots` and gets the others back unmasked, so the loss is
    the full head's on the batch the model sees. Evaluation scores every position.
    """
    batch = dict(batch)
    index = batch.pop(EXAMPLE_INDEX, None)
    if self.name == "classification" and self.augment and train:
      from dsjax.data import augment  # noqa: PLC0415 - only image runs need it.
      batch["image"] = augment.random_crop_flip(rng, batch["image"])
    elif self.name == "mlm":
      from dsjax.data import text  # noqa: PLC0415 - only token runs need it.
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
    """Positional and keyword arguments of `model.apply` (besides the variables)."""
    if self.name == "classification":
      return (batch["image"],), {}
    if self.name == "ctr":
      return (batch["dense"], batch["sparse"]), {}
    kwargs = {"attention_mask": batch["attention_mask"],
              "token_type_ids": batch["token_type_ids"]}
    if "mlm_positions" in batch:  # Training: the head scores the masked positions only.
      kwargs["mlm_positions"] = batch["mlm_positions"]
    return (batch["input_ids"],), kwargs

  def score(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Per-example `loss`, `correct` and `weight` sums (and `score` for ctr), float32."""
    outputs = outputs.astype(jnp.float32)
    if self.name == "classification":
      labels = batch["label"]
      return {"loss": optax.softmax_cross_entropy_with_integer_labels(outputs, labels),
              "correct": (jnp.argmax(outputs, -1) == labels).astype(jnp.float32),
              "weight": jnp.ones(labels.shape, jnp.float32)}
    if self.name == "ctr":
      labels = batch["label"].astype(jnp.float32)
      return {"loss": optax.sigmoid_binary_cross_entropy(outputs, labels),
              "correct": ((outputs > 0) == (labels > 0.5)).astype(jnp.float32),
              "weight": jnp.ones(labels.shape, jnp.float32),
              "score": jax.nn.sigmoid(outputs)}
    weights = batch["mlm_weights"]
    token_loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["mlm_labels"])
    token_correct = (first_argmax(outputs) == batch["mlm_labels"]).astype(jnp.float32)
    return {"loss": jnp.sum(token_loss * weights, -1),
            "correct": jnp.sum(token_correct * weights, -1),
            "weight": jnp.sum(weights, -1)}

  def example_batch(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """One example of a split, for shape inference at init."""
    return {key: arrays[key][:1] for key in self.input_keys}


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
    name: the model's task (`ModelSpec.task`).
    data_config: the `data` config section.
    metadata: `Dataset.metadata`.

  Returns:
    The Task.

  Raises:
    ConfigError: an unknown task, or a dataset that lacks what the task needs.
  """
  if name not in TASKS:
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  if name == "classification":
    return Task(name, augment=bool(data_config.augment))
  if name == "mlm":
    missing = [key for key in ("mask_id", "vocab_size", "special_ids") if key not in metadata]
    if missing:
      raise ConfigError(f"dataset {data_config.name!r} has no token metadata "
                        f"({', '.join(missing)}); masked-LM models train on "
                        "--config.data.name=text")
    return Task(name, mlm_probability=float(data_config.mlm_probability),
                mask_id=int(metadata["mask_id"]), vocab_size=int(metadata["vocab_size"]),
                special_ids=tuple(int(i) for i in metadata["special_ids"]),
                max_predictions=int(data_config.get("max_predictions", -1)))
  return Task(name)


def check_dataset(task: Task, splits: Mapping[str, Mapping[str, Any]], model: str,
                  dataset: str) -> None:
  """Raises ConfigError when the dataset does not provide what the model's task reads."""
  needed = set(task.input_keys) | ({"label"} if task.name != "mlm" else set())
  missing = sorted(needed - set(splits["train"]))
  if missing:
    raise ConfigError(f"model {model} ({task.name}) cannot train on dataset {dataset!r}: it "
                      f"has no {', '.join(missing)}; pick a dataset with "
                      "--config.data.name that matches the model")
