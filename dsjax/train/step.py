"""The step builders, the step cache that jits them, and the evaluation step.

Two builders make `step(state, batch, rng) -> (state, metrics)`, both pure:
- `make_train_step`: the weight step. Gradient accumulation over K micro-batches runs
  inside it as a `lax.scan`, so the optimizer sees the mean gradient of the whole batch,
  equal to one big-batch step up to float rounding.
- `make_search_step`: DNAS's bilevel step (`dsjax.nas.bilevel`) on the run's task: the
  architecture on a validation batch, then the weights on a training batch
  (`batch = {"train": ..., "val": ...}`).

`StepCache` jits them: one compiled step per (precision plan, statistics, density), with
the state donated and explicit shardings, compiled on first use.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsjax import measure, nas, precision
from dsjax.nn import STATS, save_half_residuals
from dsjax.parallel import compression as compression_lib
from dsjax.parallel import sharding
from dsjax.precision import adaptive
from dsjax.train.state import TrainState
from dsjax.train.tasks import Task

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# On one device, leaves below this many elements are checked and normed as one vector per
# dtype: every reduction is a kernel of its own, and the digits CNN's step spent 12% of its
# time (2-core CPU) on the few dozen tiny reductions of its finite check and norms.
_SMALL_LEAF = 1 << 20


def _reduction_operands(tree: Any) -> list[jax.Array]:
  """The floating leaves of `tree`, for a reduction over all of them: on one device the
  small ones raveled and concatenated per dtype; on a mesh as they are (leaves sharded
  differently would be gathered to be concatenated)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  mesh = jax.sharding.get_abstract_mesh()
  if (mesh.size if mesh.shape else jax.device_count()) > 1:
    return leaves
  small: dict[Any, list[jax.Array]] = {}
  for x in leaves:
    if x.size < _SMALL_LEAF:
      small.setdefault(x.dtype, []).append(x.ravel())
  return ([x for x in leaves if x.size >= _SMALL_LEAF]
          + [jnp.concatenate(group) for group in small.values()])


def _norm(tree: Any) -> jax.Array:
  """The global L2 norm of `tree`'s floating leaves (what `optax.tree.norm` computes)."""
  operands = _reduction_operands(tree)
  # Big leaves through optax itself: XLA merges their reductions with those of gradient
  # clipping's norm (the same operations on the same arrays), so no array is read twice.
  big = [x for x in operands if x.size >= _SMALL_LEAF]
  squares = optax.tree.norm(big, squared=True) if big else jnp.zeros((), jnp.float32)
  for x in operands:
    if x.size < _SMALL_LEAF:
      squares = squares + jnp.sum(jnp.square(x.astype(jnp.float32)))
  return jnp.sqrt(squares)


def _forward(state: TrainState, task: Task, params: Any, model_state: Any, batch: Batch,
             rng: jax.Array, train: bool, collect_stats: bool = False,
             dropout_rng_impl: str = "threefry2x32") -> tuple[dict[str, jax.Array], Any, Any]:
  """Prepares the batch on device and runs the model.

  Returns:
    The task's per-example scores (`loss`, `correct`, `weight`, ...), the new model state,
    and the per-layer precision statistics (`{}` unless `collect_stats`).
  """
  prepare_rng, dropout_rng = jax.random.split(rng)
  if dropout_rng_impl != "threefry2x32":
    # Dropout masks from XLA's RngBitGenerator (Philox on GPU, the hardware generator on
    # TPU) instead of threefry's ~20 integer rounds per 32 random bits, seeded from the
    # step key: the same mask for the same step, a different stream from threefry's.
    seed = jax.random.bits(dropout_rng, (), jnp.uint32)
    dropout_rng = jax.random.key(seed, impl=dropout_rng_impl)
  batch = task.prepare(batch, prepare_rng, train=train)
  args, kwargs = task.model_args(batch)
  variables = {"params": params, **model_state}
  mutable = (list(model_state) if train else []) + ([STATS] if collect_stats else [])
  stats = {}
  if mutable:
    outputs, mutated = state.apply_fn(variables, *args, train=train, **kwargs,
                                      rngs={"dropout": dropout_rng}, mutable=mutable)
    mutated = dict(mutated)
    stats = adaptive.collect_layer_stats(mutated.pop(STATS, {}))
    model_state = mutated if train else model_state
  else:
    outputs = state.apply_fn(variables, *args, train=train, **kwargs,
                             rngs={"dropout": dropout_rng})
  return task.score(outputs, batch), model_state, stats


