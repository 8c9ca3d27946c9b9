"""dsjax's training step against a bare, framework-free jitted step of the same model.

  python scripts/bench_overhead.py                               # cnn-digits, bert-tiny
  python scripts/bench_overhead.py --models bert-base --steps 6  # ~3-5 s a step on 2 cores
  python scripts/bench_overhead.py --models bert-tiny --ablations  # one feature off at a time

Both sides run in one process, step after step in alternating order (ABBA), on the same
device-resident batches and the same initial weights, so machine load hits both alike; the
table gives median step times and the dsjax / bare ratio per model and precision.

The bare step (the `bare_*` functions below) imports nothing from dsjax: plain flax modules
with the same layers and shapes, dropout, optax AdamW with the config's schedule, clipping
and weight decay, and the loss on the masked positions for BERT. It is fed what dsjax's
step computes inside itself from the same key: for BERT the masked batch (and, with the
masked-only MLM head, the gathered positions), so both sides do the same work and the
check below can compare losses exactly. Before timing, both sides' loss on the first
batch is computed without dropout from the same weights and printed (they must agree to
float rounding).

Precisions: `fp32`; `bf16` (bfloat16 compute, float32 params); `mixed`: the `mixed` preset
(bfloat16 on CPU, float16 on GPU) with the adaptive controller and, here, a dynamic loss
scale on every backend (`--mixed-loss-scale policy` keeps the preset's: none for bfloat16),
against the bare bf16 step. Timings are medians over `--steps` steps after `--warmup`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

# ====================================================================== the bare step
# Nothing in this section uses dsjax.

_NORMAL = nn.initializers.normal(stddev=0.02)


class BareCNN(nn.Module):
  """Two stages of two 3x3 convs + 2x2 average pool, a hidden dense layer, a classifier."""

  features: tuple[int, ...]
  dense_features: int
  num_classes: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, images, *, train):
    x = images
    for stage, width in enumerate(self.features):
      for layer in range(2):
        x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype, name=f"conv{stage}_{layer}")(x))
      if min(x.shape[-3:-1]) >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype, name="hidden")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x).astype(jnp.float32)


def _bare_gelu(x):
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


class BareBertLayer(nn.Module):
  """Post-LN encoder layer: self-attention, add & norm, GELU MLP, add & norm."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, bias, *, train):
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, kernel_init=_NORMAL)
    norm = functools.partial(nn.LayerNorm, epsilon=1e-12, dtype=self.dtype,
                             use_fast_variance=False)
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    q, k, v = (dense((self.num_heads, head_dim), name=name)(x)
               for name in ("query", "key", "value"))
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
    weights = dropout(jax.nn.softmax(logits, axis=-1).astype(self.dtype))
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    attended = dense(hidden, axis=(-2, -1), name="out")(context)
    x = norm(name="attention_norm")(x + dropout(attended))
    y = _bare_gelu(dense(self.mlp_dim, name="mlp_in")(x))
    y = dense(hidden, name="mlp_out")(y)
    return norm(name="mlp_norm")(x + dropout(y))


class BareBert(nn.Module):
  """BERT with its tied MLM head; layers in a plain Python loop."""

  vocab_size: int
  hidden: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_position: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, positions=None, *, train):
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    norm = functools.partial(nn.LayerNorm, epsilon=1e-12, dtype=self.dtype,
                             use_fast_variance=False)
    word = nn.Embed(self.vocab_size, self.hidden, embedding_init=_NORMAL, name="word_embeddings")
    position = nn.Embed(self.max_position, self.hidden, embedding_init=_NORMAL,
                        name="position_embeddings")
    token_type = nn.Embed(2, self.hidden, embedding_init=_NORMAL, name="token_type_embeddings")
    x = word(input_ids) + position(jnp.arange(input_ids.shape[-1]))[None] + token_type(
        token_type_ids)
    x = dropout(norm(name="embeddings_norm")(x))
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(self.num_layers):
      x = BareBertLayer(self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype,
                        name=f"layer_{i}")(x, bias, train=train)
    if positions is not None:  # Only the masked positions reach the vocabulary projection.
      x = jnp.take_along_axis(x, positions[..., None], axis=1)
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_NORMAL, name="mlm_dense")(x)
    x = norm(name="mlm_norm")(_bare_gelu(x))
    table = word.embedding.astype(self.dtype)
    logits = jnp.einsum("blh,vh->blv", x.astype(self.dtype), table).astype(jnp.float32)
    return logits + self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))


