"""The bilevel search step builder: architecture on validation batches, weights on training
ones.

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

Both updates run under the state's loss scale (`dsjax.precision`): each loss is scaled
before differentiation and its gradients unscaled after, and an update whose gradients are
not all finite is skipped (the loss scale backs off). The trainer's state and `SearchState`
both carry what the step reads, so `dsjax.train` runs the search with the same mesh,
precision policy, checkpoints and hooks as training (`dsjax.train.search`).
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

from dsjax import precision

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, Metrics]]
Schedule = Callable[[jax.Array], Any]
# `forward(state, params, arch, batch, rng, temperature, aux_skip) -> (loss, (model_state,
# metrics))`: the supernet in training mode on one batch. Metrics may hold
# `precision_stats` (the layers' statistics for the precision controller).
Forward = Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]


@struct.dataclass
class SearchState:
  """Everything a search step reads and writes, outside the trainer.

  `dsjax.train.TrainState` has the same fields (with `arch` set), so the step builders
  here work on either.

  Attributes:
    step: search steps taken so far.
    params: float32 weights (the weight optimizer's whole tree).
    arch: the `arch` collection (architecture logits; the arch optimizer's whole tree).
    model_state: other variable collections (e.g. batch statistics); `{}` if none.
    opt_state: state of `tx`.
    arch_opt_state: state of `arch_tx`.
    rng: root key; step s draws from fold_in(rng, s).
    loss_scale: a `precision.LossScale`; no scaling by default.
    apply_fn: the supernet's apply function (static).
    tx: weight optimizer (static).
    arch_tx: architecture optimizer (static).
  """

  step: jax.Array
  params: Any
  arch: Any
  model_state: Any
  opt_state: optax.OptState
  arch_opt_state: optax.OptState
  rng: jax.Array
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  arch_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  loss_scale: Any = struct.field(default_factory=precision.NoOpLossScale)


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
                       model_state=variables, opt_state=weight_tx.init(params),
                       arch_opt_state=arch_tx.init(arch), rng=search_rng,
                       apply_fn=model.apply, tx=weight_tx, arch_tx=arch_tx)

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


def supernet_forward(loss_fn: LossFn = classification_loss) -> Forward:
  """The supernet on `batch["image"]` in training mode, scored by `loss_fn`: the `Forward`
  of searches outside the trainer (the trainer builds its own from the run's task)."""

  def forward(state: Any, params: Any, arch: Any, batch: Batch, rng: jax.Array,
              temperature: Any, aux_skip: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
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

  return forward


def _scaled(state: Any, forward: Forward, batch: Batch, rng: jax.Array, temperature: Any,
            aux_skip: Any) -> Callable[[Any, Any], jax.Array]:
  """`(params, arch) -> loss * loss scale`: what the gradients are taken of."""
  return lambda params, arch: state.loss_scale.scale(
      forward(state, params, arch, batch, rng, temperature, aux_skip)[0])


def arch_gradient(state: Any, train_batch: Batch, val_batch: Batch, rng: jax.Array, *,
                  loss_fn: LossFn = classification_loss, order: int = 1, unroll_lr: float = 0.0,
                  temperature: Any = 1.0, aux_skip: Any = 0.0,
                  forward: Forward | None = None) -> tuple[Any, jax.Array]:
  """Returns the gradient of the validation loss wrt `state.arch`, and that loss.

  Args:
    state: the search state (weights w, architecture a).
    train_batch: the batch of the (unrolled) inner weight step; unused for order 1.
    val_batch: the batch of the outer objective.
    rng: randomness of both forward passes (Gumbel noise, dropout).
    loss_fn: `(outputs, batch) -> (scalar loss, metrics)` (when `forward` is None).
    order: 1 (w* = w) or 2 (w* = w - unroll_lr grad_w L_train, exact chain rule).
    unroll_lr: xi, the inner step size of the second-order gradient.
    temperature: relaxation temperature.
    aux_skip: DARTS- auxiliary skip weight.
    forward: the supernet's loss on a batch (see `Forward`); default
      `supernet_forward(loss_fn)`.

  Returns:
    (gradient with the structure of `state.arch`, L_val(w*, a)); no penalty included.
    Every gradient is of the loss-scaled loss, unscaled (`state.loss_scale`).
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")
  forward = forward or supernet_forward(loss_fn)
  unscale = state.loss_scale.unscale
  rng_train, rng_val = jax.random.split(rng)

  def val_loss(params, arch):
    loss = forward(state, params, arch, val_batch, rng_val, temperature, aux_skip)[0]
    return state.loss_scale.scale(loss), loss

  if order == 1:
    (_, value), grads = jax.value_and_grad(val_loss, argnums=1, has_aux=True)(state.params,
                                                                            state.arch)
    return unscale(grads), value
  train_loss = _scaled(state, forward, train_batch, rng_train, temperature, aux_skip)
  inner = unscale(jax.grad(train_loss)(state.params, state.arch))
  unrolled = jax.tree.map(lambda w, g: w - unroll_lr * g, state.params, inner)
  (_, value), (v, direct) = jax.value_and_grad(val_loss, argnums=(0, 1), has_aux=True)(
      unrolled, state.arch)
  v, direct = unscale(v), unscale(direct)
  # d/de grad_a L_train(w + e v, a) at e = 0 is the mixed Hessian (d2/da dw) times v.
  arch_grad_of = lambda params: unscale(jax.grad(train_loss, argnums=1)(params, state.arch))
  _, mixed = jax.jvp(arch_grad_of, (state.params,), (v,))
  grads = jax.tree.map(lambda d, m: d - unroll_lr * m, direct, mixed)
  return grads, value


def _keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old` (a skipped update changes nothing)."""
  return precision.select_tree(finite, new, old)


def make_arch_update(*, loss_fn: LossFn = classification_loss, order: int = 1,
                     unroll_lr: float = 0.0,
                     arch_penalty_fn: Callable[[Any], tuple[jax.Array, Metrics]] | None = None,
                     forward: Forward | None = None) -> Callable[..., tuple[Any, Metrics]]:
  """Builds `arch_update(state, train_batch, val_batch, rng, temperature, aux_skip)`.

  Args:
    loss_fn: `(outputs, batch) -> (scalar loss, metrics)` (when `forward` is None).
    order: 1 or 2 (see `arch_gradient`).
    unroll_lr: xi of the second-order unrolled step.
    arch_penalty_fn: `arch -> (penalty, metrics)`, e.g. `cost.make_arch_penalty(...)`.
    forward: the supernet's loss on a batch (see `Forward`).

  Returns:
    The update: one `arch_tx` step on grad_a [L_val + penalty]; params are not touched.
    Its metrics include `arch_finite` (1.0 when the update was applied).
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")

  def arch_update(state: Any, train_batch: Batch, val_batch: Batch, rng: jax.Array,
                  temperature: Any = 1.0, aux_skip: Any = 0.0) -> tuple[Any, Metrics]:
    grads, val_loss = arch_gradient(state, train_batch, val_batch, rng, loss_fn=loss_fn,
                                    order=order, unroll_lr=unroll_lr,
                                    temperature=temperature, aux_skip=aux_skip,
                                    forward=forward)
    finite = precision.all_finite(grads)
    metrics = {"val_loss": val_loss}
    if arch_penalty_fn is not None:
      (penalty, penalty_metrics), penalty_grads = jax.value_and_grad(
          arch_penalty_fn, has_aux=True)(state.arch)
      grads = jax.tree.map(jnp.add, grads, penalty_grads)
      metrics.update(penalty=penalty, **penalty_metrics)
    updates, opt_state = state.arch_tx.update(grads, state.arch_opt_state, state.arch)
    metrics["arch_grad_norm"] = optax.tree.norm(grads)
    metrics["arch_finite"] = finite.astype(jnp.float32)
    arch, opt_state = _keep_if(finite, (optax.apply_updates(state.arch, updates), opt_state),
                               (state.arch, state.arch_opt_state))
    return state.replace(arch=arch, arch_opt_state=opt_state), metrics

  return arch_update


def make_weight_update(*, loss_fn: LossFn = classification_loss,
                       forward: Forward | None = None) -> Callable[..., tuple[Any, Metrics]]:
  """Builds `weight_update(state, batch, rng, temperature, aux_skip)`: one `tx` step.

  The architecture enters the forward pass as a constant, so `arch` is not touched. Its
  metrics include `weight_finite` (1.0 when the update was applied).
  """
  forward = forward or supernet_forward(loss_fn)

  def weight_update(state: Any, batch: Batch, rng: jax.Array, temperature: Any = 1.0,
                    aux_skip: Any = 0.0) -> tuple[Any, Metrics]:
    def loss(params):
      value, aux = forward(state, params, state.arch, batch, rng, temperature, aux_skip)
      return state.loss_scale.scale(value), (value, aux)

    (_, (value, (model_state, metrics))), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params)
    grads = state.loss_scale.unscale(grads)
    finite = precision.all_finite(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params, opt_state, model_state = _keep_if(
        finite, (optax.apply_updates(state.params, updates), opt_state, model_state),
        (state.params, state.opt_state, state.model_state))
    new_state = state.replace(params=params, opt_state=opt_state, model_state=model_state)
    stats = metrics.pop("precision_stats", None)
    out = {"train_loss": value, "weight_grad_norm": optax.tree.norm(grads),
           "weight_finite": finite.astype(jnp.float32),
           **{f"train_{k}": v for k, v in metrics.items()}}
    if stats is not None:
      out["precision_stats"] = stats
    return new_state, out

  return weight_update


def make_search_step(*, loss_fn: LossFn = classification_loss, order: int = 1,
                     unroll_lr: float = 0.0, warmup_steps: int = 0,
                     temperature_fn: Schedule | None = None,
                     aux_skip_fn: Schedule | None = None,
                     arch_penalty_fn: Callable[[Any], tuple[jax.Array, Metrics]] | None = None,
                     forward: Forward | None = None) -> Callable[..., tuple[Any, Metrics]]:
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
    forward: the supernet's loss on a batch (see `Forward`); default
      `supernet_forward(loss_fn)`.

  Returns:
    `search_step(state, train_batch, val_batch, rng) -> (state, metrics)`, to be jitted
    (donating the state is safe). `rng` is folded with the step, so one key may be reused.
    The state's loss scale is adjusted once per step, on whether both updates were finite
    (`skipped_steps` counts the others; a skipped half changes nothing).
  """
  temperature_fn = temperature_fn or _constant(1.0)
  aux_skip_fn = aux_skip_fn or _constant(0.0)
  arch_update = make_arch_update(loss_fn=loss_fn, order=order, unroll_lr=unroll_lr,
                                 arch_penalty_fn=arch_penalty_fn, forward=forward)
  weight_update = make_weight_update(loss_fn=loss_fn, forward=forward)

  def search_step(state: Any, train_batch: Batch, val_batch: Batch,
                  rng: jax.Array) -> tuple[Any, Metrics]:
    rng = jax.random.fold_in(jax.random.fold_in(rng, 0), state.step)
    arch_rng, weight_rng = jax.random.split(rng)
    temperature = jnp.asarray(temperature_fn(state.step), jnp.float32)
    aux_skip = jnp.asarray(aux_skip_fn(state.step), jnp.float32)
    args = (train_batch, val_batch, arch_rng, temperature, aux_skip)

    def skip(state: Any, *_) -> tuple[Any, Metrics]:
      shapes = jax.eval_shape(arch_update, state, *args)[1]
      metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      metrics["arch_finite"] = jnp.ones((), jnp.float32)  # Nothing to apply: not skipped.
      if arch_penalty_fn is not None:  # Costs need no forward pass: log them in warm-up too.
        metrics["penalty"], penalty_metrics = arch_penalty_fn(state.arch)
        metrics.update(penalty_metrics)
      return state, metrics

    searching = state.step >= warmup_steps
    state, arch_metrics = jax.lax.cond(searching, arch_update, skip, state, *args)
    state, weight_metrics = weight_update(state, train_batch, weight_rng, temperature, aux_skip)
    finite = (arch_metrics.pop("arch_finite") > 0) & (weight_metrics.pop("weight_finite") > 0)
    loss_scale = state.loss_scale.adjust(finite)
    metrics = {**arch_metrics, **weight_metrics, "temperature": temperature,
               "aux_skip": aux_skip, "arch_active": searching.astype(jnp.float32),
               "loss_scale": loss_scale.loss_scale, "skipped_steps": loss_scale.skipped_steps}
    return state.replace(step=state.step + 1, loss_scale=loss_scale), metrics

  return search_step