def _split_micro_batches(batch: Batch, count: int) -> Batch:
  """[B, ...] -> [count, B / count, ...]; micro-batch k holds rows k, k + count, ...

  Strided rather than contiguous: with the batch sharded over devices in contiguous
  blocks, every device keeps its own rows in every micro-batch (no data movement).
  """
  def split(x):
    x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch"))
  return jax.tree.map(split, batch)


def _varying(tree: Any, axis_name: str) -> Any:
  """Marks replicated values as varying over a manual mesh axis (`lax.pcast`/`pvary`)."""
  if hasattr(jax.lax, "pcast"):
    return jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), tree)
  return jax.tree.map(lambda x: jax.lax.pvary(x, axis_name), tree)


def _if_finite(finite: jax.Array, update: Callable[[], Any], skip: Callable[[], Any]) -> Any:
  """`update()` where `finite`, else `skip()`: a conditional, not a select of both results.

  The update's fusions then write the new parameters and moments once; selecting between
  the updated and the old state read all of them twice more (on the 2-core CPU ~5% of a
  bert-base float32 step; docs/benchmarks.md).
  """
  return jax.lax.cond(finite, lambda _: update(), lambda _: skip(), None)


def make_train_step(task: Task, grad_accum_steps: int, learning_rate_fn: optax.Schedule, *,
                    collect_stats: bool = False, half_residuals: bool = False,
                    grad_compression: compression_lib.Compression | None = None,
                    density: float | None = None, delayed_update: bool = False,
                    dropout_rng: str = "threefry2x32") -> Callable[..., tuple[TrainState, Metrics]]:
  """Builds the training step.

  Args:
    task: what the model is trained for (`dsjax.train.tasks`).
    grad_accum_steps: K; the batch's leading dimension splits into K equal micro-batches.
    learning_rate_fn: the schedule, logged as `learning_rate`.
    collect_stats: also return the layers' precision statistics as
      `metrics["precision_stats"]` (for the adaptive precision controller).
    half_residuals: rematerialise the forward pass so that only half-precision values
      are kept for the backward pass (`dsjax.nn.save_half_residuals`); float32 values
      are recomputed. Gradients for the float32 master weights are unchanged.
    grad_compression: exchange data-parallel gradients compressed, with error feedback
      (`dsjax.parallel.compression`): each replica of the `data` mesh axis computes its
      local gradient inside `jax.shard_map` and sends only what the mode selects; the
      state's `grad_sync` holds the per-replica residuals. None: XLA's dense all-reduce.
    density: the topk density / threshold capacity of this compiled step (warm-up).
    delayed_update: apply the previous step's (already exchanged) gradient while this
      step's is computed and exchanged; the state's `pending_grads` holds it. Step 0
      applies nothing.
    dropout_rng: the PRNG implementation of the dropout masks (`config.DROPOUT_RNGS`):
      "threefry2x32" (jax's default, identical on every mesh), "rbg" or "unsafe_rbg"
      (XLA's bit generator: far fewer integer ops per bit; masks may differ between
      meshes).

  Returns:
    `train_step(state, batch, rng, with_norms=True) -> (state, metrics)`, to be jitted
    with the state donated. The loss is scaled by `state.loss_scale` before
    differentiation and the gradients unscaled after; a step with non-finite gradients is
    skipped. Metrics: loss, accuracy, learning_rate, grad_norm, param_norm, update_norm,
    loss_scale, skipped_steps. The three norms each read a parameter-sized tree (12% of
    a bert-tiny step on CPU): `with_norms` (a traced bool) computes them only on the steps
    whose metrics are logged, NaN on the others.
  """

  def micro_step(state: TrainState, model_state: Any, micro_batch: Batch, rng: jax.Array):
    forward = functools.partial(_forward, state, task, train=True, collect_stats=collect_stats,
                                dropout_rng_impl=dropout_rng)
    if half_residuals:
      forward = jax.checkpoint(forward, policy=save_half_residuals)

    def loss_fn(params):
      scores, new_model_state, stats = forward(params, model_state, micro_batch, rng)
      # Mean over the scored units (examples, or masked tokens); never divide by zero.
      weight = jnp.maximum(jnp.sum(scores["weight"]), 1.0)
      loss = jnp.sum(scores["loss"]) / weight
      accuracy = jnp.sum(scores["correct"]) / weight
      return state.loss_scale.scale(loss), (loss, accuracy, new_model_state, stats)

    # Gradients of the scaled loss: float16 backward values stay above underflow.
    (_, (loss, accuracy, model_state, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    return grads, loss, accuracy, model_state, stats

  def gradients(state: TrainState, batch: Batch, rng: jax.Array,
                replica_axis: str | None = None):
    """Mean gradient (still loss-scaled), loss, accuracy, model state and stats of a batch;
    `replica_axis`: the manual mesh axis when computed per replica inside shard_map."""
    if grad_accum_steps == 1:
      grads, loss, accuracy, model_state, stats = micro_step(state, state.model_state, batch,
                                                              rng)
    else:
      micro_batches = _split_micro_batches(batch, grad_accum_steps)

      def body(carry, inputs):
        grad_sum, loss_sum, accuracy_sum, model_state = carry
        index, micro_batch = inputs
        grads, loss, accuracy, model_state, stats = micro_step(
            state, model_state, micro_batch, jax.random.fold_in(rng, index))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + loss, accuracy_sum + accuracy, model_state), stats

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, jnp.zeros(()), jnp.zeros(()), state.model_state)
      if replica_axis is not None:
        # Per replica, inside shard_map: the loss sums and the model state the body
        # returns vary over the replicas, so the carry must start that way.
        init = (zeros, *_varying(init[1:], replica_axis))
      (grad_sum, loss_sum, accuracy_sum, model_state), stats = jax.lax.scan(
          body, init, (jnp.arange(grad_accum_steps), micro_batches))
      stats = adaptive.merge_layer_stats(stats)
      # Equal-sized micro-batches: the mean of K means is the mean of the whole batch.
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
      loss, accuracy = loss_sum / grad_accum_steps, accuracy_sum / grad_accum_steps
    return grads, loss, accuracy, model_state, stats

  def compressed_gradients(state: TrainState, batch: Batch, rng: jax.Array):
    """`gradients` per data-parallel replica, exchanged with `grad_compression`."""
    replicated, per_replica = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("data")

    def local(params, model_state, loss_scale, grad_sync, batch, rng):
      # Differentiate w.r.t. this replica's own copy: the gradient of a value shard_map
      # holds invariant across `data` would be summed over replicas (a dense all-reduce).
      params = _varying(params, "data")
      replica = state.replace(params=params, model_state=model_state, loss_scale=loss_scale)
      with nn.logical_axis_rules(()):  # Inside the manual `data` axis: no constraints.
        grads, loss, accuracy, model_state, stats = gradients(
            replica, batch, jax.random.fold_in(rng, jax.lax.axis_index("data")), "data")
      grads = loss_scale.unscale(grads)
      grads, grad_sync, sync_stats = compression_lib.exchange(
          grads, grad_sync, grad_compression, axis_name="data", step=state.step,
          density=density)
      mean = functools.partial(jax.lax.pmean, axis_name="data")
      model_state = jax.tree.map(mean, model_state)
      stats = jax.tree.map(functools.partial(jax.lax.pmax, axis_name="data"), stats)
      return grads, mean(loss), mean(accuracy), model_state, stats, grad_sync, sync_stats

    return jax.shard_map(
        local, in_specs=(replicated, replicated, replicated, per_replica, per_replica,
                         replicated),
        out_specs=(replicated,) * 5 + (per_replica, replicated), axis_names={"data"},
    )(state.params, state.model_state, state.loss_scale, state.grad_sync, batch, rng)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array,
                 with_norms: bool | jax.Array = True) -> tuple[TrainState, Metrics]:
    grad_sync, sync_metrics = state.grad_sync, {}
    if grad_compression is None:
      grads, loss, accuracy, model_state, stats = gradients(state, batch, rng)
      grads = state.loss_scale.unscale(grads)
    else:
      grads, loss, accuracy, model_state, stats, grad_sync, sync = compressed_gradients(
          state, batch, rng)
      sync_metrics = {"grad_sent_fraction": sync["sent"] / sync["total"],
                      "grad_overflow": sync["overflow"]}
    finite = precision.all_finite(_reduction_operands(grads))
    pending = state.pending_grads
    if delayed_update:
      # Apply last step's gradient; this step's waits in the state for the next step.
      grads, pending = pending, jax.tree.map(
          lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
      finite = finite & (state.step > 0)
    # A step with any inf/NaN gradient changes nothing but the step and the loss scale.
    def update() -> tuple[Any, Any]:
      updated, updates = state.apply_gradients(grads, model_state)
      return (updated.params, updated.opt_state, updated.model_state), updates

    def skip() -> tuple[Any, Any]:
      zeros = jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype), jax.eval_shape(update)[1])
      return (state.params, state.opt_state, state.model_state), zeros

    (params, opt_state, model_state), updates = _if_finite(finite, update, skip)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state,
                              loss_scale=state.loss_scale.adjust(finite),
                              grad_sync=grad_sync, pending_grads=pending)
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "learning_rate": learning_rate_fn(state.step),
        "loss_scale": new_state.loss_scale.loss_scale,
        "skipped_steps": new_state.loss_scale.skipped_steps,
        **sync_metrics,
    }

    def norms() -> Metrics:
      return {"grad_norm": _norm(grads), "param_norm": _norm(new_state.params),
              "update_norm": _norm(updates)}

    metrics.update(_when(with_norms, norms))
    if collect_stats:
      metrics["precision_stats"] = stats
    return new_state, metrics

  return train_step


