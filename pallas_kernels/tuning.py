"""Block sizes for `pallas_kernels.matmul`: a default table and an on-device autotuner.

`default_blocks` picks from a small table by backend and shape class; `autotune` times
candidate blocks on the current device and caches the winner as JSON, keyed by device
kind, (M, K, N) and dtype. `matmul` calls `lookup` when no block size is given: a cached
winner for the exact device, shape and dtype if one exists, the table otherwise.

The cache lives at `$DSJAX_TUNING_CACHE` if set, else `~/.cache/dsjax/pallas_matmul.json`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

Blocks = tuple[int, int, int]
CACHE_ENV = "DSJAX_TUNING_CACHE"

# (block_m, block_n, block_k) per backend and shape class. GPU: the Triton matmul
# tutorial's H100 tile for large problems, smaller tiles keep more SMs busy on small
# ones. TPU: the Pallas TPU tutorial's 512x1024x1024 reaches ~92% of v5e peak at 8192^3;
# all TPU blocks are multiples of the (8, 128) vreg tiling. CPU runs in interpret mode,
# where each grid step costs a loop iteration, so fewer, larger tiles are faster.
TABLE: dict[str, dict[str, Blocks]] = {
    "gpu": {"small": (64, 64, 32), "medium": (128, 128, 64), "large": (128, 256, 64)},
    "tpu": {"small": (128, 128, 128), "medium": (256, 512, 512), "large": (512, 1024, 1024)},
    "cpu": {"small": (32, 32, 32), "medium": (128, 128, 128), "large": (256, 256, 256)},
}

# Swept by `autotune` when no candidates are given.
CANDIDATES: dict[str, list[Blocks]] = {
    "gpu": [(64, 64, 32), (64, 128, 32), (128, 64, 32), (128, 128, 32), (128, 128, 64),
            (128, 256, 32), (128, 256, 64), (256, 128, 64), (64, 256, 64)],
    "tpu": [(128, 128, 128), (256, 256, 256), (256, 512, 512), (512, 512, 512),
            (512, 1024, 1024), (1024, 1024, 512)],
    "cpu": [(32, 32, 32), (64, 64, 64), (128, 128, 128)],
}

_memo: dict[str, tuple[int, dict[str, Any]]] = {}


def backend_name() -> str:
  """The table row for the default backend: "gpu", "tpu" or "cpu"."""
  backend = jax.default_backend()
  return backend if backend in TABLE else "gpu" if backend in ("cuda", "rocm") else "cpu"


def shape_class(m: int, k: int, n: int) -> str:
  """"small", "medium" or "large", by the output tile count and K."""
  if m >= 2048 and n >= 2048 and k >= 512:
    return "large"
  if max(m, n) < 512 or k < 128:
    return "small"
  return "medium"


def default_blocks(m: int, k: int, n: int, backend: str | None = None) -> Blocks:
  """The table entry for an (M, K, N) problem on `backend` (default: the current one)."""
  return TABLE[backend or backend_name()][shape_class(m, k, n)]


def default_cache_path() -> Path:
  """`$DSJAX_TUNING_CACHE`, else `~/.cache/dsjax/pallas_matmul.json`."""
  env = os.environ.get(CACHE_ENV)
  return Path(env) if env else Path.home() / ".cache" / "dsjax" / "pallas_matmul.json"


def cache_key(shape: Sequence[int], dtype: Any, device_kind: str | None = None) -> str:
  """The JSON key: `device kind/MxKxN/dtype`."""
  kind = device_kind or jax.devices()[0].device_kind
  m, k, n = (int(d) for d in shape)
  return f"{kind}/{m}x{k}x{n}/{jnp.dtype(dtype).name}"


def _read_cache(path: Path) -> dict[str, Any]:
  try:
    mtime = path.stat().st_mtime_ns
  except FileNotFoundError:
    return {}
  memo = _memo.get(str(path))
  if memo and memo[0] == mtime:
    return memo[1]
  try:
    entries = json.loads(path.read_text()).get("entries", {})
  except (OSError, ValueError, AttributeError):
    # A corrupt or foreign cache only costs the tuned blocks; fall back to the table.
    entries = {}
  _memo[str(path)] = (mtime, entries)
  return entries


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  # Write then rename, so a concurrent reader never sees half a file.
  tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=2, sort_keys=True))
  os.replace(tmp, path)


def lookup(shape: Sequence[int], dtype: Any, *, cache_path: str | Path | None = None
           ) -> tuple[Blocks, bool]:
  """The blocks `matmul` uses when none are given.

  Args:
    shape: (M, K, N) of the 2-D problem (batch dimensions already folded into M).
    dtype: the operand dtype.
    cache_path: the JSON cache; default `default_cache_path()`.

  Returns:
    (blocks, tuned): the cached winner and True, or the table entry and False.
  """
  path = Path(cache_path) if cache_path else default_cache_path()
  entry = _read_cache(path).get(cache_key(shape, dtype))
  if entry:
    return (entry["block_m"], entry["block_n"], entry["block_k"]), True
  return default_blocks(*shape), False


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def autotune(shape: Sequence[int], dtype: Any, *, candidates: Sequence[Blocks] | None = None,
             cache_path: str | Path | None = None, repeats: int = 5, force: bool = False
             ) -> Blocks:
  """Times candidate blocks for one problem on the current device; caches the fastest.

  Args:
    shape: (M, K, N): A is [M, K], B is [K, N].
    dtype: the operand dtype (float16, bfloat16 or float32).
    candidates: (block_m, block_n, block_k) triples; default `CANDIDATES[backend]`.
      Candidates that fail to compile on this device are skipped.
    cache_path: the JSON cache; default `default_cache_path()`.
    repeats: timed calls per candidate (the median counts).
    force: re-time even if the cache already holds this key.

  Returns:
    The fastest (block_m, block_n, block_k), also written to the cache.
  """
  from pallas_kernels.matmul import matmul

  if len(shape) != 3 or any(int(d) <= 0 for d in shape):
    raise ValueError(f"autotune needs shape=(M, K, N) of positive sizes, got {tuple(shape)}")
  path = Path(cache_path) if cache_path else default_cache_path()
  key = cache_key(shape, dtype)
  entries = dict(_read_cache(path))
  if key in entries and not force:
    entry = entries[key]
    return entry["block_m"], entry["block_n"], entry["block_k"]

  m, k, n = (int(d) for d in shape)
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
  timings: dict[str, float] = {}
  errors: dict[str, str] = {}
  for blocks in dict.fromkeys(tuple(int(x) for x in c) for c in
                              (candidates or CANDIDATES[backend_name()])):
    bm, bn, bk = blocks
    fn = jax.jit(lambda x, y, bm=bm, bn=bn, bk=bk: matmul(x, y, block_m=bm, block_n=bn,
                                                          block_k=bk))
    try:
      timings["x".join(map(str, blocks))] = _time(fn, (a, b), repeats)
    except Exception as err:  # a tile that does not fit this device is skipped, not fatal
      errors["x".join(map(str, blocks))] = f"{type(err).__name__}: {err}"[:200]
  if not timings:
    raise RuntimeError(f"autotune: no candidate compiled for {key}: {errors}")
  best = min(timings, key=timings.get)
  bm, bn, bk = (int(x) for x in best.split("x"))
  flops = 2.0 * m * k * n
  entries[key] = {"block_m": bm, "block_n": bn, "block_k": bk, "median_s": timings[best],
                  "tflops": flops / timings[best] / 1e12, "timings_s": timings,
                  "jax": jax.__version__}
  _write_cache(path, entries)
  return bm, bn, bk
