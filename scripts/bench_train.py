"""Training throughput and MFU of a model across batch sizes (and precisions).

  python scripts/bench_train.py --model cnn-digits --batch-sizes 32 128 512 \\
      --out runs/bench/train.json [--plot docs/train_throughput.png]

Each point is a short `train_and_evaluate` run in a fresh workdir; throughput and MFU
are medians of the logged steps after the first (which carries warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from dsjax import config as config_lib  # noqa: E402
from dsjax.train import train_and_evaluate  # noqa: E402


def run_point(model: str, batch_size: int, preset: str, steps: int) -> dict[str, float]:
  config = config_lib.with_model_defaults(config_lib.base_config(), model)
  config.train.batch_size, config.train.steps = batch_size, steps
  config.train.log_every_steps = 1
  config.train.eval_every_steps = config.checkpoint.every_steps = steps
  config.precision.policy = preset
  config.logging.progress_bar = config.logging.tensorboard = False
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in
               (Path(workdir) / "metrics.jsonl").read_text().splitlines()][1:]
  median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
  return {"batch_size": batch_size, "precision": preset, "steps": steps,
          "examples_per_sec": median("examples_per_sec"), "step_ms": median("step_ms"),
          "mfu": median("mfu"), "tflops_per_device": median("tflops_per_device"),
          "flops_per_step": summary["flops_per_step"]}


def plot(points: list[dict[str, float]], path: str, title: str) -> None:
  import matplotlib  # Optional: `pip install -e '.[bench]'`.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for preset in sorted({p["precision"] for p in points}):
    series = [p for p in points if p["precision"] == preset]
    sizes = [p["batch_size"] for p in series]
    left.plot(sizes, [p["examples_per_sec"] for p in series], marker="o", label=preset)
    right.plot(sizes, [100 * p["mfu"] for p in series], marker="o", label=preset)
  for axis, label in ((left, "examples / s"), (right, "MFU (%)")):
    axis.set_xscale("log", base=2)
    axis.set_xlabel("global batch size")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    axis.legend()
  fig.suptitle(title)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cnn-digits")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
  parser.add_argument("--precisions", nargs="+", default=["fp32", "mixed"])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--out", default="runs/bench/train.json")
  parser.add_argument("--plot", default="")
  args = parser.parse_args()
  points = [run_point(args.model, size, preset, args.steps)
            for preset in args.precisions for size in args.batch_sizes]
  print(f"{'precision':<10} {'batch':>6} {'ex/s':>9} {'step ms':>8} {'MFU':>7}")
  for p in points:
    print(f"{p['precision']:<10} {p['batch_size']:>6} {p['examples_per_sec']:>9.0f} "
          f"{p['step_ms']:>8.2f} {p['mfu']:>6.1%}")
  env = benchlib.environment()
  if args.plot:
    plot(points, args.plot, f"{args.model} on {env['device_kind']} ({env['backend']})")
    print(f"wrote {args.plot}")
  path = benchlib.save_result(args.out, "train", {"config": vars(args), "points": points})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