def _when(flag: bool | jax.Array, metrics_fn: Callable[[], Metrics]) -> Metrics:
  """`metrics_fn()` (float32 scalars) where `flag` holds, NaN where not; a traced `flag`
  becomes a `lax.cond`, so the steps whose metrics nobody reads skip the work."""
  def computed() -> Metrics:
    return {key: jnp.asarray(value, jnp.float32) for key, value in metrics_fn().items()}

  if flag is True:  # The default of a direct call: no conditional in the graph.
    return computed()
  skipped = {key: jnp.float32(jnp.nan) for key in jax.eval_shape(computed)}
  return jax.lax.cond(flag, computed, lambda: skipped)


def make_eval_step(task: Task) -> Callable[..., Metrics]:
  """Builds `eval_step(state, batch, mask, rng) -> sums` for `evaluate`.

  The sums cover the real (mask == 1) examples of a padded batch: `loss_sum`,
  `correct_sum`, `count` (scored units). A task's other scores pass through per example:
  ctr's `score` (for the AUC), detection's decoded `boxes`, `box_scores`, `box_classes`.
  """

  def eval_step(state: TrainState, batch: Batch, mask: jax.Array, rng: jax.Array) -> Metrics:
    scores, _, _ = _forward(state, task, state.params, state.model_state, batch, rng,
                            train=False)
    sums = {"loss_sum": jnp.sum(scores["loss"] * mask),
            "correct_sum": jnp.sum(scores["correct"] * mask),
            "count": jnp.sum(scores["weight"] * mask)}
    sums.update({key: value for key, value in scores.items()
                 if key not in ("loss", "correct", "weight")})
    return sums

  return eval_step


