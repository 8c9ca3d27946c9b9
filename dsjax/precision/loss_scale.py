"""Dynamic loss scaling, and skipping of non-finite steps, for any train step.

Float16 gradients below 6e-8 underflow to zero. Multiplying the loss by a large scale
before differentiating lifts them into range; the gradients are divided by the same
scale (in float32) before the update. When a step overflows, the update is skipped, the
scale backs off, and after `growth_interval` finite steps in a row it grows again.

A train step uses either loss scale the same way:

  (loss, grads) = value_and_grad(lambda p: loss_scale.scale(loss_fn(p)))(params)
  grads = loss_scale.unscale(grads)
  finite = all_finite(grads)
  new_params, new_opt_state = ...update...
  params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
  loss_scale = loss_scale.adjust(finite)

The configuration fields are static pytree metadata, not leaves: they survive `jax.jit`,
`jax.tree.flatten`/`unflatten` and a checkpoint restore into a target, and the scale is
clamped to `[min_scale, max_scale]` so it never reaches zero or infinity.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dsjax.errors import ConfigError
from dsjax.precision.policy import Policy, needs_loss_scaling

_CONFIG_KEYS = ("initial_scale", "growth_interval", "growth_factor", "backoff_factor",
                "min_scale", "max_scale")


def _is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def all_finite(tree: Any) -> jax.Array:
  """Says whether every floating-point leaf of `tree` is finite.

  Args:
    tree: any pytree, typically gradients; non-floating leaves are ignored.

  Returns:
    A bool scalar: False if any floating leaf holds an inf or a NaN.
  """
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack(leaves))


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Picks one of two pytrees of the same structure, leaf by leaf, on a scalar.

  Used to skip an update: `select_tree(finite, new_state, old_state)` returns the old
  state bit for bit when `finite` is False, without Python branching on a traced value.

  Args:
    pred: a bool scalar.
    on_true: the tree returned where `pred` is True.
    on_false: the tree returned where `pred` is False; same structure as `on_true`.

  Returns:
    The selected tree.
  """
  if jnp.shape(pred) != ():
    raise ValueError(f"select_tree needs a scalar predicate, got shape {jnp.shape(pred)}")
  pred = jnp.asarray(pred, dtype=bool)
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@struct.dataclass
class DynamicLossScale:
  """A loss scale that backs off on overflow and grows after a run of finite steps.

  Build one with `dynamic_loss_scale`, which validates the configuration.

  Args:
    loss_scale: float32 scalar, the current scale.
    good_steps: int32 scalar, finite steps since the scale last changed.
    skipped_steps: int32 scalar, non-finite steps skipped so far.
    growth_interval: finite steps in a row after which the scale grows.
    growth_factor: the scale's multiplier on growth, > 1.
    backoff_factor: the scale's multiplier on overflow, in (0, 1).
    min_scale: the scale never falls below this.
    max_scale: the scale never rises above this, so it never becomes inf.
  """

  loss_scale: jax.Array
  good_steps: jax.Array
  skipped_steps: jax.Array
  growth_interval: int = struct.field(pytree_node=False, default=2000)
  growth_factor: float = struct.field(pytree_node=False, default=2.0)
  backoff_factor: float = struct.field(pytree_node=False, default=0.5)
  min_scale: float = struct.field(pytree_node=False, default=1.0)
  max_scale: float = struct.field(pytree_node=False, default=2.0**24)

  def scale(self, loss: jax.Array) -> jax.Array:
    """Returns `loss` in float32, multiplied by the loss scale.

    Args:
      loss: the loss, any floating dtype.

    Returns:
      The scaled float32 loss; differentiate this instead of `loss`.
    """
    return jnp.asarray(loss).astype(jnp.float32) * self.loss_scale

  def unscale(self, grads: Any) -> Any:
    """Divides the floating-point leaves of `grads` by the loss scale.

    The division runs in float32; each leaf keeps its dtype.

    Args:
      grads: gradients of the scaled loss.

    Returns:
      The gradients of the unscaled loss.
    """
    return jax.tree.map(
        lambda g: (g.astype(jnp.float32) / self.loss_scale).astype(g.dtype)
        if _is_float(g) else g,
        grads)

  def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
    """Returns the loss scale for the next step.

    Args:
      grads_finite: bool scalar, whether this step's gradients were all finite.

    Returns:
      On a finite step: `good_steps + 1`, and once that reaches `growth_interval`, the
      scale times `growth_factor` (at most `max_scale`) with `good_steps` reset to 0. On
      a non-finite step: the scale times `backoff_factor` (at least `min_scale`),
      `good_steps` 0 and `skipped_steps + 1`.
    """
    finite = jnp.asarray(grads_finite, dtype=bool)
    good = self.good_steps + 1
    grow = finite & (good >= self.growth_interval)
    # Computed in float32 then clamped: growth at max_scale stays max_scale, never inf.
    grown = jnp.minimum(self.loss_scale * jnp.float32(self.growth_factor),
                        jnp.float32(self.max_scale))
    backed_off = jnp.maximum(self.loss_scale * jnp.float32(self.backoff_factor),
                             jnp.float32(self.min_scale))
    loss_scale = jnp.where(finite, jnp.where(grow, grown, self.loss_scale), backed_off)
    good_steps = jnp.where(finite & ~grow, good, jnp.zeros_like(good))
    return self.replace(loss_scale=loss_scale.astype(jnp.float32),
                        good_steps=good_steps.astype(jnp.int32),
                        skipped_steps=(self.skipped_steps + (~finite)).astype(jnp.int32))


