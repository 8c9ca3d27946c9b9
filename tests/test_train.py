"""The training step against independent references, and a short end-to-end run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import config as config_lib
from dsjax import data, models
from dsjax.train import (
    Task,
    create_train_state,
    evaluate,
    make_eval_step,
    make_task,
    make_train_step,
    train_and_evaluate,
)
from dsjax.train.optim import build_optimizer

CLS = Task("classification")


def _setup(batch_size=32, optimizer="sgd"):
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  config.optimizer.name, config.optimizer.schedule = optimizer, "constant"
  config.optimizer.learning_rate, config.optimizer.weight_decay = 0.1, 0.0
  dataset = data.get_dataset(config.data)
  model = models.get_spec("cnn-digits").build(config.model, 10, jnp.float32)
  tx, lr = build_optimizer(config.optimizer, 10)
  state = create_train_state(model, tx, dataset.input_shape, seed=0)
  batch = data.BatchIterator(dataset.splits["train"], batch_size, seed=0).batch(0)
  return state, batch, lr


@pytest.mark.slow
def test_mlm_evaluation_does_not_depend_on_the_batch_size():
  """Evaluation masks each sequence from its index in the split, not from its batch: a
  tiny BERT scores a split the same in batches of 3, 8 or all of it at once (rtol 1e-6,
  float32 sums regrouped), as a mesh or pipeline that rounds the batch up needs."""
  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
  config.model.update(hidden=16, num_layers=1, num_heads=2, mlp_dim=32, max_position=16)
  config.data.seq_len, config.data.vocab_size = 16, 128
  dataset = data.get_dataset(config.data)
  task = make_task("mlm", config.data, dataset.metadata)
  model = models.get_spec("bert-tiny").build(config.model, dataset.num_classes, jnp.float32)
  state = create_train_state(model, optax.sgd(0.1), task.example_batch(dataset.splits["train"]),
                             seed=0, task=task)
  split = {key: value[:40] for key, value in dataset.splits["val"].items()}
  eval_fn = jax.jit(make_eval_step(task))
  whole = evaluate(state, eval_fn, split, 40)
  for batch_size in (3, 8):
    batched = evaluate(state, eval_fn, split, batch_size)
    np.testing.assert_allclose(batched["loss"], whole["loss"], rtol=1e-6)
    assert batched["accuracy"] == pytest.approx(whole["accuracy"], abs=1e-12)


def test_eval_examples_scores_the_first_examples(tmp_path):
  """train.eval_examples: evaluate_split scores the split's first N examples, exactly as
  evaluating those examples alone."""
  from dsjax.train import evaluation

  state, _, _ = _setup()
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  dataset = data.get_dataset(config.data)
  eval_fn = jax.jit(make_eval_step(CLS))
  first = {key: value[:50] for key, value in dataset.splits["val"].items()}
  capped = evaluation.evaluate_split(state, eval_fn, dataset, "val", 32, tmp_path,
                                     max_examples=50)
  assert capped == evaluate(state, eval_fn, first, 32)
  assert capped != evaluation.evaluate_split(state, eval_fn, dataset, "val", 32, tmp_path)


def _tiny_mlm(**data_fields):
  config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
  config.model.update(hidden=16, num_layers=1, num_heads=2, mlp_dim=32, max_position=16)
  config.data.seq_len, config.data.vocab_size = 16, 128
  config.data.update(data_fields)
  dataset = data.get_dataset(config.data)
  task = make_task("mlm", config.data, dataset.metadata)
  model = models.get_spec("bert-tiny").build(config.model, dataset.num_classes, jnp.float32)
  state = create_train_state(model, optax.sgd(0.1), task.example_batch(dataset.splits["train"]),
                             seed=0, task=task)
  return dataset, task, state


def _mlm_loss_and_grads(task, state, batch, rng):
  """The training loss (dropout on) and its gradients, computed as the train step does."""

  def loss(params):
    prepared = task.prepare(batch, rng, train=True)
    args, kwargs = task.model_args(prepared)
    outputs = state.apply_fn({"params": params}, *args, train=True, **kwargs,
                             rngs={"dropout": jax.random.PRNGKey(7)})
    scores = task.score(outputs, prepared)
    return jnp.sum(scores["loss"]) / jnp.sum(scores["weight"])

  return jax.jit(jax.value_and_grad(loss))(state.params)


@pytest.mark.slow
def test_masked_only_mlm_head_gives_the_full_heads_loss_and_gradients():
  """Training gathers the masked positions before the vocabulary projection (by default
  ceil(mean + 4 sd) = 9 slots of 16 here): the loss and every gradient equal the full
  head's (data.max_predictions=0) on the same batch, dropout on, to float32 rounding."""
  dataset, task, state = _tiny_mlm()
  assert task.max_predictions == -1 and task.prediction_slots(16) == 9
  full_task = dataclasses.replace(task, max_predictions=0)
  batch = data.BatchIterator(dataset.splits["train"], 8, seed=0).batch(0)
  rng = jax.random.PRNGKey(3)
  gathered = jax.jit(lambda b: task.prepare(b, rng, train=True))(batch)
  full = jax.jit(lambda b: full_task.prepare(b, rng, train=True))(batch)
  assert gathered["mlm_positions"].shape == (8, 9) and "mlm_positions" not in full
  # No sequence masked more than 9 here, so both score the same tokens on the same input.
  np.testing.assert_array_equal(gathered["input_ids"], full["input_ids"])
  assert float(gathered["mlm_weights"].sum()) == float(full["mlm_weights"].sum()) > 8
  want_loss, want_grads = _mlm_loss_and_grads(full_task, state, batch, rng)
  got_loss, got_grads = _mlm_loss_and_grads(task, state, batch, rng)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Evaluation batches keep the full head.
  assert "mlm_positions" not in task.prepare(batch, rng, train=False)


