"""Optimizer and learning-rate schedule from `config.optimizer`."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(opt_config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """Returns the learning rate as a function of the step.

  Args:
    opt_config: the `optimizer` config section.
    total_steps: `train.steps`; the cosine schedule reaches 0 there unless
      `decay_steps` is set.

  Returns:
    An optax schedule: linear warm-up over `warmup_steps` (if any), then constant or
    cosine decay over the remaining steps.
  """
  peak, warmup = opt_config.learning_rate, opt_config.warmup_steps
  decay_steps = max((opt_config.decay_steps or total_steps) - warmup, 1)
  if opt_config.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps)
  else:
    main = optax.constant_schedule(peak)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def build_optimizer(opt_config: ml_collections.ConfigDict,
                    total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the weight optimizer.

  Args:
    opt_config: the `optimizer` config section (validated).
    total_steps: `train.steps`.

  Returns:
    `(tx, learning_rate_fn)`; the schedule is returned too so metrics can log it.
  """
  lr = learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == "adamw":
    tx = optax.adamw(lr, weight_decay=opt_config.weight_decay)
  else:
    momentum = opt_config.momentum if opt_config.name == "momentum" else None
    tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay),
                     optax.sgd(lr, momentum=momentum))
  if opt_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx, lr
