"""Train state: step, float32 master params, model state, optimizer state, root rng."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from dsjax import precision


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; checkpointed whole.

  Attributes:
    step: optimizer steps taken so far.
    params: float32 master weights.
    model_state: non-trainable variables (e.g. `batch_stats`); `{}` when the model has none.
    opt_state: optax state.
    rng: root PRNG key (raw uint32); step `s` uses `fold_in(rng, s)`, so a resumed run
      draws the same randomness as an uninterrupted one.
    loss_scale: a `precision.DynamicLossScale` (float16 compute) or `NoOpLossScale`.
    apply_fn: the model's apply function (static).
    tx: the optimizer (static).
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: optax.OptState
  rng: jax.Array
  loss_scale: precision.LossScale
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, model_state: Any) -> tuple[TrainState, Any]:
    """Returns the state after one optimizer update, and the update itself."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    new_state = self.replace(step=self.step + 1, params=params, model_state=model_state,
                             opt_state=opt_state)
    return new_state, updates


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...], seed: int,
                       loss_scale: precision.LossScale | None = None) -> TrainState:
  """Initialises a fresh train state.

  Args:
    model: the Flax module; called as `model.apply(variables, x, train=...)`.
    tx: the weight optimizer.
    input_shape: the shape of one example (no batch dimension).
    seed: the run's seed; init and training keys both derive from it.
    loss_scale: the loss scale to start from; a no-op one when None.

  Returns:
    A TrainState at step 0 with float32 params.
  """
  def init(seed_key: jax.Array) -> TrainState:
    init_rng, train_rng = jax.random.split(seed_key)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    variables = dict(model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False))
    # Logical-axis boxes matter only when sharding; the state holds plain arrays.
    params = nn.meta.unbox(variables.pop("params"))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), rng=train_rng,
                      loss_scale=loss_scale or precision.NoOpLossScale(),
                      apply_fn=model.apply, tx=tx)

  # One compiled program instead of hundreds of eagerly dispatched initialiser ops.
  return jax.jit(init)(jax.random.PRNGKey(seed))