@pytest.mark.slow
def test_masked_tokens_beyond_the_prediction_slots_stay_unmasked():
  """With more masked tokens than slots, a sequence keeps its first `max_predictions`
  (in position order) and gets the others back unmasked: the gathered loss is the full
  head's on that input with those weights."""
  dataset, task, state = _tiny_mlm(mlm_probability=0.5, max_predictions=2)
  batch = data.BatchIterator(dataset.splits["train"], 8, seed=0).batch(0)
  rng = jax.random.PRNGKey(3)
  uncapped = dataclasses.replace(task, max_predictions=0).prepare(batch, rng, train=True)
  capped = task.prepare(batch, rng, train=True)
  selected = np.asarray(uncapped["mlm_weights"]) > 0
  assert (selected.sum(-1) > 2).any()  # The cap binds.
  kept = selected & (np.cumsum(selected, -1) <= 2)
  counts = np.minimum(selected.sum(-1), 2)
  np.testing.assert_array_equal(capped["mlm_weights"], np.arange(2) < counts[:, None])
  for row in range(8):
    np.testing.assert_array_equal(np.asarray(capped["mlm_positions"][row])[
        np.asarray(capped["mlm_weights"][row]) > 0], np.flatnonzero(kept[row]))
  ids = np.where(kept, uncapped["input_ids"], batch["input_ids"])
  np.testing.assert_array_equal(capped["input_ids"], ids)
  logits = state.apply_fn({"params": state.params}, capped["input_ids"],
                          attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"])
  full = dataclasses.replace(task, max_predictions=0).score(
      logits, {"mlm_labels": uncapped["mlm_labels"], "mlm_weights": kept.astype(np.float32)})
  args, kwargs = task.model_args(capped)
  scores = task.score(state.apply_fn({"params": state.params}, *args, **kwargs), capped)
  np.testing.assert_allclose(scores["loss"], full["loss"], rtol=1e-6)
  np.testing.assert_array_equal(scores["weight"], full["weight"])


def test_first_argmax_is_argmax():
  """The MLM accuracy's argmax (two plain reductions): jnp.argmax's index, ties (first
  wins), infinities and NaN (the first NaN wins) included."""
  from dsjax.train.tasks import first_argmax

  logits = np.random.default_rng(0).normal(size=(6, 5, 33)).astype(np.float32)
  logits[0, 0, [3, 7]] = 9.0  # A tie.
  logits[1, 1] = -np.inf
  logits[2, 2, 5] = np.inf
  logits[3, 3, [4, 9]] = np.nan
  logits[4, 4, :] = 1.0
  np.testing.assert_array_equal(jax.jit(first_argmax)(logits), np.argmax(logits, -1))


def _reference_loss(params, state, batch):
  """Mean cross-entropy over the whole batch, written out with plain jnp."""
  logits = state.apply_fn({"params": params}, batch["image"], train=True)
  log_probs = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_one_big_batch(accum):
  state, batch, lr = _setup(batch_size=32)
  params_before = jax.tree.map(np.asarray, state.params)
  big, big_metrics = jax.jit(make_train_step(CLS, 1, lr))(state, batch, jax.random.PRNGKey(1))
  accumulated, acc_metrics = jax.jit(make_train_step(CLS, accum, lr))(state, batch,
                                                                 jax.random.PRNGKey(1))
  # float32 sums of 32 per-example gradients taken in a different order: a few ulps.
  for a, b, before in zip(jax.tree.leaves(big.params), jax.tree.leaves(accumulated.params),
                          jax.tree.leaves(params_before), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(a, before)  # The step did change the params.
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(big_metrics[key], acc_metrics[key], rtol=1e-5)


@pytest.mark.slow
def test_step_matches_reference_sgd_update():
  state, batch, lr = _setup(batch_size=16)
  reference_loss, reference_grads = jax.value_and_grad(_reference_loss)(state.params, state,
                                                                        batch)
  expected = jax.tree.map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), state.params,
                          reference_grads)
  new_state, metrics = jax.jit(make_train_step(CLS, 1, lr))(state, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(metrics["loss"], reference_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["learning_rate"], 0.1)
  grad_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                          for g in jax.tree.leaves(reference_grads)))
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
  np.testing.assert_allclose(metrics["update_norm"], 0.1 * grad_norm, rtol=1e-5)
  assert int(new_state.step) == 1
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected),
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_train_step_donates_state():
  state, batch, lr = _setup(batch_size=16, optimizer="adamw")
  step_fn = jax.jit(make_train_step(CLS, 2, lr), donate_argnums=(0,))
  leaf = jax.tree.leaves(state.params)[0]
  new_state, _ = step_fn(state, batch, jax.random.PRNGKey(0))
  assert leaf.is_deleted()
  assert optax.tree.norm(new_state.params) > 0


