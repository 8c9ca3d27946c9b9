"""Numeric formats searched with the architecture (issue 21): the searched digits network
against the fp32 `cnn-digits` baseline, per seed.

  python scripts/bench_precision_search.py --out runs/bench/precision_search.json \\
      --seeds 0 1 2 3

For each seed, through the trainer: configs/digits_cnn.py is trained (the baseline),
configs/digits_dnas_precision.py is searched, and its architecture (each block's op, width
and format) retrained quantization-aware. It records:
- test accuracy of both, per seed and the mean, and their difference in points;
- the search's wall time;
- model bytes and bit-ops of both, counted alike: a layer's multiply-accumulates (half
  the matmul FLOPs its `dsjax.nn` layer reports) x weight bits x input bits, parameters x
  bits / 8. The baseline is float32 throughout (1024 bit-ops per MAC, 4 bytes per
  parameter); the searched network's figures are its architecture.json's (its stem, head,
  biases and BatchNorms counted in float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsjax import data, models  # noqa: E402
from dsjax.nn import layers  # noqa: E402
from dsjax.train import search_architecture, train_and_evaluate  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, seed: int) -> Any:
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.seed = seed
  config.logging.progress_bar = False
  return config


def float32_costs(config: Any) -> dict[str, float]:
  """Bytes and bit-ops per example of a float32 network: parameters x 4, MACs x 32 x 32."""
  dataset = data.get_dataset(config.data)
  model = models.get_spec(config.model.name).build(config.model, dataset.num_classes,
                                                   jnp.float32)
  images = jnp.zeros((1, *dataset.input_shape), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(images)
  _, stats = jax.jit(lambda v, x: model.apply(v, x, mutable=[layers.STATS]))(variables, images)
  flops = [x for path, x in jax.tree_util.tree_leaves_with_path(stats)
           if "matmul_flops" in jax.tree_util.keystr(path)]
  macs = float(sum(flops)) / 2
  params = int(sum(x.size for x in jax.tree.leaves(variables["params"])))
  return {"params": params, "macs": macs, "model_bytes": 4.0 * params,
          "bitops": macs * 32 * 32}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/bench/precision_search.json")
  parser.add_argument("--workdir", default="runs/bench/precision_search")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
  args = parser.parse_args()
  root = Path(args.workdir)

  baseline_config = load_config("digits_cnn", 0)
  baseline = {"costs": float32_costs(baseline_config), "runs": []}
  searched: dict[str, Any] = {"runs": []}
  for seed in args.seeds:
    summary = train_and_evaluate(load_config("digits_cnn", seed), root / f"cnn-seed{seed}")
    baseline["runs"].append({"seed": seed, "test_accuracy": summary["test_accuracy"]})
    search = search_architecture(load_config("digits_dnas_precision", seed),
                                 root / f"search-seed{seed}")
    config = load_config("digits_dnas_precision", seed)
    config.model.architecture = search["architecture"]
    retrained = train_and_evaluate(config, root / f"retrain-seed{seed}")
    architecture = json.loads(Path(search["architecture"]).read_text())
    searched["runs"].append({
        "seed": seed, "test_accuracy": retrained["test_accuracy"],
        "search_time_s": search["search_time_s"], "model_bytes": retrained["model_bytes"],
        "bitops": retrained["bitops"],
        "blocks": [f"{b['op']}{b.get('kernel_size') or ''}/{b['channels']}/{b.get('format')}"
                   if b["kept"] else "skipped" for b in architecture["blocks"]]})
    print(json.dumps({"seed": seed, "baseline": baseline["runs"][-1],
                      "searched": searched["runs"][-1]}), flush=True)

  costs = baseline["costs"]
  baseline["mean_test_accuracy"] = statistics.fmean(r["test_accuracy"] for r in baseline["runs"])
  runs = searched["runs"]
  searched["mean_test_accuracy"] = statistics.fmean(r["test_accuracy"] for r in runs)
  searched["mean_search_time_s"] = statistics.fmean(r["search_time_s"] for r in runs)
  searched["max_search_time_s"] = max(r["search_time_s"] for r in runs)
  for run in runs:
    run["bytes_reduction"] = costs["model_bytes"] / run["model_bytes"]
    run["bitops_reduction"] = costs["bitops"] / run["bitops"]
  searched["min_bytes_reduction"] = min(r["bytes_reduction"] for r in runs)
  searched["min_bitops_reduction"] = min(r["bitops_reduction"] for r in runs)
  results = {"baseline": baseline, "searched": searched,
             "accuracy_difference_points": 100 * (searched["mean_test_accuracy"]
                                                  - baseline["mean_test_accuracy"])}
  print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))
  print("baseline", json.dumps({k: v for k, v in baseline.items() if k != "runs"}))
  print("searched", json.dumps({k: v for k, v in searched.items() if k != "runs"}))
  print("saved", benchlib.save_result(args.out, "precision_search", results))


if __name__ == "__main__":
  main()
