"""Gradient compression: bytes per step, reduction vs dense, accuracy and step time per mode.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_compression.py \\
      --out runs/bench/compression.json

Each mode is one `train_and_evaluate` run of the digits CNN on an all-data-parallel mesh
(every device a replica). Bytes are read from the compiled HLO of the compressed step and
of the same step with XLA's dense all-reduce (operand bytes x participants).
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

MODES = ("none", "topk:0.01", "topk:0.001", "topk:0.001,momentum=0.9,warmup_steps=100",
         "threshold:0.01", "powersgd:4", "topk:0.01,error_feedback=0")


def run_mode(mode: str, args: argparse.Namespace) -> dict:
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.train.steps, config.train.batch_size = args.steps, args.batch_size
  config.optimizer.name, config.optimizer.learning_rate = "momentum", args.learning_rate
  config.optimizer.schedule = "constant"
  if "momentum=" in mode:  # DGC's momentum correction replaces the optimizer's momentum.
    config.optimizer.name = "sgd"
  config.parallel.grad_compression = mode
  config.train.log_every_steps = 10
  config.train.eval_every_steps = config.checkpoint.every_steps = args.steps
  config.logging.progress_bar = config.logging.tensorboard = False
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in
               (Path(workdir) / "metrics.jsonl").read_text().splitlines()][1:]
  return {"mode": mode, "comm_bytes": summary["comm_bytes"],
          "comm_bytes_dense": summary["comm_bytes_dense"],
          "reduction": summary["comm_bytes_dense"] / max(summary["comm_bytes"], 1),
          "test_accuracy": summary["test_accuracy"],
          "step_ms": statistics.median(r["step_ms"] for r in records),
          "sent_fraction": records[-1].get("grad_sent_fraction", 1.0)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--modes", nargs="+", default=list(MODES))
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--out", default="runs/bench/compression.json")
  args = parser.parse_args()
  rows = []
  print(f"{'mode':<44} {'bytes/step':>11} {'dense':>11} {'x less':>7} {'test acc':>8} "
        f"{'step ms':>8}")
  for mode in args.modes:
    row = run_mode(mode, args)
    rows.append(row)
    print(f"{mode:<44} {row['comm_bytes']:11,} {row['comm_bytes_dense']:11,} "
          f"{row['reduction']:7.1f} {row['test_accuracy']:8.4f} {row['step_ms']:8.1f}")
  benchlib.save_result(args.out, "compression", {"config": vars(args), "rows": rows})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
