"""Step time, throughput and collective bytes per device mesh, and the pipeline bubble.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_parallel.py \\
      --model bert-tiny --meshes data=8 data=2,model=4 fsdp=8 data=2,model=2,pipe=2 \\
      --out runs/bench/parallel.json

Each mesh is a short `train_and_evaluate` run in a fresh workdir: median step time and
examples/s over the logged steps after the first, and the bytes each collective kind
moves per step, read from the compiled step's HLO.

Pipeline bubble, measured: the GPipe schedule runs every stage in each of its M + P - 1
iterations, idle stages included (on real hardware, each stage on its own device, that
idle work is the bubble). Timing the forward+backward of an 8-layer stack on ONE device,
as the P-stage pipeline (all stages executed one after another) and as a plain scan, gives
the measured bubble 1 - t_scan / t_pipeline, set against the theoretical (P-1)/(M+P-1).
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
from dsjax.parallel import mesh as mesh_lib  # noqa: E402
from dsjax.parallel import pipeline  # noqa: E402
from dsjax.train import train_and_evaluate  # noqa: E402


def run_mesh(args: argparse.Namespace, mesh: str, microbatches: int = 0) -> dict:
  """One short run on `mesh` (`"data=2,model=4"`; `num_devices=N` takes the first N;
  `repeats=R` makes the pipeline circular; a last `rules=...` overrides sharding rules)."""
  mesh, _, rules = mesh.partition(",rules=")
  mesh, _, repeats = mesh.partition(",repeats=")
  mesh, _, devices = mesh.partition(",num_devices=")
  config = config_lib.with_model_defaults(config_lib.base_config(), args.model)
  if config.data.name == "text":
    config.data.seq_len, config.data.vocab_size = args.seq_len, 2048
  config.model.update({k: v for k, v in (("num_layers", args.layers),) if k in config.model})
  config.train.batch_size, config.train.steps = args.batch_size, args.steps
  config.train.log_every_steps = 1
  config.train.eval_every_steps = config.checkpoint.every_steps = 10**6
  config.parallel.microbatches = microbatches
  config.parallel.pipeline_repeats = int(repeats or 1)
  config.parallel.rules = rules
  config.logging.progress_bar = config.logging.tensorboard = False
  for axis, size in mesh_lib.parse_mesh(mesh).items():
    config.mesh[axis] = size
  config.mesh.num_devices = int(devices or 0)
  with tempfile.TemporaryDirectory() as workdir:
    config.data.cache_dir = args.cache_dir or workdir
    summary = train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in
               (Path(workdir) / "metrics.jsonl").read_text().splitlines()][1:]
  median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
  return {"mesh": summary["mesh"], "microbatches": microbatches,
          "step_ms": median("step_ms"), "examples_per_sec": median("examples_per_sec"),
          "collective_bytes": summary.get("collective_bytes", {}),
          "peak_bytes_per_device": summary.get("memory", {}).get("peak_bytes"),
          "params_bytes_per_device": summary.get("memory", {}).get("params_bytes"),
          "final_loss": records[-1]["loss"]}


def measure_bubble(stages: int, microbatches: int, repeats: int = 1, layers: int = 8,
                   batch: int = 32, seq_len: int = 64, hidden: int = 128) -> dict:
  """Forward+backward time of a BERT layer stack, pipelined vs scanned, on one device."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from dsjax.models.bert import BertLayer  # noqa: PLC0415

  layer = BertLayer(4, 4 * hidden, 0.0, 1e-12, jnp.float32, None, "xla")
  x = jax.random.normal(jax.random.key(0), (batch, seq_len, hidden))
  bias = jnp.zeros((batch, 1, 1, seq_len))

  def time_grad(module: pipeline.Pipeline) -> float:
    params = jax.jit(module.init)(jax.random.key(1), x, bias)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x, bias) ** 2)))
    return benchlib.time_steps(lambda: grad(params, x), warmup=2, repeats=10)["median_s"] * 1e3

  times = {"scan": time_grad(pipeline.Pipeline(layer, layers)),
           "pipeline": time_grad(pipeline.Pipeline(layer, layers, stages, microbatches,
                                                   num_repeats=repeats))}
  return {"stages": stages, "microbatches": microbatches, "repeats": repeats,
          "scan_ms": times["scan"], "pipeline_ms": times["pipeline"],
          "measured": 1 - times["scan"] / times["pipeline"],
          "theory": pipeline.bubble_fraction(stages, microbatches, repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="bert-tiny")
  parser.add_argument("--meshes", nargs="+",
                      default=["data=1,num_devices=1", "data=8", "data=2,model=4", "fsdp=8",
                               "data=2,fsdp=2,model=2", "data=2,model=2,pipe=2"])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--pipe", type=int, default=4, help="stages of the bubble measurement")
  parser.add_argument("--cache-dir", default="")
  parser.add_argument("--out", default="runs/bench/parallel.json")
  args = parser.parse_args()

  rows = []
  print(f"{'mesh':<34} {'step ms':>8} {'ex/s':>8} {'param B/dev':>11}  collective bytes/step")
  for mesh in args.meshes:
    row = run_mesh(args, mesh)
    rows.append(row)
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(row["collective_bytes"].items()) if v)
    print(f"{mesh:<34} {row['step_ms']:8.1f} {row['examples_per_sec']:8.1f} "
          f"{row['params_bytes_per_device'] or 0:11,}  {kinds or '-'}")

  bubble = []
  for microbatches, repeats in ((args.pipe, 1), (4 * args.pipe, 1), (args.pipe, 2)):
    row = measure_bubble(args.pipe, microbatches, repeats)
    bubble.append(row)
    print(f"pipeline P={args.pipe} M={microbatches:<3} R={repeats} scan {row['scan_ms']:.1f} "
          f"ms, pipeline {row['pipeline_ms']:.1f} ms: bubble measured {row['measured']:.3f}, "
          f"theory {row['theory']:.3f}")
  benchlib.save_result(args.out, "parallel", {"config": vars(args), "meshes": rows,
                                              "bubble": bubble})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
