"""Per-layer precision plans, and the one precision attribute a model hands its layers.

A plan maps a layer's Flax module path ("encoder/layer_0/attention", the '/'-joined
`module.scope.path`) to "half" or "fp32". A `LayerPrecision` bundles the run's compute
dtype, the plan and the matmul implementation: models hold one and pass it to every
`dsjax.nn` layer, which asks it for its dtype (`LayerPrecision.dtype`). Both are immutable
and hashable so a module can hold them as dataclass fields and still be a static
`jax.jit` argument: two equal plans hit the same compilation cache entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

HALF = "half"
FP32 = "fp32"
CHOICES = (HALF, FP32)


def _check_choice(choice: str) -> str:
  if choice not in CHOICES:
    raise ValueError(f"precision choice must be one of {CHOICES}, got {choice!r}")
  return choice


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
  """An immutable map from layer path to "half" | "fp32".

  Entries are kept as a sorted tuple (not a dict) so equal plans compare and hash equal
  regardless of how they were built. Paths match exactly: promoting "block/attention"
  does not promote "block/attention/query"; list every layer that should be float32.

  Attributes:
    entries: sorted, duplicate-free (path, choice) pairs.
    default: the choice for paths not in `entries`.
  """

  entries: tuple[tuple[str, str], ...] = ()
  default: str = HALF

  def __post_init__(self) -> None:
    _check_choice(self.default)
    merged: dict[str, str] = {}
    for path, choice in self.entries:
      if not isinstance(path, str):
        raise ValueError(f"layer paths must be strings, got {path!r}")
      merged[path] = _check_choice(choice)
    # Normalising here keeps __eq__/__hash__ independent of construction order.
    object.__setattr__(self, "entries", tuple(sorted(merged.items())))

  def choice(self, path: str) -> str:
    """Returns "half" or "fp32" for the layer at `path`.

    Args:
      path: '/'-joined module path.

    Returns:
      The listed choice, or `default` when the path is not listed.
    """
    return dict(self.entries).get(path, self.default)

  def with_choice(self, path: str, choice: str) -> PrecisionPlan:
    """Returns a copy with `path` set to `choice`.

    Args:
      path: '/'-joined module path.
      choice: "half" or "fp32".

    Returns:
      A new plan; this one is unchanged.
    """
    merged = dict(self.entries)
    merged[path] = _check_choice(choice)
    return PrecisionPlan(tuple(merged.items()), self.default)

  def promote(self, path: str) -> PrecisionPlan:
    """Returns a copy in which the layer at `path` computes in float32."""
    return self.with_choice(path, FP32)

  def demote(self, path: str) -> PrecisionPlan:
    """Returns a copy in which the layer at `path` computes in half precision."""
    return self.with_choice(path, HALF)

  def promoted(self) -> tuple[str, ...]:
    """Returns the listed paths whose choice is "fp32", sorted."""
    return tuple(path for path, choice in self.entries if choice == FP32)

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable form: {"default": ..., "layers": {path: choice}}."""
    return {"default": self.default, "layers": dict(self.entries)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
    """Inverse of `to_dict`.

    Args:
      data: {"default": "half" | "fp32", "layers": {path: choice}}; both keys optional.

    Returns:
      The plan.

    Raises:
      ValueError: on an unknown choice string.
    """
    layers = data.get("layers", {})
    return cls(tuple(layers.items()), data.get("default", HALF))


def module_path(module: nn.Module) -> str:
  """Returns the '/'-joined path of a bound linen module ("" for the root).

  Args:
    module: a module inside `init` or `apply`.

  Returns:
    The path, as used for `PrecisionPlan` keys.

  Raises:
    ValueError: if the module is unbound (no scope).
  """
  if module.scope is None:
    raise ValueError(f"{type(module).__name__} is unbound; its path exists only inside "
                     "init/apply")
  return "/".join(module.scope.path)


def layer_dtype(module: nn.Module, compute_dtype: Any,
                plan: PrecisionPlan | None) -> jnp.dtype:
  """Returns the dtype a layer computes in.

  Args:
    module: the bound linen layer asking.
    compute_dtype: the run's compute dtype (float32, bfloat16 or float16).
    plan: the precision plan, or None for "every layer in `compute_dtype`".

  Returns:
    float32 if the plan promotes this layer's path, else `compute_dtype`.
  """
  if plan is not None and plan.choice(module_path(module)) == FP32:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(compute_dtype)


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
  """How a model's layers compute: the one precision attribute models hand to layers.

  The master-weight dtype is not here: parameters are created float32 and stored in the
  policy's `param_dtype` by the train state (`dsjax.train.create_train_state`), so a
  layer reads them in whatever dtype they are kept and casts them to its own.

  Attributes:
    compute_dtype: the run's half (or float32) compute dtype, the policy's
      `compute_dtype`; normalised to a `numpy.dtype`.
    plan: the per-layer plan; None: every layer computes in `compute_dtype`.
    matmul_impl: how `dsjax.nn.Dense` layers multiply: "xla" (`lax.dot_general`) or
      "pallas" (`pallas_kernels.matmul`, half inputs, float32 accumulation); other layers
      ignore it.
  """

  compute_dtype: Any = jnp.float32
  plan: PrecisionPlan | None = None
  matmul_impl: str = "xla"

  def __post_init__(self) -> None:
    object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype))

  def dtype(self, module: nn.Module) -> jnp.dtype:
    """Returns the dtype the bound layer `module` computes in (see `layer_dtype`)."""
    return layer_dtype(module, self.compute_dtype, self.plan)

  def replace(self, **changes: Any) -> LayerPrecision:
    """Returns a copy with `changes` (any of the attributes) applied."""
    return dataclasses.replace(self, **changes)
