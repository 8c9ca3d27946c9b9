"""Continuous relaxations of a categorical choice: DARTS, FBNet and GDAS weightings.

Each turns a vector of architecture logits into mixing weights over the candidates:

- "softmax" (DARTS): softmax(logits / temperature), deterministic.
- "gumbel" (FBNet, SNAS): softmax((logits + g) / temperature) with Gumbel noise g, so the
  weights are a differentiable sample that sharpens towards one-hot as temperature -> 0.
- "hard_gumbel" (GDAS): the one-hot argmax of logits + g in the forward pass, with the
  gradient of the soft Gumbel sample (straight-through).

Without an rng (evaluation) the Gumbel modes drop the noise: "gumbel" is the tempered
softmax and "hard_gumbel" the one-hot argmax of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RELAXATIONS = ("softmax", "gumbel", "hard_gumbel")


def relax(logits: jax.Array, mode: str, temperature: float | jax.Array = 1.0,
          rng: jax.Array | None = None) -> jax.Array:
  """Returns mixing weights over the last axis of `logits`.

  Args:
    logits: architecture logits, [..., num_candidates].
    mode: one of `RELAXATIONS`.
    temperature: the softmax temperature (> 0); may be traced, for schedules.
    rng: Gumbel noise key; None for the deterministic (evaluation) weights.

  Returns:
    float32 weights of the same shape, summing to 1 over the last axis.
  """
  if mode not in RELAXATIONS:
    raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {mode!r}")
  logits = logits.astype(jnp.float32)
  if mode != "softmax" and rng is not None:
    logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  soft = jax.nn.softmax(logits / temperature, axis=-1)
  if mode != "hard_gumbel":
    return soft
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=soft.dtype)
  # Forward value is exactly one-hot; the gradient is that of the soft sample.
  return hard + (soft - jax.lax.stop_gradient(soft))


def probabilities(logits: jax.Array) -> jax.Array:
  """Returns the categorical distribution the logits define: softmax over the last axis.

  This is what costs are averaged under and what derivation takes the argmax of, for
  every relaxation: Gumbel-max sampling draws candidate i with exactly this probability.
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