def make_search_step(task: Task, *, order: int, unroll_lr: float, warmup_steps: int,
                     temperature_fn: optax.Schedule, aux_skip_fn: optax.Schedule | None,
                     arch_penalty_fn: Callable[[Any], tuple[jax.Array, Metrics]],
                     collect_stats: bool = False, half_residuals: bool = False
                     ) -> Callable[..., tuple[TrainState, Metrics]]:
  """Builds the bilevel search step on the run's task (see `dsjax.nas.make_search_step`).

  The supernet is scored by `task` as the weight step scores a model (its loss is the mean
  over the scored units); the state's loss scale scales both losses. Randomness: the step
  folds `rng` with its own counter, so the loop passes the same key every step.

  Args:
    task: what the supernet is trained for.
    order: 1 (first-order DARTS) or 2 (unrolled, exact Hessian-vector product).
    unroll_lr: xi of the second-order step.
    warmup_steps: steps that train the weights only.
    temperature_fn: step -> relaxation temperature.
    aux_skip_fn: step -> DARTS- auxiliary skip weight; None: none.
    arch_penalty_fn: `arch -> (penalty, metrics)` (`dsjax.nas.make_arch_penalty`).
    collect_stats: also return the layers' precision statistics of the weight forward
      pass as `metrics["precision_stats"]` (for the adaptive precision controller).
    half_residuals: keep only half-precision values for the backward passes.

  Returns:
    `search_step(state, {"train": batch, "val": batch}, rng) -> (state, metrics)`.
  """

  def forward(state, params, arch, batch, rng, temperature, aux_skip):
    def run(params, arch):
      prepared = task.prepare(batch, jax.random.fold_in(rng, 2), train=True)
      args, kwargs = task.model_args(prepared)
      variables = {"params": params, "arch": arch, **state.model_state}
      mutable = list(state.model_state) + ([STATS] if collect_stats else [])
      rngs = {"dropout": jax.random.fold_in(rng, 0), "gumbel": jax.random.fold_in(rng, 1)}
      call = functools.partial(state.apply_fn, variables, *args, train=True,
                               temperature=temperature, aux_skip=aux_skip, rngs=rngs, **kwargs)
      outputs, mutated = call(mutable=mutable) if mutable else (call(), {})
      mutated = dict(mutated)
      stats = adaptive.collect_layer_stats(mutated.pop(STATS, {}))
      scores = task.score(outputs, prepared)
      weight = jnp.maximum(jnp.sum(scores["weight"]), 1.0)
      metrics = {"accuracy": jnp.sum(scores["correct"]) / weight}
      if collect_stats:
        metrics["precision_stats"] = stats
      return jnp.sum(scores["loss"]) / weight, (mutated, metrics)

    if half_residuals:
      run = jax.checkpoint(run, policy=save_half_residuals)
    return run(params, arch)

  search_step = nas.make_search_step(
      order=order, unroll_lr=unroll_lr, warmup_steps=warmup_steps,
      temperature_fn=temperature_fn, aux_skip_fn=aux_skip_fn, arch_penalty_fn=arch_penalty_fn,
      forward=forward)

  def step(state: TrainState, batch: dict[str, Batch], rng: jax.Array,
           with_norms: bool | jax.Array = True):
    del with_norms  # Its norms are of the supernet's small trees: computed every step.
    return search_step(state, batch["train"], batch["val"], rng)

  return step


