"""Data at scale: prepare-text speed, loader throughput, and memory against corpus size.

  python scripts/bench_data.py --out runs/bench/data.json
  python scripts/bench_data.py --small-mb 20 --large-mb 2000 --out runs/bench/data.json  # issue 22

Four measurements, on corpora and images this script generates in `--workdir` (a
temporary folder, deleted afterwards unless `--keep`; nothing generated is committed):

a. `dsjax-data prepare-text` on a `--prepare-mb` MB `.jsonl` corpus (CPython's pydoc topics,
   their paragraphs shuffled into documents of about a topic's size), vocabulary trained
   (`--vocab-size`), `--workers` tokenizing processes: MB/s of text, and per core (over
   the machine's cores).
b. the grain loader's masked-LM batches from that prepared corpus, bert-base shapes
   (`--mlm-batch` x seq 128; the masking itself runs on device, in the step): tokens/s.
c. the grain loader on a generated image folder (`--images` 32x32 PNGs in 10 classes):
   decoded, random-cropped and flipped images/s, in threads and in worker processes.
d. peak resident memory (`ru_maxrss`) of a short bert-tiny training run (`--rss-steps`)
   on a `--small-mb` and on a `--large-mb` prepared corpus, each run in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from dsjax.data import GrainLoader, get_dataset, image_folder  # noqa: E402
from dsjax.data.prepare import prepare_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
  """A `.jsonl` corpus of about `megabytes` MB: pydoc topic paragraphs, shuffled into
  documents of 20-40 paragraphs (a topic's size). Returns its size in bytes."""
  from pydoc_data.topics import topics

  paragraphs = [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text)
                if p.strip()]
  rng = random.Random(seed)
  target, written = int(megabytes * MB), 0
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    while written < target:
      document = "\n\n".join(rng.choices(paragraphs, k=rng.randint(20, 40)))
      line = json.dumps({"text": document}) + "\n"
      f.write(line)
      written += len(line.encode("utf-8"))
  return written


def bench_prepare(corpus: Path, out: Path, vocab_size: int, workers: int) -> dict[str, Any]:
  start = time.perf_counter()
  manifest = prepare_text(str(corpus), out, vocab_size=vocab_size, workers=workers,
                          progress=False)  # The vocabulary from a sample of 256 MB at most.
  seconds = time.perf_counter() - start
  text_bytes = sum(shard["text_bytes"] for shard in manifest["shards"])
  cores = os.cpu_count() or 1
  return {"text_mb": text_bytes / MB, "seconds": seconds, "workers": workers, "cores": cores,
          "mb_per_s": text_bytes / MB / seconds,
          "mb_per_s_per_core": text_bytes / MB / seconds / cores,
          "tokens": manifest["counts"]["tokens"], "documents": manifest["counts"]["documents"],
          "vocab_every_document": manifest["settings"]["vocab_every_document"]}


def _data_config(prep: Path, vocab_size: int, seq_len: int) -> Any:
  import ml_collections

  return ml_collections.ConfigDict(dict(
      name="text", data_dir=str(prep), val_fraction=0.1, split_seed=0, seq_len=seq_len,
      vocab_size=vocab_size, vocab_file="", mlm_probability=0.15, cache_dir="", loader="grain"))


def _throughput(loader: GrainLoader, seconds: float) -> tuple[int, float]:
  """(batches, seconds) read back to back for about `seconds` after a first batch."""
  next(loader)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(loader)
    count += 1
  return count, time.perf_counter() - start


def bench_mlm_loader(prep: Path, vocab_size: int, batch: int, prefetch: int,
                     seconds: float) -> dict[str, Any]:
  dataset = get_dataset(_data_config(prep, vocab_size, 128))
  loader = GrainLoader(dataset.splits["train"], batch, seed=0, prefetch=prefetch)
  count, elapsed = _throughput(loader, seconds)
  loader.close()
  return {"batch": batch, "seq_len": 128, "prefetch": prefetch, "batches": count,
          "tokens_per_s": count * batch * 128 / elapsed, "batches_per_s": count / elapsed}