def bare_loss_fn(model: nn.Module, mlm: bool) -> Callable[..., jax.Array]:
  """`loss(params, batch, rng, train)`: mean cross-entropy (over masked tokens for BERT)."""

  def loss(params, batch, rng, train):
    rngs = {"dropout": rng}
    if not mlm:
      logits = model.apply({"params": params}, batch["image"], train=train, rngs=rngs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], batch.get("mlm_positions"), train=train,
                         rngs=rngs)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mlm_labels"])
    weights = batch["mlm_weights"]
    return jnp.sum(token_loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return loss


def bare_optimizer(name: str, learning_rate: float, schedule: str, warmup: int, total: int,
                   weight_decay: float, clip: float) -> optax.GradientTransformation:
  """AdamW (or SGD with decoupled decay) with linear warm-up and constant or cosine decay."""
  main = (optax.cosine_decay_schedule(learning_rate, max(total - warmup, 1))
          if schedule == "cosine" else optax.constant_schedule(learning_rate))
  rate = main if not warmup else optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup), main], [warmup])
  tx = (optax.adamw(rate, weight_decay=weight_decay) if name == "adamw"
        else optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(rate)))
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def bare_train_step(loss: Callable[..., jax.Array], tx: optax.GradientTransformation):
  """The textbook step: value_and_grad, optax update, donated (params, opt_state)."""

  def step(params, opt_state, batch, rng):
    value, grads = jax.value_and_grad(loss)(params, batch, rng, True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


# ====================================================================== the dsjax step

from dsjax import data, precision  # noqa: E402
from dsjax.parallel import sharding  # noqa: E402
from dsjax.train import loop as loop_lib  # noqa: E402
from dsjax.train import optim, step, tasks  # noqa: E402
from dsjax.train.resolve import resolve  # noqa: E402
from dsjax.train.state import create_train_state  # noqa: E402

CONFIG_FILES = {"cnn-digits": ("digits_cnn", None), "bert-tiny": ("bert_tiny", None),
                "bert-base": ("bert_base", None)}
PRECISIONS = ("fp32", "bf16", "mixed")


def model_config(name: str, args: argparse.Namespace) -> Any:
  """The model's experiment config, sized as the issue measures it."""
  module = __import__(f"dsjax.configs.{CONFIG_FILES[name][0]}", fromlist=["get_config"])
  config = module.get_config(CONFIG_FILES[name][1])
  config.train.grad_accum_steps = 1
  if name == "bert-base":  # Batch 8 x seq 128, the embedded corpus's 5,560-word vocabulary.
    config.train.batch_size, config.data.seq_len = 8, 128
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.layers and "num_layers" in config.model:
    config.model.num_layers = args.layers
  config.data.cache_dir = args.cache_dir
  config.logging.progress_bar = config.logging.tensorboard = False
  return config


@dataclasses.dataclass
class Side:
  """One side of the comparison: `run(i)` takes training step i and returns its loss."""

  run: Callable[[int], jax.Array]
  eval_loss: float
  params: int
  initial_params: Any = None
  config: Any = None


def _patches(ablation: str) -> contextlib.AbstractContextManager:
  """Measurement-only switches of dsjax internals (see ABLATIONS); nothing is changed on disk."""
  stack = contextlib.ExitStack()
  if ablation == "no-norms":
    # step.py's own `optax` name only (gradient clipping keeps its norm), and its `_norm`.
    zero = lambda tree: jnp.zeros(())  # noqa: E731
    stack.enter_context(_swap(step, "optax", types.SimpleNamespace(
        tree=types.SimpleNamespace(norm=zero))))
    if hasattr(step, "_norm"):
      stack.enter_context(_swap(step, "_norm", zero))
  elif ablation == "per-leaf-reductions" and hasattr(step, "_reduction_operands"):
    # The finite check and the norms as before: one reduction per leaf.
    stack.enter_context(_swap(step, "_reduction_operands", lambda tree: [
        x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]))
  elif ablation == "select-skip" and hasattr(step, "_if_finite"):
    from dsjax import precision  # noqa: PLC0415

    stack.enter_context(_swap(step, "_if_finite", lambda finite, update, skip: (
        precision.select_tree(finite, update(), skip()))))
  elif ablation == "argmax" and hasattr(tasks, "first_argmax"):
    stack.enter_context(_swap(tasks, "first_argmax", lambda logits: jnp.argmax(logits, -1)))
  elif ablation == "plain-matmul":
    from dsjax.nn import matmul  # noqa: PLC0415

    def plain(op_name):
      def op(lhs, rhs, *args, **kwargs):
        inner = {"dot_general": jax.lax.dot_general, "einsum": jnp.einsum,
                 "conv_general_dilated": jax.lax.conv_general_dilated}[op_name]
        return inner(lhs, rhs, *args, preferred_element_type=jnp.float32, **kwargs)
      return op
    for name in ("dot_general", "einsum", "conv_general_dilated"):
      stack.enter_context(_swap(matmul, name, plain(name)))
  return stack


@contextlib.contextmanager
def _swap(owner: Any, name: str, value: Any) -> Iterator[None]:
  old = getattr(owner, name)
  setattr(owner, name, value)
  try:
    yield
  finally:
    setattr(owner, name, old)


# name -> (config overrides, what it removes). Each removes one dsjax feature from the
# default step; `_patches` handles the ones no config field reaches.
ABLATIONS = {
    "scan": ({"model.scan_layers": True, "model.scan_unroll": 1},
             "encoder layers stacked, in a loop (model.scan_layers=True, scan_unroll=1)"),
    "stacked": ({"model.scan_layers": True},
                "encoder layers stacked [layers, ...], unrolled (model.scan_layers=True)"),
    "select-skip": ({}, "a non-finite step skipped by selecting the old state (as before)"),
    "full-head": ({"data.max_predictions": 0}, "MLM head on every position"),
    "per-leaf-reductions": ({}, "finite check and norms one leaf at a time (as before)"),
    "argmax": ({}, "MLM accuracy from jnp.argmax (as before)"),
    "no-norms": ({}, "grad/param/update norms not computed"),
    "plain-matmul": ({}, "lax.dot_general(preferred=f32) instead of dsjax.nn.matmul's custom JVP"),
    "rbg": ({"train.dropout_rng": "rbg"}, "dropout bits from rbg, not threefry"),
    "no-controller": ({"precision.adaptive": False}, "mixed: no controller statistics"),
    "no-loss-scale": ({"loss_scale": "policy"}, "mixed: no dynamic loss scale (bf16 needs none)"),
    "no-donation": ({"donate": False}, "state not donated"),
    "norms-every-step": ({"norms_every_step": True},
                         "grad/param/update norms on every step, not only the logged ones"),
}


def dsjax_side(name: str, preset: str, args: argparse.Namespace, dataset: Any,
               overrides: dict[str, Any], batches: list[dict[str, np.ndarray]]) -> tuple[Side, Any]:
  """dsjax's step as `train_and_evaluate` builds and calls it (the resolved plan, the step
  cache's donated state and explicit shardings, the controller's check steps), on one
  device.

  Returns:
    The side, and `prepared(i)`: step i's batch as dsjax's step prepares it on device.
  """
  config = model_config(name, args)
  config.precision.policy = preset
  donate, loss_scale_mode, norms_every_step = True, args.mixed_loss_scale, False
  for key, value in overrides.items():
    if key == "donate":
      donate = value
    elif key == "norms_every_step":
      norms_every_step = value
    elif key == "loss_scale":
      loss_scale_mode = value
    else:
      section, field = key.split(".")
      if field in config[section]:
        config[section][field] = value
  plan = resolve(config, jax.devices()[:1])
  config, mesh = plan.config, plan.mesh
  task = tasks.make_task(plan.spec.task, config.data, dataset.metadata)
  tx, learning_rate_fn = optim.build_optimizer(config.optimizer, config.train.steps)

  def make_step(collect_stats: bool, density: float | None):
    return step.make_train_step(task, 1, learning_rate_fn, collect_stats=collect_stats,
                                half_residuals=config.precision.half_residuals,
                                dropout_rng=config.train.dropout_rng)

  cache = step.StepCache(make_step, functools.partial(plan.build_model, dataset.num_classes),
                         plan.policy.compute_dtype, mesh, plan.rules, donate=donate)
  control = loop_lib.PrecisionControl(plan, cache, task)
  loss_scale = plan.loss_scale
  if preset == "mixed" and loss_scale_mode == "dynamic":
    loss_scale = precision.dynamic_loss_scale(**config.precision.loss_scale.to_dict())
  with cache.context():
    state = create_train_state(cache.model(control.plan), tx,
                               task.example_batch(dataset.splits["train"]), config.seed,
                               loss_scale, task=task, mesh=mesh, rules=plan.rules,
                               policy=plan.policy)
  batch_sharding = sharding.batch_sharding(mesh)
  device_batches = [sharding.global_batch(b, batch_sharding, config.train.batch_size)
                    for b in batches]
  prepare = jax.jit(lambda batch, rng: task.prepare(batch, jax.random.split(rng)[0],
                                                    train=True))
  keys = [jax.random.fold_in(state.rng, i) for i in range(len(batches))]  # What run(i) uses.

  def prepared(i: int) -> dict[str, jax.Array]:
    return prepare(device_batches[i % len(batches)], keys[i % len(batches)])

  holder = {"state": state}

  def run(i: int) -> jax.Array:  # The loop's body, less data loading and logging.
    batch = device_batches[i % len(batches)]
    rng = jax.random.fold_in(holder["state"].rng, i)
    # As in the loop: the parameter norms only on the steps whose metrics are logged.
    with_norms = norms_every_step or (i + 1) % config.train.log_every_steps == 0
    holder["state"], metrics = cache.run(holder["state"], batch, rng, plan=control.plan,
                                         collect_stats=control.collects(i),
                                         with_norms=with_norms)
    loss = metrics["loss"]
    # What the loop's controller hook sees of the loop.
    view = types.SimpleNamespace(step_metrics=metrics, done=i + 1, state=holder["state"],
                                 probe_batch=lambda: batch)
    control.observe(view)
    holder["state"] = view.state
    return loss

  with cache.context():
    if control.collects(0):
      cache.compile(state, device_batches[0], keys[0], plan=control.plan, collect_stats=True)
    if not control.collects_every_step():
      cache.compile(state, device_batches[0], keys[0], plan=control.plan)
    eval_batch = prepared(0)
    args_, kwargs = task.model_args(eval_batch)
    model = cache.model(control.plan)
    outputs = jax.jit(lambda p: model.apply({"params": p, **state.model_state}, *args_,
                                            train=False, **kwargs))(state.params)
    scores = task.score(outputs, eval_batch)
    eval_loss = float(jnp.sum(scores["loss"]) / jnp.maximum(jnp.sum(scores["weight"]), 1.0))
  side = Side(run, eval_loss, sum(x.size for x in jax.tree.leaves(state.params)),
              jax.tree.map(np.asarray, state.params), config)
  return side, prepared


def _bare_params(name: str, dsjax_params: Any) -> Any:
  """dsjax's initial weights in the bare model's layout (layers unstacked for BERT)."""
  if name == "cnn-digits":
    return dsjax_params
  params = {k: v for k, v in dsjax_params.items() if k != "encoder"}
  encoder = dsjax_params["encoder"]
  if "layers" in encoder:  # Stacked (model.scan_layers=True).
    layers = jax.tree.leaves(encoder["layers"])[0].shape[0]
    encoder = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], encoder["layers"])
               for i in range(layers)}
  for i in range(len(encoder)):
    layer = dict(encoder[f"layers_{i}"])
    params[f"layer_{i}"] = {**layer.pop("attention"), **layer}
  return params


