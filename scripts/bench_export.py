"""Edge deployment of the digits models: onnxruntime vs jax latency, int8 size and accuracy.

  python scripts/bench_export.py --out runs/bench/export.json        # ~6 min on 2 cores

Trains the hand-designed digits CNN (configs/digits_cnn.py) and a searched network
(configs/digits_dnas.py: search, then retrain the derived architecture), or reuses the
runs already in --runs, then exports each with `dsjax.export.export(..., int8=True)`.
Reported against the issue's targets:

* onnxruntime with one thread at batch 1 (a Raspberry-Pi-like setting) is no slower per
  example than jitted jax (which uses every core);
* the int8 file is at most 30% of the float32 file, losing at most 1 point of accuracy;
* the searched network's int8 file is at most 1/10 of the hand-designed float32 file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from dsjax.export import export  # noqa: E402
from dsjax.train import (
  search_architecture,  # noqa: E402
  train_and_evaluate,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str) -> Any:
  path = ROOT / "configs" / name
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def trained_cnn(runs: Path, steps: int | None) -> Path:
  config = load_config("digits_cnn.py")
  config.train.steps = steps or config.train.steps
  config.logging.progress_bar = False
  train_and_evaluate(config, runs / "cnn")  # A finished run trains nothing more.
  return runs / "cnn"


def trained_searched(runs: Path, search_steps: int | None, steps: int | None) -> Path:
  config = load_config("digits_dnas.py")
  config.search.steps = search_steps or config.search.steps
  config.search.warmup_steps = min(config.search.warmup_steps, config.search.steps // 4)
  config.train.steps = steps or config.train.steps
  config.logging.progress_bar = False
  searched = search_architecture(config, runs / "dnas-search")
  config.model.architecture = searched["architecture"]
  train_and_evaluate(config, runs / "dnas")
  return runs / "dnas"


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def summarize(report: dict[str, Any]) -> dict[str, Any]:
  """The figures the targets are about, from one export.json."""
  formats = report["formats"]
  fp32, int8 = formats["onnx"], formats["onnx_int8"]
  jax_latency = report["jax"]["latency_ms_per_example"]["all_threads"]
  return {
      "model": report["model"],
      "jax_batch1_ms": jax_latency["batch_1"], "jax_batch32_ms": jax_latency["batch_32"],
      "ort1_batch1_ms": fp32["latency_ms_per_example"]["1_thread"]["batch_1"],
      "ort1_batch32_ms": fp32["latency_ms_per_example"]["1_thread"]["batch_32"],
      "ort_all_batch1_ms": fp32["latency_ms_per_example"]["all_threads"]["batch_1"],
      "int8_ort1_batch1_ms": int8["latency_ms_per_example"]["1_thread"]["batch_1"],
      "int8_ort1_batch32_ms": int8["latency_ms_per_example"]["1_thread"]["batch_32"],
      "fp32_bytes": fp32["files"]["model.onnx"], "int8_bytes": int8["files"]["model.int8.onnx"],
      "int8_vs_fp32_size": int8["size_vs_fp32"],
      "jax_accuracy": report["jax"]["test"]["accuracy"],
      "fp32_accuracy": fp32["test"]["accuracy"], "int8_accuracy": int8["test"]["accuracy"],
      "int8_accuracy_drop_points": int8["accuracy_drop_points"],
      "onnx_max_rel_diff": fp32["max_rel_diff"], "int8_max_rel_diff": int8["max_rel_diff"],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/bench/export-runs",
                      help="where the trained runs live (reused when already trained)")
  parser.add_argument("--cnn-steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--search-steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--retrain-steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--repeats", type=int, default=200, help="timed calls per latency")
  parser.add_argument("--out", default="runs/bench/export.json")
  args = parser.parse_args()

  load_before = os.getloadavg()  # Latency on a shared machine depends on its load.
  runs = Path(args.runs).absolute()
  workdirs = {"hand-designed CNN": trained_cnn(runs, args.cnn_steps),
              "searched (DNAS)": trained_searched(runs, args.search_steps, args.retrain_steps)}
  rows = {}
  for label, workdir in workdirs.items():
    report = export(workdir, formats=("stablehlo", "onnx"), int8=True,
                    timing_repeats=args.repeats)
    rows[label] = summarize(report)
  cnn, searched = rows["hand-designed CNN"], rows["searched (DNAS)"]
  targets = {label: {"ort_1_thread_batch1_not_slower_than_jax":
                         r["ort1_batch1_ms"] <= r["jax_batch1_ms"],
                     "int8_at_most_30pct_of_fp32": r["int8_vs_fp32_size"] <= 0.30,
                     "int8_loses_at_most_1_point": r["int8_accuracy_drop_points"] <= 1.0}
             for label, r in rows.items()}
  ratio = searched["int8_bytes"] / cnn["fp32_bytes"]
  targets["searched_int8_vs_cnn_fp32_size"] = ratio
  targets["searched_int8_at_most_tenth_of_cnn_fp32"] = ratio <= 0.1

  print(f"{'model':<18} {'jax b1':>8} {'ORT1 b1':>8} {'ORT1 b32':>9} {'int8 b1':>8} "
        f"{'fp32 KB':>8} {'int8 KB':>8} {'ratio':>6} {'acc fp32':>9} {'acc int8':>9}")
  for label, r in rows.items():
    print(f"{label:<18} {r['jax_batch1_ms']:>8.4f} {r['ort1_batch1_ms']:>8.4f} "
          f"{r['ort1_batch32_ms']:>9.4f} {r['int8_ort1_batch1_ms']:>8.4f} "
          f"{r['fp32_bytes'] / 1024:>8.1f} {r['int8_bytes'] / 1024:>8.1f} "
          f"{r['int8_vs_fp32_size']:>6.1%} {r['fp32_accuracy']:>9.4f} {r['int8_accuracy']:>9.4f}")
  print("(latency: ms per example; ORT1: onnxruntime with one intra-op thread)")
  for name, value in targets.items():
    if isinstance(value, dict):
      print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
    else:
      print(f"  {name}: {value:.3f}" if isinstance(value, float) else f"  {name}: {value}")
  path = benchlib.save_result(args.out, "export", {
      "config": {"runs": str(runs), "repeats": args.repeats, "cnn_steps": args.cnn_steps,
                 "search_steps": args.search_steps, "retrain_steps": args.retrain_steps},
      "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
      "load_average": {"before": load_before, "after": os.getloadavg()},
      "models": rows, "targets": targets})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
