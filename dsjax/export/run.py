"""`export(workdir)`: a trained run as deployable files, each checked against dsjax.

For each format the function writes the files, reloads them in their runtime (StableHLO
through `jax.export.deserialize`, ONNX through onnxruntime), and records in
`OUT/export.json` what a deployment needs to know: file sizes, the largest difference
from dsjax's own outputs on a test batch, the test metrics computed from that runtime's
outputs, and CPU latency per example at each batch size (onnxruntime with one thread and
with all, jax jitted for reference).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import data
from dsjax.errors import ConfigError
from dsjax.export import convert, measure
from dsjax.export.restore import RestoredRun, restore
from dsjax.train import metrics as metrics_lib

log = logging.getLogger(__name__)

FORMATS = ("stablehlo", "onnx")
_CALIBRATION_ROWS = 64


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
  """Parses `--format stablehlo,onnx` (or a sequence of names) into format names.

  Args:
    text: comma-separated names, or a sequence of them; case and spaces are ignored.

  Returns:
    The formats, in the given order, without repeats.

  Raises:
    ConfigError: an unknown name (with the closest known one), or none at all.
  """
  items = text.split(",") if isinstance(text, str) else list(text)
  formats: list[str] = []
  for item in (str(part).strip().lower() for part in items):
    if not item:
      continue
    if item not in FORMATS:
      close = difflib.get_close_matches(item, FORMATS, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown export format {item!r}{hint}; known formats: "
                        f"{', '.join(FORMATS)}, e.g. --format stablehlo,onnx")
    if item not in formats:
      formats.append(item)
  if not formats:
    raise ConfigError(f"no export format given; pass --format with one or more of "
                      f"{', '.join(FORMATS)}")
  return tuple(formats)


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _check_export_extra(formats: Sequence[str], int8: bool) -> None:
  """Refuses ONNX export without the `export` extra, before anything loads."""
  if "onnx" not in formats:
    return
  needed = ["jax2onnx", "onnx", "onnxruntime"]
  missing = [name for name in needed if _version(name) == "not installed"]
  if missing:
    raise ConfigError(f"ONNX export{' and int8' if int8 else ''} needs {', '.join(missing)}: "
                      "pip install 'dsjax[export]', or export with --format stablehlo")


def _out_dir(run: RestoredRun, out_dir: str | Path | None) -> Path:
  path = Path(out_dir).expanduser().absolute() if out_dir else run.workdir / "export"
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"export folder {path} cannot be created ({error.strerror or error}): "
                      "pass another --out") from error
  if not os.access(path, os.W_OK):
    raise ConfigError(f"export folder {path} is not writable: pass another --out")
  return path


def _calibration(run: RestoredRun, batches: int) -> list[dict[str, np.ndarray]]:
  """Training batches drawn as the trainer draws them (`dsjax.data.BatchIterator`, the
  run's seed), un-augmented: the inputs the deployed model will see. At most
  `_CALIBRATION_ROWS` rows each: onnxruntime's calibrator runs every batch through a copy
  of the model that outputs every intermediate tensor."""
  train = run.dataset.splits["train"]
  batch_size = min(int(run.config.train.batch_size), _CALIBRATION_ROWS,
                   data.num_examples(train))
  iterator = data.BatchIterator(train, batch_size, seed=int(run.config.seed))
  rng = jax.random.PRNGKey(int(run.config.seed))
  prepare = jax.jit(lambda batch, key: run.task.prepare(batch, key, train=False))
  out = []
  for index in range(batches):
    prepared = jax.device_get(prepare(iterator.batch(index), jax.random.fold_in(rng, index)))
    out.append({spec.name: np.asarray(prepared[spec.name], spec.dtype) for spec in run.inputs})
  return out


def _describe_inputs(run: RestoredRun) -> list[dict[str, Any]]:
  return [{"name": spec.name, "shape": [convert.BATCH, *spec.shape], "dtype": spec.dtype}
          for spec in run.inputs]


def export(workdir: str | Path, formats: str | Sequence[str] = FORMATS,
           out_dir: str | Path | None = None, int8: bool = False, *,
           batch_sizes: Sequence[int] = (1, 32), timing_repeats: int = 50,
           calibration_batches: int = 8, max_test_examples: int | None = None) -> dict[str, Any]:
  """Exports the newest checkpoint of a trained run and checks every file it writes.

  Args:
    workdir: the run's folder (`dsjax-train --workdir`).
    formats: "stablehlo" and/or "onnx" (a list, or `--format`'s comma-separated text).
    out_dir: where the files and `export.json` go; default `WORKDIR/export`.
    int8: also write `model.int8.onnx`, quantized with onnxruntime (static, QDQ,
      per-channel weights), calibrated on training batches. Needs "onnx".
    batch_sizes: batch sizes of the latency measurements; the largest is also the test
      batch the outputs are compared on.
    timing_repeats: timed calls per latency figure (median); 0 skips timing.
    calibration_batches: training batches the int8 activation ranges are calibrated on.
    max_test_examples: score only the first this many test examples (None: all).

  Returns:
    What `OUT/export.json` holds: the run, the inputs, and per format its files and
    sizes, `max_abs_diff` from dsjax (and relative to the output scale), the test
    metrics in that runtime, and latency in ms per example.

  Raises:
    CheckpointError: the workdir holds no checkpoint, or one the config cannot rebuild.
    ConfigError: an unknown format, int8 without onnx, a missing export extra, a model
      that needs a setting its config lacks (BERT's sequence length).
    ExportError: an op the ONNX converter cannot express (named with its layer).
  """
  formats = parse_formats(formats)
  if int8 and "onnx" not in formats:
    raise ConfigError("--int8 quantizes the ONNX model: add onnx to --format "
                      "(e.g. --format stablehlo,onnx --int8)")
  _check_export_extra(formats, int8)
  batch_sizes = sorted({int(b) for b in batch_sizes})
  if not batch_sizes or batch_sizes[0] < 1:
    raise ConfigError(f"batch sizes must be positive, got {batch_sizes}")
  run = restore(workdir, jnp.float32)
  out = _out_dir(run, out_dir)
  eval_set = measure.eval_data(run, batch_sizes[-1], max_test_examples)
  reference_runner = measure.jax_runner(run)
  reference = reference_runner(eval_set.held_out)
  input_names = [spec.name for spec in run.inputs]
  report: dict[str, Any] = {
      "workdir": str(run.workdir), "model": run.spec.name, "task": run.task.name,
      "step": run.step, "dtype": "float32", "trained_precision": run.config.precision.policy,
      "inputs": _describe_inputs(run),
      "outputs": [{"name": "logits", "shape": [convert.BATCH, *reference.shape[1:]],
                   "dtype": "float32"}],
      "implementation_overrides": run.overrides,
      "eval": {"split": eval_set.split, "examples": eval_set.examples,
               "compared_examples": len(reference)},
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend()},
      "versions": {name: _version(name) for name in ("jax", "jax2onnx", "onnx", "onnxruntime")},
      "jax": {"runtime": f"jax {jax.__version__}, jit ({jax.default_backend()})",
              "test": measure.evaluate(run, reference_runner, eval_set),
              "latency_ms_per_example": _all_threads(reference_runner, eval_set, batch_sizes,
                                                     timing_repeats)},
      "formats": {},
  }
  summary = run.workdir / "summary.json"
  if summary.is_file():  # The trainer's own figures, computed in jax on the whole split.
    saved = json.loads(summary.read_text())
    report["trainer"] = {key: value for key, value in saved.items()
                         if key.startswith("test_") or key == "steps"}
  infer = run.inference_fn()

  def check(runner: measure.Runner) -> dict[str, Any]:
    return {**measure.difference(reference, runner(eval_set.held_out)),
            "test": measure.evaluate(run, runner, eval_set)}

  timing = (eval_set, batch_sizes, timing_repeats)
  if "stablehlo" in formats:
    files, _ = convert.write_stablehlo(infer, run.inputs, out)
    # The file, not the in-memory export: what a deployment would load.
    reloaded = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
    runner = measure.stablehlo_runner(reloaded)
    report["formats"]["stablehlo"] = {
        "files": files, "runtime": f"jax.export.deserialize + jit (jax {jax.__version__})",
        **check(runner), "latency_ms_per_example": _all_threads(runner, *timing)}
  if "onnx" in formats:
    path = out / "model.onnx"
    files = convert.to_onnx(infer, run.inputs, path, model_name=run.spec.name.replace("-", "_"))
    fp32 = report["formats"]["onnx"] = _onnx_entry(path, files, input_names, check, *timing)
    if int8:
      calibration = _calibration(run, calibration_batches)
      files = convert.quantize_int8(path, out / "model.int8.onnx", calibration)
      entry = _onnx_entry(out / "model.int8.onnx", files, input_names, check, *timing)
      entry["quantization"] = {
          "method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
          "weights": "int8, per channel", "activations": "int8, min/max calibrated",
          "calibration": {"split": "train", "batches": len(calibration),
                          "batch_size": len(next(iter(calibration[0].values())))}}
      entry["size_vs_fp32"] = files["model.int8.onnx"] / fp32["files"]["model.onnx"]
      entry["test_change_vs_fp32"] = {key: entry["test"][key] - value
                                      for key, value in fp32["test"].items()}
      entry["accuracy_drop_points"] = -100 * entry["test_change_vs_fp32"]["accuracy"]
      report["formats"]["onnx_int8"] = entry
  metrics_lib.write_json(out / "export.json", report)
  log.info("export: wrote %s (%s)", out, ", ".join(report["formats"]))
  return metrics_lib.to_python(report)


def _all_threads(runner: measure.Runner, eval_set: measure.EvalData, batch_sizes: Sequence[int],
                 timing_repeats: int) -> dict[str, Any]:
  """jax's latency (XLA:CPU uses every core; it has no per-call thread setting)."""
  if timing_repeats < 1:
    return {}
  return {"all_threads": measure.latencies(runner, eval_set.held_out, batch_sizes,
                                           timing_repeats)}


def _onnx_entry(path: Path, files: dict[str, int], input_names: Sequence[str], check: Any,
                eval_set: measure.EvalData, batch_sizes: Sequence[int],
                timing_repeats: int) -> dict[str, Any]:
  """Checks and times one ONNX file in onnxruntime (one thread, and all threads)."""
  single = measure.onnx_runner(path, input_names, threads=1)
  entry = {"files": files, "runtime": f"onnxruntime {_version('onnxruntime')} (CPU)",
           "opset": convert.OPSET, **check(single), "latency_ms_per_example": {}}
  if timing_repeats > 0:
    entry["latency_ms_per_example"] = {
        "1_thread": measure.latencies(single, eval_set.held_out, batch_sizes, timing_repeats),
        "all_threads": measure.latencies(measure.onnx_runner(path, input_names, threads=0),
                                         eval_set.held_out, batch_sizes, timing_repeats)}
  return entry
