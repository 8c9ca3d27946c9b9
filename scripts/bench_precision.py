"""Step time of fp32 vs bf16 vs fp16 vs mixed on one model and batch, and the adaptive
controller's overhead.

  python scripts/bench_precision.py --batch-size 256 --out runs/bench/precision.json

Every preset trains the same model (float32 master weights) on the same batch; ratios
are against fp32 measured in the same process. `mixed+controller` adds the per-layer
statistics the adaptive controller reads (its host-side check runs every 10 steps and
is timed as part of those steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from dsjax import config as config_lib  # noqa: E402
from dsjax import data, models, precision  # noqa: E402
from dsjax.train import Task, create_train_state, make_train_step  # noqa: E402
from dsjax.train.optim import build_optimizer  # noqa: E402

CLS = Task("classification")


def bench(preset: str, collect_stats: bool, args: argparse.Namespace) -> dict[str, float]:
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features = tuple(args.features)
  config.model.dense_features = args.dense
  dataset = data.get_dataset(config.data)
  policy = precision.get_policy(preset)
  model = models.get_spec("cnn-digits").build(config.model, 10, policy.compute_dtype)
  tx, lr = build_optimizer(config.optimizer, 1000)
  state = create_train_state(model, tx, dataset.input_shape, 0,
                             precision.loss_scale_for(policy))
  batch = data.BatchIterator(dataset.splits["train"], args.batch_size, seed=0).batch(0)
  batch = jax.device_put(batch)
  step_fn = jax.jit(make_train_step(CLS, 1, lr, collect_stats=collect_stats), donate_argnums=(0,))
  holder = {"state": state}
  rng = jax.random.PRNGKey(0)

  def one_step():
    holder["state"], metrics = step_fn(holder["state"], batch, rng)
    return metrics["loss"]

  timing = benchlib.time_steps(one_step, warmup=3, repeats=args.repeats)
  timing["examples_per_sec"] = args.batch_size / timing["median_s"]
  return timing


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--features", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--dense", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--presets", nargs="+", default=["fp32", "bf16", "fp16", "mixed"])
  parser.add_argument("--out", default="runs/bench/precision.json")
  args = parser.parse_args()

  results = {preset: bench(preset, False, args) for preset in args.presets}
  if "mixed" in args.presets:
    results["mixed+controller"] = bench("mixed", True, args)
    results["controller_overhead"] = (results["mixed+controller"]["median_s"]
                                      / results["mixed"]["median_s"] - 1)
  base = results.get("fp32", {}).get("median_s")
  print(f"{'preset':<18} {'median ms':>10} {'min ms':>8} {'ex/s':>9} {'vs fp32':>8}")
  for name, timing in results.items():
    if not isinstance(timing, dict):
      continue
    speedup = base / timing["median_s"] if base else float("nan")
    timing["speedup_vs_fp32"] = speedup
    print(f"{name:<18} {timing['median_s'] * 1e3:>10.2f} {timing['min_s'] * 1e3:>8.2f} "
          f"{timing['examples_per_sec']:>9.0f} {speedup:>7.2f}x")
  if "controller_overhead" in results:
    print(f"controller overhead: {results['controller_overhead'] * 100:+.1f}% of the mixed step")
  path = benchlib.save_result(args.out, "precision", {"config": vars(args), **results})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
