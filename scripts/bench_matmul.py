"""TFLOP/s of the Pallas FP32-accumulate matmul vs XLA, and the fused-epilogue gain.

  python scripts/bench_matmul.py --out runs/bench/matmul.json
  python scripts/bench_matmul.py --sizes 4096 8192x768x3072 --dtypes float16

For each size (`S` for S^3, or `MxKxN`) and dtype, in one process:
* `kernel`: `pallas_kernels.matmul(a, b)` (tuned blocks if cached, else the table);
* `xla`: `jnp.dot(a, b, preferred_element_type=jnp.float32)` (cuBLAS on GPU), and the
  ratio kernel/xla in TFLOP/s;
* `fused`: the kernel with bias + gelu in its epilogue, against `unfused`, the kernel
  followed by a separate float32 bias add, gelu and cast, and `xla_epilogue`, the XLA dot
  with the same epilogue (which XLA may fuse on its own).

On CPU the kernel runs in the Pallas interpreter, so the default there is one small size
and the figures only show that the script works, not kernel speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from pallas_kernels import matmul, tuning  # noqa: E402

ACCELERATOR_SIZES = ["1024", "4096", "8192", "8192x768x3072", "8192x3072x768",
                     "8192x4096x14336"]
CPU_SIZES = ["128"]


def parse_size(text: str) -> tuple[int, int, int]:
  """"S" -> (S, S, S); "MxKxN" -> (M, K, N)."""
  parts = [int(p) for p in text.lower().split("x")]
  if len(parts) == 1:
    return parts[0], parts[0], parts[0]
  if len(parts) != 3 or min(parts) <= 0:
    raise argparse.ArgumentTypeError(f"size {text!r} must be S or MxKxN with positive ints")
  return parts[0], parts[1], parts[2]


def _epilogue(z, bias, dtype):
  return jax.nn.gelu(z.astype(jnp.float32) + bias, approximate=True).astype(dtype)


def bench_one(m: int, k: int, n: int, dtype, args: argparse.Namespace) -> dict:
  ka, kb, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
  bias = jax.random.normal(kc, (n,), jnp.float32)
  if args.autotune:
    tuning.autotune((m, k, n), dtype)
  blocks, tuned = tuning.lookup((m, k, n), dtype)

  fns = {
      "kernel": jax.jit(lambda a, b: matmul(a, b)),
      "xla": jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)),
      "fused": jax.jit(lambda a, b, c: matmul(a, b, bias=c, activation="gelu")),
      "unfused": jax.jit(lambda a, b, c: _epilogue(matmul(a, b), c, dtype)),
      "xla_epilogue": jax.jit(lambda a, b, c: _epilogue(
          jnp.dot(a, b, preferred_element_type=jnp.float32), c, dtype)),
  }
  flops = 2.0 * m * k * n
  row: dict = {"m": m, "k": k, "n": n, "dtype": jnp.dtype(dtype).name,
               "table_blocks": list(tuning.default_blocks(m, k, n)),
               "cached_blocks": list(blocks) if tuned else None}
  for name, fn in fns.items():
    operands = (a, b) if name in ("kernel", "xla") else (a, b, bias)
    timing = benchlib.time_steps(lambda fn=fn, ops=operands: fn(*ops), warmup=args.warmup,
                                 repeats=args.repeats)
    row[name] = {**timing, "tflops": flops / timing["median_s"] / 1e12}
  row["kernel_vs_xla"] = row["kernel"]["tflops"] / row["xla"]["tflops"]
  row["fused_gain"] = row["unfused"]["median_s"] / row["fused"]["median_s"]
  row["fused_vs_xla_epilogue"] = row["xla_epilogue"]["median_s"] / row["fused"]["median_s"]
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=None,
                      help="S (for S^3) or MxKxN; default: 1024 4096 8192 and transformer "
                           "shapes on GPU/TPU, 128 on CPU")
  parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                      choices=["float16", "bfloat16", "float32"])
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--autotune", action="store_true",
                      help="autotune (and cache) each shape before timing it")
  parser.add_argument("--out", default="runs/bench/matmul.json")
  args = parser.parse_args()

  backend = tuning.backend_name()
  interpret = backend == "cpu"
  sizes = [parse_size(s) for s in (args.sizes or (CPU_SIZES if interpret else ACCELERATOR_SIZES))]
  dtypes = [jnp.dtype(d) for d in args.dtypes]
  if backend == "tpu" and jnp.dtype(jnp.float16) in dtypes:
    print("skipping float16: TPU Pallas kernels take bfloat16")
    dtypes.remove(jnp.dtype(jnp.float16))
  if interpret:
    print("CPU backend: the kernel runs in Pallas INTERPRET mode; its timings are not "
          "kernel performance")

  rows = []
  print(f"{'M x K x N':<20} {'dtype':<9} {'kernel TF/s':>11} {'xla TF/s':>9} {'ratio':>6} "
        f"{'fused ms':>9} {'unfused ms':>10} {'gain':>5} {'xla+epi ms':>10}")
  for m, k, n in sizes:
    for dtype in dtypes:
      row = bench_one(m, k, n, dtype, args)
      rows.append(row)
      print(f"{f'{m}x{k}x{n}':<20} {row['dtype']:<9} {row['kernel']['tflops']:>11.2f} "
            f"{row['xla']['tflops']:>9.2f} {row['kernel_vs_xla']:>6.2f} "
            f"{row['fused']['median_s'] * 1e3:>9.3f} {row['unfused']['median_s'] * 1e3:>10.3f} "
            f"{row['fused_gain']:>5.2f} {row['xla_epilogue']['median_s'] * 1e3:>10.3f}")
  config = {"sizes": [list(s) for s in sizes], "dtypes": [d.name for d in dtypes],
            "warmup": args.warmup, "repeats": args.repeats, "autotune": args.autotune,
            "interpret_mode": interpret, "epilogue": "bias + gelu (tanh approximation)"}
  path = benchlib.save_result(args.out, "matmul", {"config": config, "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