@pytest.mark.slow
def test_short_run_learns(tmp_path):
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.train.steps, config.train.batch_size = 120, 64
  config.train.eval_every_steps = config.checkpoint.every_steps = 60
  config.optimizer.learning_rate = 3e-3
  config.logging.progress_bar = False
  summary = train_and_evaluate(config, tmp_path)
  assert summary["steps"] == 120
  assert summary["test_accuracy"] > 0.85  # Chance is 0.1; 400 steps reach about 0.98.


@pytest.mark.parametrize("preset", ["bf16", "fp16", "mixed"])
def test_reduced_precision_step_tracks_fp32(preset):
  """Half-precision compute, float32 master weights: the loss agrees with the fp32 step to
  within the ~3 significant digits bf16 keeps (fp16 keeps more)."""
  from dsjax import precision

  state, batch, lr = _setup(batch_size=16)
  dtype = precision.compute_dtype(preset)
  assert dtype == (jnp.bfloat16 if preset in ("bf16", "mixed") else jnp.float16)  # CPU.
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  half_model = models.get_spec("cnn-digits").build(config.model, 10, dtype)
  half_state = state.replace(apply_fn=half_model.apply)
  _, full = jax.jit(make_train_step(CLS, 1, lr))(state, batch, jax.random.PRNGKey(0))
  new_half, half = jax.jit(make_train_step(CLS, 1, lr))(half_state, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(half["loss"], full["loss"], rtol=2e-2)
  np.testing.assert_allclose(half["grad_norm"], full["grad_norm"], rtol=5e-2)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_half.params))


