"""Inference latency and throughput (QPS) of the Wide & Deep CTR model across batch sizes.

  python scripts/bench_ctr.py --config configs/ctr_wide_deep.py --batch-sizes 1 64 512 4096 \\
      --out runs/bench/ctr.json

Trains nothing: builds the model of the config (`path.py` or `path.py:variant`) with fresh
parameters and times the jitted forward pass (click logits only, no sigmoid) on random
inputs of the data's shape. Latency is the median per batch after warm-up, inputs already
on the device; QPS is examples scored per second at that latency.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from dsjax import precision  # noqa: E402
from dsjax.data.ctr import NUM_DENSE  # noqa: E402
from dsjax.models import registry, wide_deep  # noqa: E402, F401  (registers wide-deep)

ROOT = Path(__file__).resolve().parents[1]


def load_config(spec: str) -> Any:
  """Loads `path.py[:arg]` the way `--config` does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def random_inputs(batch_size: int, num_sparse: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Log-count dense features and 31-bit categorical ids, as the CTR loaders produce."""
  rng = np.random.default_rng(seed)
  dense = np.log1p(rng.integers(0, 1000, (batch_size, NUM_DENSE))).astype(np.float32)
  sparse = rng.integers(0, 2**31 - 1, (batch_size, num_sparse), dtype=np.int64)
  return dense, sparse.astype(np.int32)


def bench(config: Any, preset: str, batch_sizes: list[int], repeats: int) -> list[dict]:
  spec = registry.get_spec(config.model.name)
  if spec.task != "ctr":
    raise SystemExit(f"{config.model.name} is a {spec.task!r} model; bench_ctr times CTR models")
  model = spec.build(config.model, 2, precision.get_policy(preset).compute_dtype)
  dense, sparse = random_inputs(2, config.model.num_sparse, 0)
  params = jax.jit(model.init)(jax.random.key(config.seed), dense, sparse)
  forward = jax.jit(model.apply)
  points = []
  for batch_size in batch_sizes:
    dense, sparse = jax.device_put(random_inputs(batch_size, config.model.num_sparse,
                                                 batch_size))
    timing = benchlib.time_steps(lambda d=dense, s=sparse: forward(params, d, s),
                                 warmup=3, repeats=repeats)
    points.append({"precision": preset, "batch_size": batch_size,
                   "latency_ms": timing["median_s"] * 1e3, "min_ms": timing["min_s"] * 1e3,
                   "qps": batch_size / timing["median_s"], **timing})
  return points


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "configs" / "ctr_wide_deep.py"))
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512, 4096])
  parser.add_argument("--precisions", nargs="+", default=None,
                      help="precision presets; default: the config's precision.policy")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--out", default="runs/bench/ctr.json")
  args = parser.parse_args()

  config = load_config(args.config)
  presets = args.precisions or [config.precision.policy]
  model = config.model
  tables = model.num_sparse * model.embedding_rows * (model.embedding_dim + 1) + model.wide_rows
  print(f"{model.name}: {model.num_sparse} tables x {model.embedding_rows} rows x "
        f"{model.embedding_dim} dims, mlp {tuple(model.mlp_dims)}, {tables:,} table params")
  points = [p for preset in presets for p in bench(config, preset, args.batch_sizes,
                                                   args.repeats)]
  print(f"{'precision':<10} {'batch':>6} {'median ms':>10} {'min ms':>8} {'QPS':>11}")
  for p in points:
    print(f"{p['precision']:<10} {p['batch_size']:>6} {p['latency_ms']:>10.3f} "
          f"{p['min_ms']:>8.3f} {p['qps']:>11,.0f}")
  path = benchlib.save_result(args.out, "ctr_inference", {
      "config": {"file": args.config, "model": model.to_dict(), "repeats": args.repeats},
      "points": points})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
