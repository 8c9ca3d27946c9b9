"""The bilevel search step: architecture on validation batches, weights on training ones.

`search_step(state, train_batch, val_batch, rng) -> (state, metrics)` is one pure
function, jitted once. It first updates the architecture logits (the `arch` collection)
with the weights frozen, then the weights (`params`) with the architecture frozen, each
with its own optax transformation and state, as in DARTS' alternating scheme:

  arch:    a <- a - Adam(grad_a [L_val(w*, a) + penalty(a)])
  weights: w <- w - opt(grad_w L_train(w, a))

First order uses w* = w. Second order uses the unrolled w* = w - xi grad_w L_train(w, a)
and the exact chain rule

  grad_a L_val(w*, a) - xi * (d2 L_train / da dw)(w, a) . grad_w* L_val(w*, a),

where the mixed term is a Hessian-vector product computed forward-over-reverse (a jvp of
the arch gradient along the weight direction), not DARTS' finite difference. The unrolled
step is plain gradient descent (DARTS also folds in momentum and weight decay).

During `warmup_steps` only the weights train (uniform architecture: collapse mitigation,
as in PC-DARTS/FBNet). Collapse guards: the penalty can weigh the probability of
parameter-free ops (`cost.make_arch_penalty`), and `aux_skip_fn` adds DARTS-' decaying
auxiliary skip path to the supernet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, Metrics]]
Schedule = Callable[[jax.Array], Any]


@struct.dataclass
class SearchState:
  """Everything a search step reads and writes.

  Attributes:
    step: search steps taken so far.
    params: float32 weights (the weight optimizer's whole tree).
    arch: the `arch` collection (architecture logits; the arch optimizer's whole tree).
    model_state: other variable collections (e.g. batch statistics); `{}` if none.
    weight_opt_state: state of `weight_tx`.
    arch_opt_state: state of `arch_tx`.
    rng: root key; step s draws from fold_in(rng, s).
    apply_fn: the supernet's apply function (static).
    weight_tx: weight optimizer (static).
    arch_tx: architecture optimizer (static).
  """

  step: jax.Array
  params: Any
  arch: Any
  model_state: Any
  weight_opt_state: optax.OptState
  arch_opt_state: optax.OptState
  rng: jax.Array
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  weight_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  arch_tx: optax.GradientTransformation = struct.field(pytree_node=False)


def arch_optimizer(learning_rate: float = 3e-4, weight_decay: float = 1e-3
                   ) -> optax.GradientTransformation:
  """Returns DARTS' architecture optimizer: Adam(lr, betas (0.5, 0.999)) with weight decay."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.adam(learning_rate, b1=0.5, b2=0.999))


def create_search_state(model: nn.Module, weight_tx: optax.GradientTransformation,
                        arch_tx: optax.GradientTransformation, input_shape: tuple[int, ...],
                        seed: int) -> SearchState:
  """Initialises a search state at step 0.

  Args:
    model: the supernet; its `init` must create a non-empty `arch` collection.
    weight_tx: optimizer of `params`.
    arch_tx: optimizer of `arch`, e.g. `arch_optimizer()`.
    input_shape: one example's shape (no batch dimension).
    seed: init and search randomness derive from it.

  Returns:
    The state; params and arch are disjoint trees with separate optimizer states.
  """
  return _init_fn(model, weight_tx, arch_tx, tuple(input_shape))(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=32)
def _init_fn(model: nn.Module, weight_tx: optax.GradientTransformation,
             arch_tx: optax.GradientTransformation, input_shape: tuple[int, ...]
             ) -> Callable[[jax.Array], SearchState]:
  # Cached so that searches from several seeds compile the initialiser once.
  def init(key: jax.Array) -> SearchState:
    init_rng, search_rng = jax.random.split(key)
    variables = dict(model.init({"params": init_rng, "dropout": init_rng},
                                jnp.zeros((1, *input_shape), jnp.float32)))
    params = nn.meta.unbox(variables.pop("params"))
    arch = variables.pop("arch", None)
    if not arch:
      raise ValueError("the model created no 'arch' collection; is it a discrete network?")
    return SearchState(step=jnp.zeros((), jnp.int32), params=params, arch=arch,
                       model_state=variables, weight_opt_state=weight_tx.init(params),
                       arch_opt_state=arch_tx.init(arch), rng=search_rng,
                       apply_fn=model.apply, weight_tx=weight_tx, arch_tx=arch_tx)

  return jax.jit(init)


def classification_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
  """Mean softmax cross-entropy against `batch["label"]`, and accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
  return loss, {"accuracy": accuracy}


def regression_loss(outputs: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
  """Mean squared error against `batch["target"]` (same shape as the outputs)."""
  return jnp.mean(jnp.square(outputs - batch["target"])), {}


def _constant(value: float) -> Schedule:
  return lambda step: jnp.asarray(value, jnp.float32)


def _loss(state: SearchState, loss_fn: LossFn, params: Any, arch: Any, batch: Batch,
          rng: jax.Array, temperature: Any, aux_skip: Any) -> tuple[jax.Array, tuple]:
  """Runs the supernet in training mode; returns loss and (model_state, loss metrics)."""
  variables = {"params": params, "arch": arch, **state.model_state}
  rngs = {"dropout": jax.random.fold_in(rng, 0), "gumbel": jax.random.fold_in(rng, 1)}
  kwargs = {"train": True, "temperature": temperature, "aux_skip": aux_skip, "rngs": rngs}
  model_state = state.model_state
  if model_state:
    outputs, model_state = state.apply_fn(variables, batch["image"],
                                          mutable=list(model_state), **kwargs)
  else:
    outputs = state.apply_fn(variables, batch["image"], **kwargs)
  loss, metrics = loss_fn(outputs, batch)
  return loss, (dict(model_state), metrics)


def arch_gradient(state: SearchState, train_batch: Batch, val_batch: Batch, rng: jax.Array, *,
                  loss_fn: LossFn = classification_loss, order: int = 1, unroll_lr: float = 0.0,
                  temperature: Any = 1.0, aux_skip: Any = 0.0) -> tuple[Any, jax.Array]:
  """Returns the gradient of the validation loss wrt `state.arch`, and that loss.

  Args:
    state: the search state (weights w, architecture a).
    train_batch: the batch of the (unrolled) inner weight step; unused for order 1.
    val_batch: the batch of the outer objective.
    rng: randomness of both forward passes (Gumbel noise, dropout).
    loss_fn: `(outputs, batch) -> (scalar loss, metrics)`.
    order: 1 (w* = w) or 2 (w* = w - unroll_lr grad_w L_train, exact chain rule).
    unroll_lr: xi, the inner step size of the second-order gradient.
    temperature: relaxation temperature.
    aux_skip: DARTS- auxiliary skip weight.

  Returns:
    (gradient with the structure of `state.arch`, L_val(w*, a)); no penalty included.
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")
  rng_train, rng_val = jax.random.split(rng)

  def loss(params, arch, batch, key):
    return _loss(state, loss_fn, params, arch, batch, key, temperature, aux_skip)[0]

  if order == 1:
    value, grads = jax.value_and_grad(loss, argnums=1)(state.params, state.arch, val_batch,
                                                      rng_val)
    return grads, value
  train_loss = lambda params, arch: loss(params, arch, train_batch, rng_train)
  inner = jax.grad(train_loss)(state.params, state.arch)
  unrolled = jax.tree.map(lambda w, g: w - unroll_lr * g, state.params, inner)
  value, (v, direct) = jax.value_and_grad(loss, argnums=(0, 1))(unrolled, state.arch,
                                                               val_batch, rng_val)
  # d/de grad_a L_train(w + e v, a) at e = 0 is the mixed Hessian (d2/da dw) times v.
  arch_grad_of = lambda params: jax.grad(train_loss, argnums=1)(params, state.arch)
  _, mixed = jax.jvp(arch_grad_of, (state.params,), (v,))
  grads = jax.tree.map(lambda d, m: d - unroll_lr * m, direct, mixed)
  return grads, value


def make_arch_update(*, loss_fn: LossFn = classification_loss, order: int = 1,
                     unroll_lr: float = 0.0,
                     arch_penalty_fn: Callable[[Any], tuple[jax.Array, Metrics]] | None = None
                     ) -> Callable[..., tuple[SearchState, Metrics]]:
  """Builds `arch_update(state, train_batch, val_batch, rng, temperature, aux_skip)`.

  Args:
    loss_fn: `(outputs, batch) -> (scalar loss, metrics)`.
    order: 1 or 2 (see `arch_gradient`).
    unroll_lr: xi of the second-order unrolled step.
    arch_penalty_fn: `arch -> (penalty, metrics)`, e.g. `cost.make_arch_penalty(...)`.

  Returns:
    The update: one `arch_tx` step on grad_a [L_val + penalty]; params are not touched.
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")

  def arch_update(state: SearchState, train_batch: Batch, val_batch: Batch, rng: jax.Array,
                  temperature: Any = 1.0, aux_skip: Any = 0.0) -> tuple[SearchState, Metrics]:
    grads, val_loss = arch_gradient(state, train_batch, val_batch, rng, loss_fn=loss_fn,
                                    order=order, unroll_lr=unroll_lr,
                                    temperature=temperature, aux_skip=aux_skip)
    metrics = {"val_loss": val_loss}
    if arch_penalty_fn is not None:
      (penalty, penalty_metrics), penalty_grads = jax.value_and_grad(
          arch_penalty_fn, has_aux=True)(state.arch)
      grads = jax.tree.map(jnp.add, grads, penalty_grads)
      metrics.update(penalty=penalty, **penalty_metrics)
    updates, opt_state = state.arch_tx.update(grads, state.arch_opt_state, state.arch)
    metrics["arch_grad_norm"] = optax.tree.norm(grads)
    return state.replace(arch=optax.apply_updates(state.arch, updates),
                         arch_opt_state=opt_state), metrics

  return arch_update


def make_weight_update(*, loss_fn: LossFn = classification_loss
                       ) -> Callable[..., tuple[SearchState, Metrics]]:
  """Builds `weight_update(state, batch, rng, temperature, aux_skip)`: one `weight_tx` step.

  The architecture enters the forward pass as a constant, so `arch` is not touched.
  """
  def weight_update(state: SearchState, batch: Batch, rng: jax.Array, temperature: Any = 1.0,
                    aux_skip: Any = 0.0) -> tuple[SearchState, Metrics]:
    def loss(params):
      return _loss(state, loss_fn, params, state.arch, batch, rng, temperature, aux_skip)

    (value, (model_state, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params)
    updates, opt_state = state.weight_tx.update(grads, state.weight_opt_state, state.params)
    new_state = state.replace(params=optax.apply_updates(state.params, updates),
                              weight_opt_state=opt_state, model_state=model_state)
    return new_state, {"train_loss": value, "weight_grad_norm": optax.tree.norm(grads),
                       **{f"train_{k}": v for k, v in metrics.items()}}

  return weight_update


def make_search_step(*, loss_fn: LossFn = classification_loss, order: int = 1,
                     unroll_lr: float = 0.0, warmup_steps: int = 0,
                     temperature_fn: Schedule | None = None,
                     aux_skip_fn: Schedule | None = None,
                     arch_penalty_fn: Callable[[Any], tuple[jax.Array, Metrics]] | None = None
                     ) -> Callable[..., tuple[SearchState, Metrics]]:
  """Builds the bilevel `search_step(state, train_batch, val_batch, rng)`.

  Args:
    loss_fn: `(outputs, batch) -> (scalar loss, metrics)`; classification by default.
    order: 1 (first-order DARTS) or 2 (unrolled, exact Hessian-vector product).
    unroll_lr: xi of the second-order step; DARTS uses the weight learning rate.
    warmup_steps: steps at the start that train weights only (architecture frozen).
    temperature_fn: step -> temperature; constant 1 by default. FBNet:
      `optax.exponential_decay(5.0, steps_per_epoch, 0.956)`; GDAS:
      `optax.linear_schedule(10.0, 0.1, steps)`.
    aux_skip_fn: step -> weight of the DARTS- auxiliary skip, e.g.
      `optax.linear_schedule(1.0, 0.0, steps)`; None disables it.
    arch_penalty_fn: `arch -> (penalty, metrics)`, see `cost.make_arch_penalty`.

  Returns:
    `search_step(state, train_batch, val_batch, rng) -> (state, metrics)`, to be jitted
    (donating the state is safe). `rng` is folded with the step, so one key may be reused.
  """
  temperature_fn = temperature_fn or _constant(1.0)
  aux_skip_fn = aux_skip_fn or _constant(0.0)
  arch_update = make_arch_update(loss_fn=loss_fn, order=order, unroll_lr=unroll_lr,
                                 arch_penalty_fn=arch_penalty_fn)
  weight_update = make_weight_update(loss_fn=loss_fn)

  def search_step(state: SearchState, train_batch: Batch, val_batch: Batch,
                  rng: jax.Array) -> tuple[SearchState, Metrics]:
    rng = jax.random.fold_in(jax.random.fold_in(rng, 0), state.step)
    arch_rng, weight_rng = jax.random.split(rng)
    temperature = jnp.asarray(temperature_fn(state.step), jnp.float32)
    aux_skip = jnp.asarray(aux_skip_fn(state.step), jnp.float32)
    args = (train_batch, val_batch, arch_rng, temperature, aux_skip)

    def skip(state: SearchState, *_) -> tuple[SearchState, Metrics]:
      shapes = jax.eval_shape(arch_update, state, *args)[1]
      metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      if arch_penalty_fn is not None:  # Costs need no forward pass: log them in warm-up too.
        metrics["penalty"], penalty_metrics = arch_penalty_fn(state.arch)
        metrics.update(penalty_metrics)
      return state, metrics

    searching = state.step >= warmup_steps
    state, arch_metrics = jax.lax.cond(searching, arch_update, skip, state, *args)
    state, weight_metrics = weight_update(state, train_batch, weight_rng, temperature, aux_skip)
    metrics = {**arch_metrics, **weight_metrics, "temperature": temperature,
               "aux_skip": aux_skip, "arch_active": searching.astype(jnp.float32)}
    return state.replace(step=state.step + 1), metrics

  return search_step
