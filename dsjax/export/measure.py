"""Comparing runtimes on a run's own data: output differences, test metrics, CPU latency.

Every runtime (jax, a reloaded StableHLO module, onnxruntime in float32 or int8) is a
`Runner`: input arrays in, output array out. Test batches are prepared once, the way
`dsjax.train.evaluate` prepares them (same padding, and for BERT the same per-example
MLM masks), and scored by the task's own `score`, so a runtime's metrics are the
trainer's test metrics computed from that runtime's outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from dsjax import data
from dsjax.export.restore import RestoredRun
from dsjax.measure import auc
from dsjax.train import tasks

Runner = Callable[[Sequence[np.ndarray]], np.ndarray]


def jax_runner(run: RestoredRun) -> Runner:
  """dsjax itself: the jitted inference function, the weights passed as an argument."""
  apply, variables = jax.jit(run.apply_fn()), run.variables
  return lambda arrays: np.asarray(apply(variables, *arrays))


def stablehlo_runner(exported: jax.export.Exported) -> Runner:
  """A deserialized StableHLO module, jitted (compiled once per batch size)."""
  call = jax.jit(exported.call)
  return lambda arrays: np.asarray(call(*arrays))


def onnx_runner(path: Path, input_names: Sequence[str], threads: int) -> Runner:
  """onnxruntime on the CPU with `threads` intra-op threads (0: one per core).

  One thread with sequential execution is the setting of a small edge board (a
  Raspberry Pi's core count is 4, its cores slow): latency without parallel speed-up.
  """
  import onnxruntime  # noqa: PLC0415 - the `export` extra.

  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
  options.log_severity_level = 3  # Errors only: not its notes on the graph it optimises.
  session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
  names = list(input_names)
  return lambda arrays: session.run(None, dict(zip(names, arrays, strict=True)))[0]


@dataclasses.dataclass(frozen=True)
class EvalData:
  """Prepared test batches, shared by every runtime.

  Attributes:
    split: the split's name ("test", or "val" when the run has no test split).
    batches: `(inputs, prepared batch, mask)` per fixed-size (padded) batch.
    held_out: the real rows of the first batch, the batch outputs are compared on.
    examples: real examples in the split (after any cap).
  """

  split: str
  batches: list[tuple[list[np.ndarray], dict[str, np.ndarray], np.ndarray]]
  held_out: list[np.ndarray]
  examples: int


def eval_data(run: RestoredRun, batch_size: int, max_examples: int | None = None) -> EvalData:
  """Prepares the test split in batches of `batch_size` (the last one padded).

  Args:
    run: the restored run.
    batch_size: rows per batch.
    max_examples: evaluate only the first this many examples (None: all).

  Returns:
    The prepared batches.
  """
  splits = run.dataset.splits
  name = next((s for s in ("test", "val") if splits.get(s) and data.num_examples(splits[s])),
              "train")
  split = splits[name]
  if max_examples:
    split = {key: value[:max_examples] for key, value in split.items()}
  count = data.num_examples(split)
  batch_size = min(batch_size, count)
  # dsjax.train's eval step draws its preparation key from PRNGKey(0) this way.
  rng = jax.random.split(jax.random.PRNGKey(0))[0]
  prepare = jax.jit(functools.partial(run.task.prepare, train=False))
  batches = []
  for index, (batch, mask) in enumerate(data.eval_batches(split, batch_size)):
    batch[tasks.EXAMPLE_INDEX] = np.arange(index * batch_size, (index + 1) * batch_size,
                                           dtype=np.int32)
    prepared = jax.device_get(prepare(batch, rng))
    inputs = [np.asarray(prepared[spec.name], spec.dtype) for spec in run.inputs]
    batches.append((inputs, prepared, mask))
  real = int(batches[0][2].sum())
  return EvalData(name, batches, [x[:real] for x in batches[0][0]], count)


def evaluate(run: RestoredRun, runner: Runner, eval_set: EvalData) -> dict[str, float]:
  """The task's test metrics from `runner`'s outputs: loss and accuracy (of the masked
  tokens for BERT), plus AUC for click prediction."""
  score = jax.jit(run.task.score)
  totals = {"loss": 0.0, "correct": 0.0, "weight": 0.0}
  scores, labels = [], []
  for inputs, prepared, mask in eval_set.batches:
    per_example = jax.device_get(score(runner(inputs), prepared))
    for key in totals:
      totals[key] += float(np.sum(np.asarray(per_example[key]) * mask))
    if "score" in per_example:
      keep = mask > 0
      scores.append(np.asarray(per_example["score"])[keep])
      labels.append(np.asarray(prepared["label"])[keep])
  count = max(totals["weight"], 1.0)
  metrics = {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}
  if scores:
    metrics["auc"] = auc.roc_auc(np.concatenate(labels), np.concatenate(scores))
  return metrics


def difference(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
  """The largest absolute difference, and relative to the reference's largest |value|."""
  reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
  diff = float(np.max(np.abs(reference - other))) if reference.size else 0.0
  scale = float(np.max(np.abs(reference))) if reference.size else 0.0
  return {"max_abs_diff": diff, "output_scale": scale,
          "max_rel_diff": diff / scale if scale else diff}


def _rows(array: np.ndarray, count: int) -> np.ndarray:
  """`count` rows of `array`, repeating its rows if it has fewer."""
  repeats = -(-count // len(array))
  return np.concatenate([array] * repeats)[:count]


def latency_ms(runner: Runner, arrays: Sequence[np.ndarray], batch: int, repeats: int,
               max_seconds: float = 3.0) -> float:
  """Median wall time of one call at `batch` rows, per example, in milliseconds.

  Two untimed calls first (compilation, allocation); then `repeats` timed calls, or as
  many as fit in `max_seconds` (at least 3) for a model slow enough that the median is
  steady sooner. The output is fetched to the host in every call, so asynchronous
  dispatch cannot hide work.
  """
  inputs = [_rows(x, batch) for x in arrays]
  for _ in range(2):
    runner(inputs)
  times: list[float] = []
  while len(times) < repeats and (len(times) < 3 or sum(times) < max_seconds):
    start = time.perf_counter()
    runner(inputs)
    times.append(time.perf_counter() - start)
  return float(np.median(times)) / batch * 1e3


def latencies(runner: Runner, arrays: Sequence[np.ndarray], batch_sizes: Sequence[int],
              repeats: int) -> dict[str, float]:
  """`{"batch_B": ms per example}` for each batch size; `{}` when `repeats` is 0."""
  if repeats < 1:
    return {}
  return {f"batch_{b}": latency_ms(runner, arrays, b, repeats) for b in batch_sizes}