def write_images(folder: Path, count: int, seed: int = 0) -> None:
  """`count` random 32x32 PNGs (smooth colour gradients plus noise) in 10 class folders."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  grid = np.linspace(0, 1, 32, dtype=np.float32)
  for index in range(count):
    colours = rng.random((2, 3), np.float32)
    pixels = (grid[:, None, None] * colours[0] + grid[None, :, None] * colours[1]) * 127
    pixels = pixels + rng.integers(0, 64, (32, 32, 3))
    target = folder / "train" / f"class{index % 10}"
    target.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(target / f"{index:06d}.png")


def bench_images(folder: Path, batch: int, workers: int, prefetch: int,
                 seconds: float) -> dict[str, Any]:
  import ml_collections

  config = ml_collections.ConfigDict(dict(
      name="image-folder", data_dir=str(folder), val_fraction=0.0, split_seed=0, image_size=32,
      augment=True, loader="grain", workers=workers, prefetch=prefetch))
  dataset = get_dataset(config)
  assert isinstance(dataset.transform, image_folder.CropFlip)
  loader = GrainLoader(dataset.splits["train"], batch, seed=0, workers=workers,
                       prefetch=prefetch, transform=dataset.transform)
  count, elapsed = _throughput(loader, seconds)
  loader.close()
  return {"batch": batch, "workers": workers, "prefetch": prefetch, "batches": count,
          "images_per_s": count * batch / elapsed}


_RSS_RUN = """
import json, resource, sys
import importlib.util
spec = importlib.util.spec_from_file_location("bert_tiny", sys.argv[1] + "/configs/bert_tiny.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
config = module.get_config()
config.data.data_dir, config.data.vocab_size = sys.argv[2], int(sys.argv[3])
steps = int(sys.argv[4])
config.train.steps = config.train.eval_every_steps = config.checkpoint.every_steps = steps
config.train.log_every_steps = 10
config.train.eval_examples = 2048  # The same evaluation work on either corpus.
config.logging.tensorboard = config.logging.progress_bar = False
from dsjax.train import train_and_evaluate
summary = train_and_evaluate(config, sys.argv[5])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "steps": summary["steps"], "test_loss": summary.get("test_loss")}))
"""


def bench_rss(prep: Path, vocab_size: int, steps: int, workdir: Path) -> dict[str, Any]:
  """Peak RSS of a bert-tiny run of `steps` steps on `prep`, in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", _RSS_RUN, str(ROOT), str(prep),
                           str(vocab_size), str(steps), str(workdir)],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  if result.returncode:
    raise RuntimeError(f"the bert-tiny run on {prep} failed:\n{result.stderr[-3000:]}")
  return {**json.loads(result.stdout.strip().splitlines()[-1]),
          "seconds": time.perf_counter() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="", help="where corpora go (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the generated data")
  parser.add_argument("--prepare-mb", type=float, default=20.0)
  parser.add_argument("--vocab-size", type=int, default=4096)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--mlm-batch", type=int, default=256)
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--image-batch", type=int, default=256)
  parser.add_argument("--image-workers", type=int, default=2)
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--seconds", type=float, default=5.0, help="per throughput figure")
  parser.add_argument("--small-mb", type=float, default=20.0)
  parser.add_argument("--large-mb", type=float, default=200.0, help="issue 22: 2000")
  parser.add_argument("--rss-steps", type=int, default=50)
  parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
  parser.add_argument("--out", default="runs/bench/data.json")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  root = Path(args.workdir or tempfile.mkdtemp(prefix="dsjax-bench-data-"))
  results: dict[str, Any] = {}
  try:
    prep = root / "prep"
    if "a" not in skip or "b" not in skip:
      write_corpus(root / "corpus" / "corpus.jsonl", args.prepare_mb)
      results["prepare"] = bench_prepare(root / "corpus" / "corpus.jsonl", prep,
                                         args.vocab_size, args.workers)
      print(f"(a) prepare-text: {results['prepare']['mb_per_s']:.2f} MB/s with "
            f"{args.workers} workers, {results['prepare']['mb_per_s_per_core']:.2f} MB/s "
            "per core", flush=True)
    if "b" not in skip:
      results["mlm_loader"] = bench_mlm_loader(prep, args.vocab_size, args.mlm_batch,
                                               args.prefetch, args.seconds)
      print(f"(b) MLM batches ({args.mlm_batch} x 128): "
            f"{results['mlm_loader']['tokens_per_s'] / 1e6:.2f} M tokens/s", flush=True)
    if "c" not in skip:
      write_images(root / "images", args.images)
      results["images"] = [bench_images(root / "images", args.image_batch, workers,
                                        args.prefetch, args.seconds)
                           for workers in sorted({0, args.image_workers})]
      for row in results["images"]:
        print(f"(c) 32x32 images, decoded + cropped + flipped, {row['workers']} worker "
              f"processes: {row['images_per_s']:.0f} images/s", flush=True)
    if "d" not in skip:
      results["rss"] = {}
      for name, megabytes in (("small", args.small_mb), ("large", args.large_mb)):
        corpus = root / f"rss-{name}" / "corpus.jsonl"
        size = write_corpus(corpus, megabytes, seed=1)
        folder = root / f"rss-{name}" / "prep"
        prepared = bench_prepare(corpus, folder, args.vocab_size, args.workers)
        print(f"(d) prepare-text on {size / MB:.0f} MB: {prepared['mb_per_s']:.2f} MB/s, "
              f"{prepared['mb_per_s_per_core']:.2f} MB/s per core", flush=True)
        corpus.unlink()  # The run reads the shards only.
        row = bench_rss(folder, args.vocab_size, args.rss_steps, root / f"rss-{name}" / "run")
        results["rss"][name] = {"corpus_mb": size / MB, "prepare": prepared, **row}
        print(f"(d) bert-tiny, {args.rss_steps} steps on {size / MB:.0f} MB: peak RSS "
              f"{row['peak_rss_mb']:.0f} MB", flush=True)
      small, large = results["rss"]["small"], results["rss"]["large"]
      results["rss"]["large_over_small"] = large["peak_rss_mb"] / small["peak_rss_mb"]
      print(f"(d) peak RSS large / small: {results['rss']['large_over_small']:.3f}")
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(root, ignore_errors=True)
  print(f"wrote {benchlib.save_result(args.out, 'data', {'args': vars(args), **results})}")


if __name__ == "__main__":
  main()
