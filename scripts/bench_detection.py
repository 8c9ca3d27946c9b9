"""Detection on the embedded digits-detection canvases: the hand-designed CenterNet-ResNet
against CenterNet on a DNAS-searched backbone (the seed's part 4).

  python scripts/bench_detection.py --out runs/bench/detection.json --seeds 0 1 2

It trains configs/det_digits.py once per seed, searches configs/det_digits_dnas.py once
(seed 0) and retrains the searched architecture once per seed, all through the trainer.
For each detector it records:
- COCO box AP on the test split (pycocotools, from the run's summary.json), per seed and
  the mean;
- the training and search wall times;
- parameters and forward FLOPs per image (XLA's cost analysis of the inference program);
- inference images/s at batch 1 and 32: the jitted forward pass plus peak decoding to
  boxes, median of repeated calls, both detectors timed in this one process, so their
  ratio compares like with like on a noisy machine.
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

from dsjax import data, measure, models  # noqa: E402
from dsjax.models import centernet  # noqa: E402
from dsjax.train import search_architecture, train_and_evaluate  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AP_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def load_config(name: str, seed: int, steps: int) -> Any:
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.seed = seed
  if steps:
    config.train.steps = steps
  config.logging.progress_bar = False
  return config


def inference(config: Any, batch_sizes: list[int], repeats: int) -> dict[str, Any]:
  """Params, forward FLOPs per image and images/s of one detector's inference program."""
  dataset = data.get_dataset(config.data)
  num_classes, shape = dataset.num_classes, dataset.input_shape
  model = models.get_spec(config.model.name).build(config.model, num_classes, jnp.float32)
  stride = centernet.output_stride(config.model)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(
      jnp.zeros((1, *shape), jnp.float32))

  @jax.jit
  def detect(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    return centernet.decode(model.apply(variables, images), num_classes, stride, 100)

  result: dict[str, Any] = {
      "params": int(sum(x.size for x in jax.tree.leaves(variables["params"])))}
  for batch in batch_sizes:
    images = jnp.asarray(dataset.splits["test"]["image"][:batch], jnp.float32) / 255.0
    compiled = detect.lower(variables, images).compile()
    if batch == 1:
      result["flops_per_image"] = measure.compiled_flops(compiled)
    timing = benchlib.time_steps(lambda run=compiled, x=images: run(variables, x), warmup=5,
                                 repeats=repeats)
    result[f"images_per_sec_batch{batch}"] = batch / timing["median_s"]
  return result


def test_metrics(summary: dict[str, Any]) -> dict[str, float]:
  return {key: summary[f"test_{key}"] for key in AP_KEYS} | {
      "train_time_s": summary.get("train_time_s", 0.0)}


def train(config: Any, workdir: Path) -> dict[str, Any]:
  """The run's summary: trained now, or read back from a finished run in `workdir` of the
  same model, seed and steps (a rerun of this script keeps finished runs and their times)."""
  summary_file, config_file = workdir / "summary.json", workdir / "config.json"
  if summary_file.exists() and config_file.exists():
    summary, saved = json.loads(summary_file.read_text()), json.loads(config_file.read_text())
    if (summary.get("steps") == config.train.steps and saved["seed"] == config.seed
        and saved["model"] == json.loads(config.model.to_json())):
      print(f"reusing the finished run in {workdir}", flush=True)
      return summary
  return train_and_evaluate(config, workdir)


def mean_ap(runs: list[dict[str, Any]]) -> float:
  return statistics.fmean(run["ap"] for run in runs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/bench/detection.json")
  parser.add_argument("--workdir", default="runs/bench/detection")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=0, help="training steps (0: the configs')")
  parser.add_argument("--search-steps", type=int, default=0,
                      help="search steps (0: configs/det_digits_dnas.py's)")
  parser.add_argument("--repeats", type=int, default=50, help="timed inference calls")
  parser.add_argument("--speed-only", action="store_true",
                      help="only time inference, of the architecture a previous run of this "
                      "script searched in --workdir (on a quieter machine, say), and merge "
                      "the figures into --out")
  args = parser.parse_args()
  root = Path(args.workdir)
  if args.speed_only:
    retime(args.out, str(root / "search" / "architecture.json"), args.repeats)
    return

  resnet_runs = []
  for seed in args.seeds:
    summary = train(load_config("det_digits", seed, args.steps), root / f"resnet-seed{seed}")
    resnet_runs.append({"seed": seed, **test_metrics(summary)})
    print(json.dumps({"resnet": resnet_runs[-1]}), flush=True)

  search_config = load_config("det_digits_dnas", args.seeds[0], args.steps)
  if args.search_steps:
    search_config.search.steps = args.search_steps
    search_config.search.warmup_steps = min(search_config.search.warmup_steps,
                                            args.search_steps // 4)
  search = search_architecture(search_config, root / "search")
  print(json.dumps({"search": {k: search[k] for k in ("search_time_s", "flops", "params")}}),
        flush=True)
  dnas_runs = []
  for seed in args.seeds:
    config = load_config("det_digits_dnas", seed, args.steps)
    config.model.architecture = search["architecture"]
    summary = train(config, root / f"dnas-seed{seed}")
    dnas_runs.append({"seed": seed, **test_metrics(summary)})
    print(json.dumps({"dnas": dnas_runs[-1]}), flush=True)

  speed = timings(search["architecture"], args.repeats)
  results = {
      "resnet": {"runs": resnet_runs, "mean_ap": mean_ap(resnet_runs)},
      "dnas": {"runs": dnas_runs, "mean_ap": mean_ap(dnas_runs),
               "search_time_s": search["search_time_s"], "architecture": search["architecture"],
               "backbone_flops_searched": search["flops"]},
  }
  results["ap_difference"] = results["dnas"]["mean_ap"] - results["resnet"]["mean_ap"]
  report(args.out, results, speed)


def timings(architecture: str, repeats: int) -> dict[str, dict[str, Any]]:
  """Inference figures of both detectors, timed one after the other in this process."""
  derived = load_config("det_digits_dnas", 0, 0)
  derived.model.architecture = architecture
  return {"resnet": inference(load_config("det_digits", 0, 0), [1, 32], repeats),
          "dnas": inference(derived, [1, 32], repeats)}


def retime(out: str, architecture: str, repeats: int) -> None:
  """`--speed-only`: new inference figures merged into a previous run's results."""
  results = json.loads(Path(out).read_text())["results"]
  report(out, results, timings(architecture, repeats))


def report(out: str, results: dict[str, Any], speed: dict[str, dict[str, Any]]) -> None:
  for name in ("resnet", "dnas"):
    results[name].update(speed[name])
  for batch in (1, 32):
    key = f"images_per_sec_batch{batch}"
    results[f"speedup_batch{batch}"] = speed["dnas"][key] / speed["resnet"][key]
  print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))
  for name in ("resnet", "dnas"):
    print(name, json.dumps({k: v for k, v in results[name].items() if k != "runs"}))
  print("saved", benchlib.save_result(out, "detection", results))


if __name__ == "__main__":
  main()
