"""The device mesh: `--mesh data=2,model=2,pipe=2` over every device of every process.

Axes, outermost first: `pipe` (pipeline stages: the least traffic, so the slowest links),
`data` (replicas), `fsdp` (parameter- and optimizer-sharded replicas) and `model` (tensor
parallelism: the most traffic, so the fastest links, adjacent devices). One axis may be
-1: it takes the devices the others leave.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from dsjax.errors import ConfigError

AXES = ("pipe", "data", "fsdp", "model")
# Mesh axes the batch is split over (each holds different examples).
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses `"data=2,model=2,pipe=2"` into axis sizes (unnamed axes are 1).

  Args:
    spec: comma-separated `axis=size`; sizes are positive, or -1 for "the rest". When
      no axis is -1 and `data` is not named, `data` takes the rest (`model=2` on 8
      devices is data=4,model=2).

  Returns:
    `{axis: size}` for every axis of `AXES`.

  Raises:
    ConfigError: an unknown axis, a size that is not an integer, or a repeated axis.
  """
  sizes = {axis: 1 for axis in AXES}
  seen = set()
  for item in filter(None, (part.strip() for part in spec.split(","))):
    axis, _, raw = item.partition("=")
    axis = axis.strip()
    if axis not in AXES:
      raise ConfigError(f"--mesh {spec!r}: unknown axis {axis!r}; axes are "
                        f"{', '.join(AXES)} (e.g. --mesh data=2,model=2,pipe=2)")
    if axis in seen:
      raise ConfigError(f"--mesh {spec!r}: axis {axis!r} is given twice")
    try:
      sizes[axis] = int(raw)
    except ValueError:
      raise ConfigError(f"--mesh {spec!r}: size of {axis!r} must be an integer or -1, "
                        f"got {raw!r}") from None
    seen.add(axis)
  if -1 not in sizes.values() and "data" not in seen:
    sizes["data"] = -1
  return sizes


def resolve_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in the -1 axis and checks the product against the device count.

  Args:
    sizes: `{axis: size}` (e.g. the `mesh` config section); at most one -1.
    num_devices: devices of all processes.

  Returns:
    `{axis: size}` in `AXES` order, product == num_devices.

  Raises:
    ConfigError: more than one -1, a size < 1, or a product that does not match.
  """
  sizes = {axis: int(sizes.get(axis, 1)) for axis in AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  bad = [f"{axis}={size}" for axis, size in sizes.items() if size < 1 and size != -1]
  if bad or len(free) > 1:
    raise ConfigError(f"mesh {_format(sizes)}: sizes must be >= 1, with at most one -1 "
                      f"(\"the rest\"); got {', '.join(bad) or 'several -1'}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {_format(sizes)}: the fixed axes need a multiple of {fixed} "
                        f"devices, but there are {num_devices}; pick sizes whose product "
                        f"divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh {_format(sizes)} has {fixed} devices but there are "
                      f"{num_devices}; make the sizes multiply to {num_devices} "
                      "(or set one axis to -1)")
  return sizes


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """Builds the mesh over `devices` (default: all devices of all processes).

  Devices are laid out by `jax.make_mesh` (topology-aware on TPU/GPU; on a multi-process
  run each process's devices are contiguous along the outer axes).

  Args:
    sizes: `{axis: size}`, e.g. the `mesh` config section; its optional `num_devices`
      (0: all) takes the first N devices when `devices` is None.
    devices: the devices to use; all of them when None.

  Returns:
    A `jax.sharding.Mesh` with axes `AXES` (Auto axis types: shardings propagate).

  Raises:
    ConfigError: the sizes do not match the devices, or `num_devices` asks for more
      devices than exist (or for part of a multi-process job).
  """
  if devices is None:
    devices = jax.devices()
    wanted = int(sizes.get("num_devices", 0) or 0)
    if wanted:
      if wanted > len(devices):
        raise ConfigError(f"mesh.num_devices={wanted}, but there are only {len(devices)} "
                          f"devices; use at most {len(devices)} (0 means all)")
      if jax.process_count() > 1 and wanted != len(devices):
        raise ConfigError(f"mesh.num_devices={wanted}: a multi-process run spans all "
                          f"{len(devices)} devices of its processes; leave it at 0")
      devices = devices[:wanted]
  devices = list(devices)
  shape = resolve_shape(sizes, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(tuple(shape[a] for a in AXES), AXES, axis_types=axis_types,
                         devices=devices)
  except (ValueError, NotImplementedError):
    # Device layouts make_mesh cannot map onto the physical topology: use process order.
    grid = np.asarray(devices, dtype=object).reshape(tuple(shape[a] for a in AXES))
    return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
  """How many ways a batch is split (the product of the batch axes)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def describe(mesh: jax.sharding.Mesh) -> str:
  """`"pipe=1,data=4,fsdp=1,model=2 (8 devices)"`."""
  return f"{_format(dict(mesh.shape))} ({mesh.size} devices)"


def _format(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{axis}={sizes[axis]}" for axis in AXES if axis in sizes)