def bare_side(name: str, preset: str, dsjax: Side, prepared: Callable[[int], Any],
              dataset: Any, batches: list[dict[str, np.ndarray]], count: int) -> Side:
  """The bare step on the batches dsjax's step prepares (masks drawn from the same keys)."""
  config = dsjax.config
  dtype = jnp.float32 if preset == "fp32" else jnp.bfloat16
  m = config.model
  if name == "cnn-digits":
    model = BareCNN(tuple(m.features), m.dense_features, dataset.num_classes, m.dropout_rate,
                    dtype)
  else:
    model = BareBert(dataset.num_classes, m.hidden, m.num_layers, m.num_heads, m.mlp_dim,
                     m.max_position, m.dropout_rate, dtype)
  o = config.optimizer
  tx = bare_optimizer(o.name, o.learning_rate, o.schedule, o.warmup_steps, config.train.steps,
                      o.weight_decay, o.grad_clip_norm)
  loss = bare_loss_fn(model, mlm=name != "cnn-digits")
  params = jax.tree.map(jnp.asarray, _bare_params(name, dsjax.initial_params))
  device_batches = ([jax.device_put(b) for b in batches] if name == "cnn-digits"
                    else [jax.block_until_ready(prepared(i)) for i in range(count)])
  eval_loss = float(jax.jit(loss, static_argnums=3)(params, device_batches[0],
                                                     jax.random.key(0), False))
  train_step = bare_train_step(loss, tx)
  holder = {"params": params, "opt_state": tx.init(params)}
  dropout_key = jax.random.key(1)

  def run(i: int) -> jax.Array:
    holder["params"], holder["opt_state"], value = train_step(
        holder["params"], holder["opt_state"], device_batches[i % count],
        jax.random.fold_in(dropout_key, i))
    return value

  return Side(run, eval_loss, sum(x.size for x in jax.tree.leaves(params)))


