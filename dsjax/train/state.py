"""Train state: step, float32 master params, model state, optimizer state, root rng, and
(when searching) the architecture logits with their optimizer state."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from dsjax import precision
from dsjax.parallel import compression as compression_lib
from dsjax.parallel import sharding
from dsjax.train.tasks import Task


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; checkpointed whole.

  Attributes:
    step: optimizer steps taken so far.
    params: master weights, in the policy's `param_dtype` (float32 unless `p=bf16`).
    model_state: non-trainable variables (e.g. `batch_stats`); `{}` when the model has none.
    opt_state: optax state.
    rng: root PRNG key (raw uint32); step `s` uses `fold_in(rng, s)`, so a resumed run
      draws the same randomness as an uninterrupted one.
    loss_scale: a `precision.DynamicLossScale` (float16 compute) or `NoOpLossScale`.
    grad_sync: per-replica state of compressed gradient exchange (error-feedback
      residuals; `dsjax.parallel.compression`), leading axis on `data`; None when dense.
    pending_grads: delayed update: the exchanged gradient the next step applies; None
      when updates are synchronous.
    arch: a DNAS search's `arch` collection (architecture logits), sharded and
      checkpointed like the rest; None outside a search.
    arch_opt_state: the state of `arch_tx`; None outside a search.
    apply_fn: the model's apply function (static).
    tx: the optimizer (static).
    arch_tx: the architecture optimizer of a search (static); None otherwise.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: optax.OptState
  rng: jax.Array
  loss_scale: precision.LossScale
  grad_sync: Any
  pending_grads: Any
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  arch: Any = None
  arch_opt_state: Any = None
  arch_tx: optax.GradientTransformation | None = struct.field(pytree_node=False, default=None)

  def apply_gradients(self, grads: Any, model_state: Any) -> tuple[TrainState, Any]:
    """Returns the state after one optimizer update, and the update itself."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    new_state = self.replace(step=self.step + 1, params=params, model_state=model_state,
                             opt_state=opt_state)
    return new_state, updates


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       inputs: tuple[int, ...] | Mapping[str, Any], seed: int,
                       loss_scale: precision.LossScale | None = None, *,
                       task: Task | None = None, mesh: jax.sharding.Mesh | None = None,
                       rules: Any = (),
                       grad_compression: compression_lib.Compression | None = None,
                       delayed_update: bool = False,
                       arch_tx: optax.GradientTransformation | None = None,
                       policy: precision.Policy | None = None) -> TrainState:
  """Initialises a fresh train state, born sharded when a mesh is given.

  Args:
    model: the Flax module.
    tx: the weight optimizer.
    inputs: one example's image shape (no batch dimension), or an example batch from which
      `task` picks the model's arguments.
    seed: the run's seed; init and training keys both derive from it.
    loss_scale: the loss scale to start from; a no-op one when None.
    task: reads the model's arguments from `inputs` (default: image classification).
    mesh: the device mesh; params and optimizer state are created directly in the
      shardings the logical axis `rules` give them (never whole on one device).
    rules: logical -> mesh axis rules (`dsjax.parallel.sharding.parse_rules`).
    grad_compression: set up the per-replica error-feedback state of compressed gradient
      exchange (one slice per `data` replica of the mesh).
    delayed_update: set up the in-flight gradient of delayed updates (zeros).
    arch_tx: a DNAS search: the model's `arch` collection becomes the state's `arch`,
      optimized by `arch_tx` (the model must create one).
    policy: the precision policy; the params, and with them the optimizer state, are kept
      in its `param_dtype` (float32 when None).

  Returns:
    A TrainState at step 0, its params in the policy's `param_dtype`.
  """
  task = task or Task("classification")
  if isinstance(inputs, Mapping):
    args, kwargs = task.model_args({k: jnp.asarray(v) for k, v in inputs.items()})
  else:
    args, kwargs = (jnp.zeros((1, *inputs), jnp.float32),), {}

  def init(seed_key: jax.Array, unbox: bool = True) -> TrainState:
    init_rng, train_rng = jax.random.split(seed_key)
    variables = dict(model.init({"params": init_rng, "dropout": init_rng}, *args, train=False,
                                **kwargs))
    params = variables.pop("params")
    if policy is not None:  # Created float32, kept in param_dtype (bfloat16: half the bytes).
      params = policy.cast_to_param(params)
    arch = arch_opt_state = None
    if arch_tx is not None:
      arch = variables.pop("arch", None)
      if not arch:
        raise ValueError("the model created no 'arch' collection; is it a discrete network?")
      arch_opt_state = arch_tx.init(arch)
    grad_sync = pending = None
    if grad_compression is not None:
      replicas = mesh.shape["data"] if mesh is not None else 1
      grad_sync = jax.tree.map(
          lambda x: nn.LogicallyPartitioned(x, ("replica",) + (None,) * (x.ndim - 1)),
          compression_lib.init_state(nn.meta.unbox(params), grad_compression, replicas))
    if delayed_update:
      pending = jax.tree.map(jnp.zeros_like, params)  # Keeps the params' logical axes.
    # The optimizer state mirrors the (boxed) params, so it inherits their logical axes.
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                       opt_state=tx.init(params), rng=train_rng,
                       loss_scale=loss_scale or precision.NoOpLossScale(),
                       grad_sync=grad_sync, pending_grads=pending, apply_fn=model.apply, tx=tx,
                       arch=arch, arch_opt_state=arch_opt_state, arch_tx=arch_tx)
    # Logical-axis boxes serve only to derive shardings; the state holds plain arrays.
    return nn.meta.unbox(state) if unbox else state

  key = jax.random.PRNGKey(seed)
  if mesh is None:
    # One compiled program instead of hundreds of eagerly dispatched initialiser ops.
    return jax.jit(init)(key)
  shardings = state_shardings(init, key, mesh, rules)
  return jax.jit(init, out_shardings=shardings)(key)


def state_shardings(init: Callable[..., TrainState], key: jax.Array, mesh: jax.sharding.Mesh,
                    rules: Any) -> TrainState:
  """The shardings of the state `init(key)` makes, from its logical axis names."""
  abstract = jax.eval_shape(functools.partial(init, unbox=False), key)
  return sharding.logical_shardings(abstract, mesh, rules)