class StepCache:
  """The compiled steps of a run: one per (precision plan, statistics, density) key.

  Every step is jitted with explicit shardings: the state keeps the shardings it was
  created (or restored) with, the batch is split over the mesh's batch axes, the metrics
  are replicated, the state is donated; tracing sees the mesh and the logical axis rules.
  A key seen before costs nothing; a new one compiles once.

  Args:
    make_step: `make_step(collect_stats, density) -> step(state, batch, rng, with_norms)`.
    build_model: `build_model(compute_dtype, plan) -> module`.
    compute_dtype: the policy's compute dtype.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.
    donate: donate the state to the step (off only to measure what donation buys).
  """

  def __init__(self, make_step: Callable[[bool, float | None], Callable[..., Any]],
               build_model: Callable[[Any, Any], nn.Module], compute_dtype: Any,
               mesh: jax.sharding.Mesh, rules: Any, *, donate: bool = True):
    self._make_step = make_step
    self._donate = (0,) if donate else ()
    self._build_model = build_model
    self.compute_dtype = compute_dtype
    self.mesh, self.rules = mesh, rules
    self._models: dict[Hashable, nn.Module] = {}
    self._compiled: dict[tuple[Hashable, bool, float | None], Any] = {}
    self._comm_bytes: dict[int, int] = {}
    self._flags: dict[bool, jax.Array] = {}
    self.last: Any = None  # The compiled step that ran last.

  def context(self) -> contextlib.AbstractContextManager:
    """The mesh and logical axis rules, for tracing anything that runs on the mesh."""
    return sharding.context(self.mesh, self.rules)

  def model(self, plan: Hashable = None) -> nn.Module:
    """The model under `plan` (built once per plan)."""
    if plan not in self._models:
      self._models[plan] = self._build_model(self.compute_dtype, plan)
    return self._models[plan]

  def build_fp32(self) -> nn.Module:
    """The model in float32 with no plan (the precision probe's reference)."""
    return self._build_model(jnp.float32, None)

  def bind(self, state: TrainState, plan: Hashable = None) -> TrainState:
    """Points the state's `apply_fn` at `plan`'s model."""
    return state.replace(apply_fn=self.model(plan).apply)

  def compile(self, state: TrainState, batch: Any, rng: jax.Array, *, plan: Hashable = None,
              collect_stats: bool = False, density: float | None = None) -> Any:
    """The compiled step for this key (compiling it on first use), for `state` bound to
    `plan`'s model; also for cost and memory analysis ahead of the loop."""
    key = (plan, collect_stats, density)
    if key not in self._compiled:
      replicated = sharding.replicated(self.mesh)
      state_shardings = jax.tree.map(lambda x: getattr(x, "sharding", replicated), state)
      batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(self.mesh), batch)
      jitted = jax.jit(self._make_step(collect_stats, density),
                       in_shardings=(state_shardings, batch_shardings, replicated, replicated),
                       out_shardings=(state_shardings, replicated),
                       donate_argnums=self._donate)
      with self.context():
        self._compiled[key] = jitted.lower(state, batch, rng, self._flag(True)).compile()
    return self._compiled[key]

  def run(self, state: TrainState, batch: Any, rng: jax.Array, *, plan: Hashable = None,
          collect_stats: bool = False, density: float | None = None,
          with_norms: bool = True) -> tuple[TrainState, Any]:
    """Runs one step (`state` must be bound to `plan`'s model); `with_norms=False` skips
    the metrics' parameter norms (NaN), for the steps whose metrics are not logged."""
    rng = jax.device_put(rng, sharding.replicated(self.mesh))
    self.last = self.compile(state, batch, rng, plan=plan, collect_stats=collect_stats,
                             density=density)
    return self.last(state, batch, rng, self._flag(with_norms))

  def _flag(self, value: bool) -> jax.Array:
    """`value` as a replicated device scalar (made once per value)."""
    if value not in self._flags:
      self._flags[value] = jax.device_put(np.bool_(value), sharding.replicated(self.mesh))
    return self._flags[value]

  def flops(self) -> float:
    """XLA's FLOPs of the step that ran last (or of the first compiled; 0 before any)."""
    compiled = self.last or next(iter(self._compiled.values()), None)
    return measure.compiled_flops(compiled) if compiled is not None else 0.0

  def comm_bytes(self) -> int:
    """Bytes the collectives of the step that ran last move (from its compiled HLO)."""
    if self.last is None:
      return 0
    if id(self.last) not in self._comm_bytes:
      self._comm_bytes[id(self.last)] = int(measure.collective_bytes(self.last)["total"])
    return self._comm_bytes[id(self.last)]