def test_nonfinite_step_is_skipped_and_scale_backs_off():
  from dsjax import precision

  state, batch, lr = _setup(batch_size=16, optimizer="adamw")
  state = state.replace(loss_scale=precision.dynamic_loss_scale(2.0**15))
  step_fn = jax.jit(make_train_step(CLS, 2, lr))
  image = batch["image"].copy()
  image[3, 0, 0, 0] = np.inf
  poisoned = dict(batch, image=image)
  skipped, metrics = step_fn(state, poisoned, jax.random.PRNGKey(0))
  assert_trees_bitwise_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  assert_trees_bitwise_equal(skipped.params, state.params)
  assert_trees_bitwise_equal(skipped.opt_state, state.opt_state)
  assert float(metrics["loss_scale"]) == 2.0**14 and int(metrics["skipped_steps"]) == 1
  assert int(skipped.step) == 1
  # The next finite step trains normally, with the same update the fp32 path makes at a
  # no-op scale (scaling by a power of two and back is exact in float32).
  updated, metrics = step_fn(skipped, batch, jax.random.PRNGKey(0))
  reference, _ = step_fn(state.replace(loss_scale=precision.NoOpLossScale()), batch,
                         jax.random.PRNGKey(0))
  assert int(metrics["skipped_steps"]) == 1
  for got, want in zip(jax.tree.leaves(updated.params), jax.tree.leaves(reference.params),
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_one_device_step_reduces_small_leaves_together():
  """On one device the finite check and the norms reduce the small leaves as one
  concatenated vector (a few kernels instead of dozens): the metrics equal the per-leaf
  ones (8 devices visible, no mesh) to float32 rounding, and a non-finite gradient is
  still caught."""
  from dsjax.train import step as step_lib

  state, batch, lr = _setup(batch_size=16, optimizer="adamw")
  step_fn = make_train_step(CLS, 1, lr)
  _, per_leaf = jax.jit(step_fn)(state, batch, jax.random.PRNGKey(0))
  image = batch["image"].copy()
  image[3, 0, 0, 0] = np.nan
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
    assert len(step_lib._reduction_operands(state.params)) == 1  # Every CNN leaf is small.
    _, grouped = jax.jit(step_fn)(state, batch, jax.random.PRNGKey(0))
    _, poisoned = jax.jit(step_fn)(state, dict(batch, image=image), jax.random.PRNGKey(0))
  assert len(step_lib._reduction_operands(state.params)) == len(jax.tree.leaves(state.params))
  for key in ("loss", "grad_norm", "param_norm", "update_norm"):
    np.testing.assert_allclose(grouped[key], per_leaf[key], rtol=1e-6)
  assert int(grouped["skipped_steps"]) == 0 and int(poisoned["skipped_steps"]) == 1


def test_half_residuals_keep_the_gradients():
  """Rematerialising with only bf16 residuals saved recomputes the same forward pass:
  loss equal, gradients within bf16 rounding (XLA:CPU fuses the recomputation
  differently, so not bit-identical)."""
  state, batch, lr = _setup(batch_size=16)
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  half_model = models.get_spec("cnn-digits").build(config.model, 10, jnp.bfloat16)
  state = state.replace(apply_fn=half_model.apply)
  plain, plain_metrics = jax.jit(make_train_step(CLS, 1, lr))(state, batch, jax.random.PRNGKey(0))
  remat, remat_metrics = jax.jit(make_train_step(CLS, 1, lr, half_residuals=True))(
      state, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(remat_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(remat_metrics["grad_norm"], plain_metrics["grad_norm"], rtol=2e-2)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(remat.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.slow
def test_pallas_dense_trains_like_xla():
  """`model.matmul_impl=pallas` routes the dense layers through the Pallas kernel
  (interpret mode here). In float32 both paths accumulate in float32 (the kernel at
  HIGHEST precision), so five AdamW steps agree to float32 rounding."""
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  dataset = data.get_dataset(config.data)
  batches = data.BatchIterator(dataset.splits["train"], 32, seed=0)
  final = {}
  for impl in ("xla", "pallas"):
    config.model.matmul_impl = impl
    model = models.get_spec("cnn-digits").build(config.model, 10, jnp.float32)
    tx, lr = build_optimizer(config.optimizer, 10)
    state = create_train_state(model, tx, dataset.input_shape, seed=0)
    step_fn = jax.jit(make_train_step(CLS, 1, lr))
    losses = []
    for step in range(5):
      state, metrics = step_fn(state, batches.batch(step), jax.random.PRNGKey(step))
      losses.append(float(metrics["loss"]))
    final[impl] = (losses, state.params)
  np.testing.assert_allclose(final["pallas"][0], final["xla"][0], rtol=1e-5)
  assert final["xla"][0][-1] < final["xla"][0][0]  # It did train.
  for a, b in zip(jax.tree.leaves(final["xla"][1]), jax.tree.leaves(final["pallas"][1]),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_rng_implementations():
  """`train.dropout_rng`: rbg masks come from XLA's bit generator (threefry's step has
  none) and are deterministic per step key; an unknown name is a config error."""
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  config.model.dropout_rate = 0.5
  state, batch, lr = _setup()
  model = models.get_spec("cnn-digits").build(config.model, 10, jnp.float32)
  state = state.replace(apply_fn=model.apply)
  rng = jax.random.PRNGKey(3)
  lowered = {impl: jax.jit(make_train_step(CLS, 1, lr, dropout_rng=impl)).lower(
      state, batch, rng) for impl in ("threefry2x32", "rbg")}
  assert "rng_bit_generator" in lowered["rbg"].as_text()
  assert "rng_bit_generator" not in lowered["threefry2x32"].as_text()
  rbg = lowered["rbg"].compile()
  loss = float(rbg(state, batch, rng)[1]["loss"])
  assert np.isfinite(loss) and float(rbg(state, batch, rng)[1]["loss"]) == loss
  # Another key draws other masks (the masks follow the step key).
  assert float(rbg(state, batch, jax.random.PRNGKey(4))[1]["loss"]) != loss
  config.train.dropout_rng = "philox"
  with pytest.raises(config_lib.ConfigError, match="train.dropout_rng must be one of"):
    config_lib.validate(config)


def test_steps_without_norms_skip_only_the_norms():
  """`with_norms` (traced: one compile for both) leaves the update bit-identical and only
  drops the three parameter norms to NaN; with it, they equal optax's global norms (rtol
  1e-6: float32 sums regrouped)."""
  state, batch, lr = _setup(batch_size=16, optimizer="adamw")
  step_fn = jax.jit(make_train_step(CLS, 1, lr))
  rng = jax.random.key(1)
  with_state, with_metrics = step_fn(state, batch, rng, jnp.bool_(True))
  without_state, without_metrics = step_fn(state, batch, rng, jnp.bool_(False))
  assert step_fn._cache_size() == 1
  jax.tree.map(np.testing.assert_array_equal, with_state.params, without_state.params)
  for key in ("grad_norm", "param_norm", "update_norm"):
    assert np.isnan(without_metrics[key]) and np.isfinite(with_metrics[key]), key
  for key in set(with_metrics) - {"grad_norm", "param_norm", "update_norm"}:
    np.testing.assert_array_equal(with_metrics[key], without_metrics[key])
  np.testing.assert_allclose(with_metrics["param_norm"], optax.tree.norm(with_state.params),
                             rtol=1e-6)
  updates = jax.tree.map(jnp.subtract, with_state.params, state.params)
  np.testing.assert_allclose(with_metrics["update_norm"], optax.tree.norm(updates), rtol=1e-5)
