"""Adaptive per-layer precision: the controller behind `--precision mixed`.

Each policy-aware layer (`dsjax.nn`) sows cheap statistics of its output into the
"precision_stats" collection: max |value|, the count of non-finite values and its matmul
FLOPs. Every `check_every_steps` the loop hands the newest statistics (and, every
`error_check_every_steps`, each layer's relative error against a float32 forward pass on
the same batch) to `PrecisionController.observe`, which

  * promotes a half-precision layer to float32 when its output overflowed from finite
    inputs (a layer fed non-finite values by an earlier one is left alone), came within
    `overflow_fraction` of the half dtype's largest value, or drifted more than
    `error_tolerance` from float32;
  * demotes a promoted layer back to half after `stable_checks` checks in a row whose
    values stayed below `demote_fraction` of the half range (the window doubles each time
    the same layer is promoted again, so a borderline layer cannot flap).

A new plan means a recompiled step; the loop keeps the compiled step of every plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsjax.precision.plan import HALF, PrecisionPlan
from dsjax.precision.policy import get_policy, get_preset

LayerStats = dict[str, dict[str, Any]]


def controller_enabled(precision_config: Any) -> bool:
  """Says whether the adaptive controller runs.

  Args:
    precision_config: the `precision` config section (`policy`, `adaptive`).

  Returns:
    `precision.adaptive` when set, else what the preset says (`Preset.adaptive`: on for
    `mixed`, off for a policy string); never when the policy computes in float32, where
    there is nothing to adapt.
  """
  policy = get_policy(precision_config.policy)
  if policy.compute_dtype == jnp.float32:
    return False
  if precision_config.adaptive is None:
    preset = get_preset(precision_config.policy)
    return preset is not None and preset.adaptive
  return bool(precision_config.adaptive)


def collect_layer_stats(collection: Mapping[str, Any]) -> LayerStats:
  """Reduces a sown "precision_stats" collection to one record per layer path.

  A layer called several times (micro-batches, tied embeddings) sowed a tuple of values:
  `max_abs` takes their maximum, `nonfinite` and `matmul_flops` their sum. Works on
  traced arrays inside a jitted step and on host arrays alike.

  Args:
    collection: `variables["precision_stats"]` as returned by `apply(..., mutable=...)`.

  Returns:
    `{layer_path: {"max_abs", "nonfinite", "input_nonfinite", "matmul_flops"}}`.
  """
  reduce = {"max_abs": jnp.max, "nonfinite": jnp.sum, "input_nonfinite": jnp.sum,
            "matmul_flops": jnp.sum}
  stats: LayerStats = {}
  for key, values in traverse_util.flatten_dict(dict(collection), sep="/").items():
    path, _, name = key.rpartition("/")
    values = values if isinstance(values, tuple | list) else (values,)
    stats.setdefault(path, {})[name] = reduce[name](jnp.stack([jnp.asarray(v) for v in values]))
  return stats


def merge_layer_stats(stacked: LayerStats) -> LayerStats:
  """Reduces stats with a leading micro-batch axis (from a `lax.scan`) to one record."""
  return {path: {"max_abs": record["max_abs"].max(axis=0),
                 "nonfinite": record["nonfinite"].sum(axis=0),
                 "input_nonfinite": record["input_nonfinite"].sum(axis=0),
                 "matmul_flops": record["matmul_flops"][0]}  # Same every micro-batch.
          for path, record in stacked.items()}


def half_matmul_fraction(plan: PrecisionPlan | None, matmul_flops: Mapping[str, float],
                         compute_dtype: Any) -> float:
  """Share of the model's matmul FLOPs that run in half precision under `plan`.

  Args:
    plan: the precision plan (None: every layer in `compute_dtype`).
    matmul_flops: layer path -> matmul FLOPs per step, from the sown statistics.
    compute_dtype: the policy's compute dtype; float32 means no half-precision work.

  Returns:
    A number in [0, 1] (0 when the model reports no matmul FLOPs).
  """
  if jnp.dtype(compute_dtype) == jnp.float32:
    return 0.0
  total = sum(matmul_flops.values())
  if total == 0:
    return 0.0
  half = sum(flops for path, flops in matmul_flops.items()
             if plan is None or plan.choice(path) == HALF)
  return half / total


@dataclasses.dataclass
class PrecisionController:
  """Host-side controller that promotes and demotes layers between half and float32.

  Attributes:
    half_dtype: the half-precision compute dtype (float16 or bfloat16).
    plan: the current plan.
    overflow_fraction: promote when max |output| exceeds this share of the half max.
    error_tolerance: promote when the relative error against float32 exceeds this.
    demote_fraction: a promoted layer counts a check as stable below this share.
    stable_checks: stable checks in a row before a demotion (doubled per re-promotion).
    stable: per promoted layer, the current run of stable checks.
    promotions: per layer, how often it was promoted.
    events: human-readable log of changes, newest last.
  """

  half_dtype: Any
  plan: PrecisionPlan = dataclasses.field(default_factory=PrecisionPlan)
  overflow_fraction: float = 0.5
  error_tolerance: float = 0.05
  demote_fraction: float = 0.25
  stable_checks: int = 10
  stable: dict[str, int] = dataclasses.field(default_factory=dict)
  promotions: dict[str, int] = dataclasses.field(default_factory=dict)
  events: list[str] = dataclasses.field(default_factory=list)

  @property
  def half_max(self) -> float:
    return float(jnp.finfo(self.half_dtype).max)

  def observe(self, step: int, stats: LayerStats,
              errors: Mapping[str, float] | None = None) -> bool:
    """Updates the plan from one check's statistics.

    Args:
      step: the training step, for the event log.
      stats: `collect_layer_stats` output, as host numbers.
      errors: optional layer path -> relative error of the half output against float32.

    Returns:
      Whether the plan changed (the step must be recompiled).
    """
    errors = errors or {}
    plan = self.plan
    for path, record in sorted(stats.items()):
      max_abs, nonfinite = float(record["max_abs"]), int(record["nonfinite"])
      inherited = int(record.get("input_nonfinite", 0)) > 0  # Not this layer's overflow.
      error = float(errors.get(path, 0.0))
      if plan.choice(path) == HALF:
        reason = None
        if nonfinite > 0 and not inherited:
          reason = f"{nonfinite} non-finite outputs from finite inputs"
        elif np.isfinite(max_abs) and max_abs > self.overflow_fraction * self.half_max:
          reason = f"max |output| {max_abs:.3g} near the {self.half_max:.3g} limit"
        elif np.isfinite(error) and error > self.error_tolerance:
          reason = f"relative error {error:.3g} > {self.error_tolerance}"
        if reason:
          plan = plan.promote(path)
          self.promotions[path] = self.promotions.get(path, 0) + 1
          self.stable[path] = 0
          self.events.append(f"step {step}: promoted {path} to fp32 ({reason})")
      else:
        calm = (np.isfinite(max_abs) and max_abs < self.demote_fraction * self.half_max
                and error <= self.error_tolerance)
        self.stable[path] = self.stable.get(path, 0) + 1 if calm else 0
        window = self.stable_checks * 2 ** (self.promotions.get(path, 1) - 1)
        if self.stable[path] >= window:
          plan = plan.demote(path)
          self.stable.pop(path)
          self.events.append(f"step {step}: demoted {path} to half after {window} stable checks")
    changed = plan != self.plan
    self.plan = plan
    return changed

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state, checkpointed so a resumed run keeps its plan."""
    return {"plan": self.plan.to_dict(), "stable": dict(self.stable),
            "promotions": dict(self.promotions), "events": list(self.events[-100:])}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()` output."""
    self.plan = PrecisionPlan.from_dict(state["plan"])
    self.stable = {k: int(v) for k, v in state.get("stable", {}).items()}
    self.promotions = {k: int(v) for k, v in state.get("promotions", {}).items()}
    self.events = list(state.get("events", []))


def relative_errors(half_intermediates: Mapping[str, Any],
                    fp32_intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Per-layer relative error ||half - fp32|| / ||fp32|| of captured layer outputs.

  Args:
    half_intermediates: the "intermediates" collection of a forward pass under the
      current plan (`apply(..., capture_intermediates=True)`).
    fp32_intermediates: the same for the float32 model on the same batch and params.

  Returns:
    layer path -> relative error (a layer missing from either pass is left out).
  """
  half = traverse_util.flatten_dict(dict(half_intermediates), sep="/")
  full = traverse_util.flatten_dict(dict(fp32_intermediates), sep="/")
  errors = {}
  for key, values in half.items():
    path, _, name = key.rpartition("/")
    if name != "__call__" or key not in full or not path:
      continue
    h = jnp.asarray(values[0], jnp.float32)
    f = jnp.asarray(full[key][0], jnp.float32)
    if h.shape != f.shape:
      continue
    errors[path] = jnp.linalg.norm(h - f) / (jnp.linalg.norm(f) + 1e-30)
  return errors