def make_error_probe(task: Task, half_model: nn.Module, fp32_model: nn.Module,
                     mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """Jitted per-layer relative error of `half_model` against `fp32_model` on one batch
  (eval mode), for the precision controller.

  Returns:
    `probe(state, batch) -> {layer path: relative error}`, replicated.
  """

  def probe(state: TrainState, batch: Batch):
    variables = {"params": state.params, **state.model_state}
    if state.arch is not None:
      variables["arch"] = state.arch
    batch = task.prepare(batch, jax.random.PRNGKey(0), train=False)
    args, kwargs = task.model_args(batch)
    outputs = []
    for model in (half_model, fp32_model):
      _, captured = model.apply(variables, *args, train=False, **kwargs,
                                capture_intermediates=True, mutable=["intermediates"])
      outputs.append(captured["intermediates"])
    return adaptive.relative_errors(*outputs)

  return jax.jit(probe, out_shardings=sharding.replicated(mesh))


def dense_exchange_bytes(params: Any, mesh: jax.sharding.Mesh) -> int:
  """Bytes XLA's dense data-parallel all-reduce of `params`-shaped float32 gradients moves.

  Read from a compiled program that does only that exchange (the mean of per-replica
  gradients over `data`), not from a second compile of the whole step.
  """
  per_replica = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicas = mesh.shape["data"]
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((replicas, *x.shape), jnp.float32,
                                                        sharding=per_replica), params)
  exchange = jax.jit(lambda grads: jax.tree.map(lambda g: jnp.mean(g, axis=0), grads),
                     out_shardings=sharding.replicated(mesh))
  return int(measure.collective_bytes(exchange.lower(stacked).compile())["total"])
