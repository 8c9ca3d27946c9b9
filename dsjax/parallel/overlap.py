"""XLA flags that let collectives run asynchronously behind compute, and a check of the result.

XLA reads its flags once, when JAX initialises a backend, and aborts the whole process on a
flag it does not know ("Unknown flag in XLA_FLAGS"). So `apply_overlap_flags` must run
before the first JAX computation (or `jax.devices()`), and every flag listed here was
checked against the installed jaxlib (GPU flags are parsed by jaxlib itself, so a CPU-only
jaxlib still rejects a misspelt one; see tests/test_compression.py). TPU flags belong to
libtpu, not jaxlib: they go in LIBTPU_INIT_ARGS, since XLA_FLAGS would abort on them.
"""

from __future__ import annotations

import os
import re

from dsjax.errors import ConfigError
from dsjax.measure.hlo import COLLECTIVE_KINDS

_GPU_FLAGS = (
    # Schedules collectives as async start/done pairs overlapped with independent compute.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    # Combining many small per-parameter collectives into few large ones (MaxText's sizes).
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    # Collectives of scanned layers move to the neighbouring loop iteration to overlap.
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)
_TPU_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_collective_permute=true",
)
_BACKENDS = {"gpu": _GPU_FLAGS, "cuda": _GPU_FLAGS, "rocm": _GPU_FLAGS, "tpu": _TPU_FLAGS,
             "cpu": ()}
# XLA:CPU runs collectives synchronously; it has no flag that makes them async.


def _backend(backend: str) -> str:
  name = backend.strip().lower()
  if name not in _BACKENDS:
    raise ConfigError(f"Unknown backend {backend!r} for overlap flags; use one of "
                      f"{', '.join(sorted(_BACKENDS))}.")
  return name


def overlap_flags(backend: str, enabled: bool) -> list[str]:
  """XLA flags that overlap collectives with compute on `backend`.

  Args:
    backend: "gpu" (or "cuda"/"rocm"), "tpu" or "cpu".
    enabled: False returns no flags.

  Returns:
    The flags, `--name=value` each; empty on CPU, whose collectives are synchronous.
  """
  flags = _BACKENDS[_backend(backend)]
  return list(flags) if enabled else []


def overlap_env_var(backend: str) -> str:
  """The environment variable the flags of `backend` are read from.

  Args:
    backend: as for `overlap_flags`.

  Returns:
    "LIBTPU_INIT_ARGS" for TPU, else "XLA_FLAGS".
  """
  return "LIBTPU_INIT_ARGS" if _backend(backend) == "tpu" else "XLA_FLAGS"


def detect_backend() -> str:
  """The platform JAX will pick, without starting it: `JAX_PLATFORMS` if set, else the
  installed plugins (libtpu: tpu; a CUDA or ROCm plugin: gpu), else cpu."""
  import importlib.util  # noqa: PLC0415
  import os  # noqa: PLC0415

  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    first = platforms.split(",")[0]
    return "gpu" if first in ("cuda", "rocm", "gpu") else first if first in _BACKENDS else "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return "tpu"
  if any(importlib.util.find_spec(name) is not None
         for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm60_plugin",
                      "jax_rocm7_plugin")):
    return "gpu"
  return "cpu"


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge
  except ImportError:  # pragma: no cover - private module moved.
    return False
  check = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(check()) if check else False


def apply_overlap_flags(backend: str, enabled: bool) -> list[str]:
  """Appends the overlap flags to XLA_FLAGS (LIBTPU_INIT_ARGS on TPU), without duplicates.

  Must run before JAX initialises its backend (before any array is created or
  `jax.devices()` is called): XLA reads the flags only then. A flag whose name is already in
  the variable is left as the user set it.

  Args:
    backend: as for `overlap_flags`.
    enabled: False changes nothing.

  Returns:
    The flags that were added.

  Raises:
    ConfigError: a JAX backend is already initialised, so the flags would have no effect.
  """
  flags = overlap_flags(backend, enabled)
  if not flags:
    return []
  if _backends_initialized():
    raise ConfigError("apply_overlap_flags was called after JAX initialised its backend, so "
                      "XLA would ignore the flags; call it before the first JAX computation.")
  var = overlap_env_var(backend)
  current = os.environ.get(var, "").split()
  present = {flag.split("=", 1)[0] for flag in current}
  added = [flag for flag in flags if flag.split("=", 1)[0] not in present]
  if added:
    os.environ[var] = " ".join(current + added)
  return added


_ASYNC_OP = re.compile(r"(?<![\w%.-])(?P<kind>" + "|".join(COLLECTIVE_KINDS + ("async",))
                       + r")-(?P<phase>start|done)\(")


def async_collective_pairs(hlo_text: str) -> dict[str, int]:
  """Counts async collective pairs (`all-reduce-start` ... `all-reduce-done`) in HLO text.

  Args:
    hlo_text: compiled HLO text (`compiled.as_text()`).

  Returns:
    `{kind: pairs}` for every kind of COLLECTIVE_KINDS plus "async" (generic
    `async-start`/`async-done` wrappers, which newer XLA uses for reduce-scatter and
    all-to-all); a pair is a start matched by a done, so unmatched halves are not counted.
  """
  starts = dict.fromkeys((*COLLECTIVE_KINDS, "async"), 0)
  dones = dict(starts)
  for match in _ASYNC_OP.finditer(hlo_text):
    counter = starts if match.group("phase") == "start" else dones
    counter[match.group("kind")] += 1
  return {kind: min(starts[kind], dones[kind]) for kind in starts}