@struct.dataclass
class NoOpLossScale:
  """The loss scale of policies that need none: a fixed scale of 1.

  It still counts finite and skipped steps, since skipping a NaN update helps in float32
  and bfloat16 as well, so a train step treats every policy the same way.

  Args:
    loss_scale: float32 scalar, always 1.
    good_steps: int32 scalar, finite steps since the last skipped one.
    skipped_steps: int32 scalar, non-finite steps skipped so far.
  """

  loss_scale: jax.Array = struct.field(default_factory=lambda: jnp.ones((), jnp.float32))
  good_steps: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  skipped_steps: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))

  def scale(self, loss: jax.Array) -> jax.Array:
    """Returns `loss` unchanged.

    Args:
      loss: the loss.

    Returns:
      The same loss.
    """
    return loss

  def unscale(self, grads: Any) -> Any:
    """Returns `grads` unchanged.

    Args:
      grads: the gradients.

    Returns:
      The same gradients.
    """
    return grads

  def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
    """Counts the step as finite or skipped.

    Args:
      grads_finite: bool scalar, whether this step's gradients were all finite.

    Returns:
      The loss scale with updated `good_steps` and `skipped_steps`.
    """
    finite = jnp.asarray(grads_finite, dtype=bool)
    good_steps = jnp.where(finite, self.good_steps + 1, 0).astype(jnp.int32)
    return self.replace(good_steps=good_steps,
                        skipped_steps=(self.skipped_steps + (~finite)).astype(jnp.int32))


LossScale = DynamicLossScale | NoOpLossScale


def dynamic_loss_scale(initial_scale: float = 2.0**15, *, growth_interval: int = 2000,
                       growth_factor: float = 2.0, backoff_factor: float = 0.5,
                       min_scale: float = 1.0, max_scale: float = 2.0**24) -> DynamicLossScale:
  """Builds a validated `DynamicLossScale`.

  Args:
    initial_scale: the starting scale, within `[min_scale, max_scale]`.
    growth_interval: finite steps in a row after which the scale grows, >= 1.
    growth_factor: the scale's multiplier on growth, > 1.
    backoff_factor: the scale's multiplier on overflow, in (0, 1).
    min_scale: the smallest scale, > 0.
    max_scale: the largest scale, finite in float32 and >= `min_scale`.

  Returns:
    The loss scale, with `good_steps` and `skipped_steps` at 0.

  Raises:
    ConfigError: a value is out of range.
  """
  f32_max = float(jnp.finfo(jnp.float32).max)

  def check(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(f"invalid loss scale config: {message}")

  numbers = {"initial_scale": initial_scale, "growth_factor": growth_factor,
             "backoff_factor": backoff_factor, "min_scale": min_scale, "max_scale": max_scale}
  for name, value in numbers.items():
    check(isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value), f"{name} must be a finite number, got {value!r}")
  check(isinstance(growth_interval, int) and not isinstance(growth_interval, bool)
        and growth_interval >= 1, f"growth_interval must be an integer >= 1, "
        f"got {growth_interval!r}")
  check(growth_factor > 1, f"growth_factor must be > 1, got {growth_factor!r}")
  check(0 < backoff_factor < 1, f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
  check(min_scale > 0, f"min_scale must be > 0, got {min_scale!r}")
  check(min_scale <= max_scale <= f32_max,
        f"max_scale must be in [min_scale={min_scale!r}, {f32_max:.3g}], got {max_scale!r}")
  check(min_scale <= initial_scale <= max_scale,
        f"initial_scale must be in [min_scale, max_scale] = [{min_scale!r}, {max_scale!r}], "
        f"got {initial_scale!r}")
  return DynamicLossScale(
      loss_scale=jnp.asarray(initial_scale, jnp.float32),
      good_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32),
      growth_interval=growth_interval, growth_factor=float(growth_factor),
      backoff_factor=float(backoff_factor), min_scale=float(min_scale),
      max_scale=float(max_scale))


def loss_scale_for(policy: Policy, **config: Any) -> LossScale:
  """Returns the loss scale a policy needs.

  The config is validated under every policy, so a typo fails on a bfloat16 run too
  rather than only once float16 is switched on.

  Args:
    policy: the precision policy.
    **config: keyword arguments of `dynamic_loss_scale`.

  Returns:
    A `DynamicLossScale` if `needs_loss_scaling(policy)`, else a `NoOpLossScale`.

  Raises:
    ConfigError: an unknown key or an out-of-range value in `config`.
  """
  unknown = sorted(set(config) - set(_CONFIG_KEYS))
  if unknown:
    raise ConfigError(f"invalid loss scale config: unknown key(s) {', '.join(unknown)}; "
                      f"known: {', '.join(_CONFIG_KEYS)}")
  dynamic = dynamic_loss_scale(**config)
  return dynamic if needs_loss_scaling(policy) else NoOpLossScale()