def _train_batches(name: str, args: argparse.Namespace, dataset: Any) -> list[dict[str, Any]]:
  """The run's first warmup + steps training batches (host arrays), as the loop reads them."""
  batch_size = model_config(name, args).train.batch_size
  iterator = data.BatchIterator(dataset.splits["train"], batch_size, seed=0)
  return [iterator.batch(i) for i in range(args.warmup + args.steps)]


def compare(name: str, preset: str, args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
  """Times dsjax's and the bare step of one model and precision, interleaved."""
  batches = _train_batches(name, args, dataset)
  start = time.perf_counter()
  ours, prepared = dsjax_side(name, preset, args, dataset, {}, batches)
  compile_s = time.perf_counter() - start
  bare = bare_side(name, preset, ours, prepared, dataset, batches, len(batches))
  sides = {"dsjax": ours, "bare": bare}
  times, cpu_times, losses = _interleave(sides, len(batches), args.warmup, args.window)
  result = {side: {"median_s": statistics.median(times[side]), "min_s": min(times[side]),
                   "cpu_median_s": statistics.median(cpu_times[side]),
                   "times_s": times[side], "cpu_times_s": cpu_times[side],
                   "eval_loss": sides[side].eval_loss, "train_losses": losses[side],
                   "params": sides[side].params}
            for side in sides}
  result["dsjax"]["compile_s"] = compile_s
  if name != "cnn-digits":  # What the MLM masking inside dsjax's step costs on its own.
    masking = []
    for i in range(len(batches)):
      begin = time.perf_counter()
      jax.block_until_ready(prepared(i))
      masking.append(time.perf_counter() - begin)
    result["dsjax"]["masking_s"] = statistics.median(masking[1:])
  result.update(_ratios(times["dsjax"], times["bare"], cpu_times["dsjax"], cpu_times["bare"]))
  return result


def ablate(name: str, preset: str, args: argparse.Namespace, dataset: Any, ablation: str,
           overrides: dict[str, Any]) -> dict[str, float]:
  """The default dsjax step against the step without one feature, interleaved."""
  batches = _train_batches(name, args, dataset)
  default, _ = dsjax_side(name, preset, args, dataset, {}, batches)
  with _patches(ablation):
    ablated, _ = dsjax_side(name, preset, args, dataset, overrides, batches)
    times, cpu_times, losses = _interleave({"default": default, "ablated": ablated},
                                           len(batches), args.warmup, args.window)
  return {"default_s": statistics.median(times["default"]),
          "ablated_s": statistics.median(times["ablated"]),
          **_ratios(times["ablated"], times["default"], cpu_times["ablated"],
                    cpu_times["default"]),
          "eval_loss_default": default.eval_loss, "eval_loss_ablated": ablated.eval_loss,
          # Same keys, so the same dropout masks: the losses after a few updates say
          # whether the ablated step still trains the same way.
          "last_loss_default": losses["default"][-1],
          "last_loss_ablated": losses["ablated"][-1]}


def _interleave(sides: dict[str, Side], count: int, warmup: int, window: int = 1):
  """Runs the sides' steps in alternating (ABBA) order, so that drift in the machine's load
  hits all sides alike: `warmup` steps one at a time, then windows of `window` steps run
  back to back (dispatch overlapping execution, as in the loop) and timed together.

  Returns:
    Wall and process-CPU seconds per step of every timed window, and every step's loss,
    per side.
  """
  times = {side: [] for side in sides}
  cpu_times = {side: [] for side in sides}
  losses = {side: [] for side in sides}
  order = list(sides)
  starts = list(range(warmup)) + list(range(warmup, count, window))
  for n, first in enumerate(starts):
    size = 1 if first < warmup else min(window, count - first)
    for side in (order if n % 2 == 0 else order[::-1]):
      begin, cpu_begin = time.perf_counter(), time.process_time()
      values = [sides[side].run(i) for i in range(first, first + size)]
      jax.block_until_ready(values)
      if first >= warmup:
        times[side].append((time.perf_counter() - begin) / size)
        cpu_times[side].append((time.process_time() - cpu_begin) / size)
      losses[side].extend(float(value) for value in values)
  return times, cpu_times, losses


def _ratios(ours: list[float], theirs: list[float], ours_cpu: list[float],
            theirs_cpu: list[float]) -> dict[str, float]:
  """Ratio of median wall times, median of per-pair wall ratios (robust to load that
  changes between pairs), and the ratio of median CPU seconds (this process's threads
  only: what other jobs on a shared machine take is not counted)."""
  return {"ratio": statistics.median(ours) / statistics.median(theirs),
          "pair_ratio": statistics.median(a / b for a, b in zip(ours, theirs, strict=True)),
          "cpu_ratio": statistics.median(ours_cpu) / statistics.median(theirs_cpu)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["cnn-digits", "bert-tiny"],
                      choices=list(CONFIG_FILES))
  parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--window", type=int, default=1,
                      help="steps timed together without blocking in between (the loop "
                      "blocks only when it logs); 1: every step blocked and timed")
  parser.add_argument("--batch-size", type=int, default=0, help="0: the model's (bert-base: 8)")
  parser.add_argument("--layers", type=int, default=0,
                      help="BERT: encoder layers instead of the model's (quicker studies)")
  parser.add_argument("--mixed-loss-scale", choices=("dynamic", "policy"), default="dynamic")
  parser.add_argument("--ablations", nargs="*", default=None, choices=list(ABLATIONS),
                      help="also time dsjax with each feature removed (all when none named)")
  parser.add_argument("--no-compare", action="store_true",
                      help="ablations only: skip the dsjax / bare table")
  parser.add_argument("--cache-dir", default="", help="tokenizer cache; default a temp folder")
  parser.add_argument("--out", default="runs/bench/overhead.json")
  args = parser.parse_args()
  args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="dsjax-bench-")
  datasets = {name: data.get_dataset(model_config(name, args).data) for name in args.models}

  results: dict[str, Any] = {}
  if not args.no_compare:
    print(f"{'model':<11} {'precision':<9} {'bare ms':>9} {'dsjax ms':>9} {'ratio':>6} "
          f"{'pairs':>6} {'cpu':>6}  eval loss bare / dsjax   first train loss bare / dsjax")
  for name in [] if args.no_compare else args.models:
    for preset in args.precisions:
      result = results[f"{name}/{preset}"] = compare(name, preset, args, datasets[name])
      bare, ours = result["bare"], result["dsjax"]
      print(f"{name:<11} {preset:<9} {bare['median_s'] * 1e3:>9.1f} "
            f"{ours['median_s'] * 1e3:>9.1f} {result['ratio']:>6.3f} "
            f"{result['pair_ratio']:>6.3f} {result['cpu_ratio']:>6.3f}  "
            f"{bare['eval_loss']:.6f} / {ours['eval_loss']:.6f}   "
            f"{bare['train_losses'][0]:.4f} / {ours['train_losses'][0]:.4f}", flush=True)
  if args.ablations is not None:
    print("\nablations: dsjax without one feature / the default dsjax step, interleaved")
    for name in args.models:
      for preset in args.precisions:
        for ablation in args.ablations or list(ABLATIONS):
          overrides, what = ABLATIONS[ablation]
          if ((ablation in ("no-controller", "no-loss-scale") and preset != "mixed")
              or (ablation in ("full-head", "scan", "stacked", "argmax")
                  and name == "cnn-digits")):
            continue
          result = ablate(name, preset, args, datasets[name], ablation, overrides)
          results[f"{name}/{preset}/ablation/{ablation}"] = {"what": what, **result}
          print(f"{name:<11} {preset:<9} {ablation:<14} {result['default_s'] * 1e3:>9.1f} -> "
                f"{result['ablated_s'] * 1e3:>9.1f} ms  pairs {result['pair_ratio']:.3f}  "
                f"cpu {result['cpu_ratio']:.3f}  loss after {args.warmup + args.steps} "
                f"steps {result['last_loss_default']:.4f} / {result['last_loss_ablated']:.4f}"
                f"  ({what})", flush=True)
  path = benchlib.save_result(args.out, "overhead", {"config": vars(args), **results})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
