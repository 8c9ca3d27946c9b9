"""The precision plan of a run: one model and one compiled step per plan, the adaptive
controller, and the metrics the plan defines (`fp16_matmul_flops_fraction`,
`promoted_layers`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsjax import measure, precision
from dsjax.nn import PrecisionPlan
from dsjax.parallel import mesh as parallel_mesh
from dsjax.parallel import sharding
from dsjax.precision import adaptive
from dsjax.train.state import TrainState
from dsjax.train.tasks import Task

log = logging.getLogger(__name__)

# `build_model(plan, compute_dtype) -> module`.
ModelBuilder = Callable[[PrecisionPlan | None, Any], nn.Module]


def controller_enabled(precision_config: ml_collections.ConfigDict) -> bool:
  """Whether the adaptive controller runs: on for `mixed` unless `adaptive` says otherwise,
  and never when the policy computes in float32 (nothing to adapt)."""
  policy = precision.get_policy(precision_config.policy)
  if jnp.dtype(policy.compute_dtype) == jnp.float32:
    return False
  if precision_config.adaptive is None:
    return precision_config.policy == "mixed"
  return bool(precision_config.adaptive)


class PlanRuntime:
  """Keeps the model, the compiled step and the error probe of every plan seen so far.

  A plan change rebinds the state's `apply_fn` and switches to that plan's compiled step
  (compiled once, on first use); a plan seen before costs nothing.

  Every step is compiled with explicit shardings: the state keeps the shardings it was
  created (or restored) with, the batch is split over the mesh's batch axes, the metrics
  are replicated; tracing sees the mesh and the logical axis rules.

  Args:
    precision_config: the `precision` config section.
    build_model: makes the model for a plan and a compute dtype.
    make_step: `make_step(collect_stats, density) -> train_step`.
    task: the training task (reads the model's arguments for the error probe).
    mesh: the device mesh; None: a one-device mesh.
    rules: logical -> mesh axis rules.
    density_at: `step -> density` of compressed gradient exchange during its warm-up (a
      step is compiled per distinct density); None: no compression warm-up.
  """

  def __init__(self, precision_config: ml_collections.ConfigDict, build_model: ModelBuilder,
               make_step: Callable[[bool, float | None], Callable[..., Any]], *,
               task: Task | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: Any = (), density_at: Callable[[int], float | None] | None = None):
    self.compute_dtype = precision.get_policy(precision_config.policy).compute_dtype
    self.controller = None
    if controller_enabled(precision_config):
      knobs = precision_config.controller
      self.controller = adaptive.PrecisionController(
          self.compute_dtype, overflow_fraction=knobs.overflow_fraction,
          error_tolerance=knobs.error_tolerance, demote_fraction=knobs.demote_fraction,
          stable_checks=knobs.stable_checks)
      self.check_every = knobs.check_every_steps
      self.error_check_every = knobs.error_check_every_steps
    self._build = build_model
    self.task = task or Task("classification")
    self.mesh = mesh or parallel_mesh.make_mesh({}, jax.devices()[:1])
    self.rules = rules
    # Two steps per plan: the plain one, and (with the controller) one that also returns
    # the layers' statistics, run only on check steps so other steps pay nothing for them.
    self._make_step = make_step
    self._density_at = density_at or (lambda step: None)
    self._models: dict[PrecisionPlan | None, nn.Module] = {}
    self._compiled: dict[tuple[PrecisionPlan | None, bool, float | None], Any] = {}
    self._current: Any = None  # The compiled step that ran last.
    self._comm_bytes: dict[int, int] = {}
    self._probes: dict[PrecisionPlan | None, Any] = {}
    self._matmul_flops: dict[str, float] | None = None

  @property
  def plan(self) -> PrecisionPlan | None:
    return self.controller.plan if self.controller else None

  def model(self) -> nn.Module:
    """The model under the current plan."""
    if self.plan not in self._models:
      self._models[self.plan] = self._build(self.plan, self.compute_dtype)
    return self._models[self.plan]

  def bind(self, state: TrainState) -> TrainState:
    """Points the state's `apply_fn` at the current plan's model."""
    return state.replace(apply_fn=self.model().apply)

  def context(self) -> contextlib.AbstractContextManager:
    """The mesh and logical axis rules, for tracing anything that runs on the mesh."""
    return sharding.context(self.mesh, self.rules)

  def density(self, step_index: int) -> float | None:
    """The compressed-exchange density of step `step_index` (None: no warm-up schedule)."""
    return self._density_at(step_index)

  def collects(self, step_index: int | None) -> bool:
    """Whether step `step_index` (0-based) returns layer statistics for the controller."""
    if self.controller is None:
      return False
    return (step_index is None or self._matmul_flops is None
            or (step_index + 1) % self.check_every == 0)

  def collects_every_step(self) -> bool:
    """Whether every step returns statistics (then the plain step is never compiled)."""
    return self.controller is not None and self.check_every == 1

  def step(self, state: TrainState, batch: dict[str, Any], rng: jax.Array,
           step_index: int | None = None):
    """Runs the compiled step of the current plan (compiling it on first use).

    Args:
      state: the train state.
      batch: the global batch.
      rng: the step's key.
      step_index: the 0-based step; the controller's statistics are collected on its check
        steps only. None: collect whenever a controller runs.
    """
    rng = jax.device_put(rng, sharding.replicated(self.mesh))
    density = self.density(step_index or 0)
    self._current = self.compile(state, batch, rng, collect_stats=self.collects(step_index),
                                 density=density)
    return self._current(state, batch, rng)

  def compile(self, state: TrainState, batch: dict[str, Any], rng: jax.Array, *,
              collect_stats: bool = False, density: float | None = None) -> Any:
    """Compiles the current plan's step ahead of the loop (for a clean compile time).

    Returns:
      The compiled step, for cost and memory analysis.
    """
    key = (self.plan, collect_stats, density)
    if key not in self._compiled:
      replicated = sharding.replicated(self.mesh)
      state_shardings = jax.tree.map(lambda x: getattr(x, "sharding", replicated), state)
      batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(self.mesh), batch)
      jitted = jax.jit(self._make_step(collect_stats, density),
                       in_shardings=(state_shardings, batch_shardings, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
      with self.context():
        self._compiled[key] = jitted.lower(state, batch, rng).compile()
    return self._compiled[key]

  def flops_per_step(self) -> float:
    """XLA's FLOPs of the current plan's compiled step (0 before it is compiled)."""
    compiled = self._current or next(iter(self._compiled.values()), None)
    return measure.compiled_flops(compiled) if compiled is not None else 0.0

  def comm_bytes(self) -> int:
    """Bytes the collectives of the step that ran last move (from its compiled HLO)."""
    if self._current is None:
      return 0
    if id(self._current) not in self._comm_bytes:
      self._comm_bytes[id(self._current)] = int(
          measure.collective_bytes(self._current)["total"])
    return self._comm_bytes[id(self._current)]

  def after_step(self, step: int, state: TrainState, metrics: dict[str, Any],
                 batch: dict[str, Any]) -> TrainState:
    """Feeds the controller on check steps; returns the state bound to the (new) plan.

    Args:
      step: the number of steps done.
      state: the state after the step.
      metrics: the step's metrics; `precision_stats` is removed from them.
      batch: the step's batch, used by the float32 error check.

    Returns:
      The state, rebound to a new model if the plan changed.
    """
    stats = metrics.pop("precision_stats", None)
    if self.controller is None or stats is None:
      return state
    if step % self.check_every and self._matmul_flops is not None:
      return state
    stats = jax.device_get(stats)
    self._matmul_flops = {path: float(record["matmul_flops"]) for path, record in stats.items()}
    errors = None
    if step % self.error_check_every == 0:
      with self.context():
        errors = jax.device_get(self._probe()(state.params, state.model_state, batch))
    events_before = len(self.controller.events)
    if self.controller.observe(step, stats, errors):
      for event in self.controller.events[events_before:]:
        log.info("precision plan: %s", event)
      state = self.bind(state)
    return state

  def _probe(self):
    """Jitted per-layer relative error of the current plan against float32 on one batch."""
    if self.plan not in self._probes:
      half_model, fp32_model = self.model(), self._build(None, jnp.float32)

      def probe(params, model_state, batch):
        variables = {"params": params, **model_state}
        batch = self.task.prepare(batch, jax.random.PRNGKey(0), train=False)
        args, kwargs = self.task.model_args(batch)
        outputs = []
        for model in (half_model, fp32_model):
          _, captured = model.apply(variables, *args, train=False, **kwargs,
                                    capture_intermediates=True, mutable=["intermediates"])
          outputs.append(captured["intermediates"])
        return adaptive.relative_errors(*outputs)

      self._probes[self.plan] = jax.jit(probe, out_shardings=sharding.replicated(self.mesh))
    return self._probes[self.plan]

  def log_fields(self) -> dict[str, Any]:
    """Plan metrics for metrics.jsonl: half-precision share of matmul FLOPs, promotions."""
    if jnp.dtype(self.compute_dtype) == jnp.float32:
      fraction = 0.0
    elif self.plan is None or not self._matmul_flops:
      fraction = 1.0
    else:
      fraction = adaptive.half_matmul_fraction(self.plan, self._matmul_flops, self.compute_dtype)
    return {"fp16_matmul_flops_fraction": fraction,
            "promoted_layers": len(self.plan.promoted()) if self.plan else 0}

  def state_dict(self) -> dict[str, Any] | None:
    return self.controller.state_dict() if self.controller else None

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    if self.controller and state:
      self.controller.load_state_dict(state)
