"""Runs the CPU-sized benchmark set and writes its tables into docs/benchmarks.md.

  python scripts/bench_all.py [--skip matmul] [--docs docs/benchmarks.md]

Each benchmark runs as its own process (a fresh JAX runtime, as a user would run it) and
writes JSON under runs/bench/; the tables go between the `bench_all` markers of the docs
file, so hand-written sections around them stay as they are. The set is sized to finish
in under 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "bench"
START, END = "<!-- bench_all:start -->", "<!-- bench_all:end -->"

# name -> (script, CPU-sized arguments)
BENCHMARKS = {
    "precision": ("bench_precision.py", ["--batch-size", "128", "--repeats", "20"]),
    "train": ("bench_train.py", ["--batch-sizes", "32", "128", "--steps", "20",
                                 "--plot", str(REPO / "docs" / "train_throughput.png")]),
    "matmul": ("bench_matmul.py", []),
}


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render(name: str, payload: dict) -> str:
  """Markdown for one benchmark's JSON."""
  env, results = payload["environment"], payload["results"]
  machine = (f"{env['device_kind']} ({env['backend']}, {env['device_count']} devices), "
             f"jax {env['jax']}, commit {env['commit']}")
  if name == "precision":
    rows = [[preset, f"{r['median_s'] * 1e3:.1f} ms", f"{r['examples_per_sec']:.0f}",
             f"{r.get('speedup_vs_fp32', float('nan')):.2f}x"]
            for preset, r in results.items() if isinstance(r, dict) and "median_s" in r]
    body = _table(["preset", "median step", "examples/s", "vs fp32"], rows)
    if "controller_overhead" in results:
      body += f"\n\nController overhead: {results['controller_overhead']:+.1%} of the mixed step."
  elif name == "train":
    rows = [[p["precision"], str(p["batch_size"]), f"{p['examples_per_sec']:.0f}",
             f"{p['step_ms']:.1f} ms", f"{p['mfu']:.1%}"] for p in results["points"]]
    body = _table(["precision", "batch", "examples/s", "step", "MFU"], rows)
  elif name == "matmul":
    rows = [[f"{r['m']}x{r['k']}x{r['n']}", r["dtype"], f"{r['kernel']['tflops']:.4f}",
             f"{r['xla']['tflops']:.4f}", f"{r['kernel_vs_xla']:.2f}", f"{r['fused_gain']:.2f}"]
            for r in results["rows"]]
    body = _table(["M x K x N", "dtype", "kernel TFLOP/s", "XLA TFLOP/s", "kernel/XLA",
                   "fused-epilogue gain"], rows)
    if results["config"].get("interpret_mode"):
      body += ("\n\nCPU: the kernel ran in Pallas interpret mode, so these timings say "
               "nothing about kernel speed; they show the benchmark runs end to end.")
  else:
    body = "```json\n" + json.dumps(results, indent=1)[:4000] + "\n```"
  return f"### {name}\n\nMachine: {machine}.\n\n{body}\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--skip", nargs="*", default=[])
  parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
  args = parser.parse_args()
  sections = []
  for name, (script, extra) in BENCHMARKS.items():
    path = REPO / "scripts" / script
    if name in args.skip or not path.exists():
      continue
    out = OUT / f"{name}.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(path), "--out", str(out), *extra], check=True, cwd=REPO)
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    sections.append(render(name, json.loads(out.read_text())))
  docs = Path(args.docs)
  text = docs.read_text() if docs.exists() else "# Benchmarks\n"
  block = f"{START}\n## Latest `scripts/bench_all.py` run\n\n" + "\n".join(sections) + END
  if START in text and END in text:
    text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  docs.write_text(text)
  print(f"wrote {docs}")


if __name__ == "__main__":
  main()
