"""GPipe pipeline parallelism over a stack of identical layers, for the `pipe` mesh axis.

`Pipeline` runs `num_layers` copies of one layer. Its parameters have the layout of
`nn.scan` over the layer class: one submodule "layers" whose every leaf has a leading
[num_layers] axis with the logical name "layers" (a circular pipeline stores them
stage-major, see below). The layout does not depend on `num_stages`, so a checkpoint
written by a pipelined run restores into an unpipelined one and back.

With `num_stages` P > 1 the stack is cut into P stages of L/P contiguous layers (stage s
owns layers s*L/P ... (s+1)*L/P - 1) and the batch into M microbatches, and the GPipe
schedule runs M + P - 1 iterations. In each, stage 0 takes the next microbatch, every
stage applies its layers to the microbatch it holds (one `jax.vmap` over the stage axis),
and the stage buffer shifts by one stage (`jnp.roll`). The buffer's stage axis carries the
logical name "stages": with the rules `("stages", "pipe"), ("layers", "pipe")` each device
of the `pipe` axis holds one stage's parameters and activations, and XLA turns the roll
into a `collective-permute`. The same code runs on a single device without any rules.
`jax.grad` through it is the GPipe backward (the transpose of the roll sends cotangents
upstream). This is the SPMD pattern of MaxText's pipeline.

Only that shift communicates inside the schedule loop:
- the inputs and the output buffer are kept per stage, and the last stage's results reach
  stage 0 through the roll's wrap-around, so nothing is broadcast over `pipe` each step;
- each data-parallel replica (the mesh axes of the logical axis "replica") runs on its own
  copy of the stage parameters, so their gradients are summed over the replicas once per
  step rather than once per schedule step. The copy costs one stage's parameters (and
  their gradient) per device. With the default rules (`replica -> data`) FSDP-sharded
  parameters are still gathered, and their gradients reduced, in every schedule step;
  the rule `replica -> data + fsdp` makes the copies per FSDP shard too, so each is
  gathered once before the schedule and its gradient reduced once after it (MaxText's
  "FSDP all-gather once"): less traffic for a whole stage's gathered weights per device.

Circular repeats (`num_repeats` R > 1, MaxText's circular pipeline, Megatron's
interleaved schedule): the stack is cut into R * P chunks of L / (R P) layers, chunk c
runs on stage c mod P, and each microbatch goes round the ring of stages R times: after
the last stage it waits in the output buffer and re-enters stage 0 M steps after its
previous entry (so M >= P). The schedule takes R M + P - 1 steps of 1/R the work each:
the bubble shrinks from (P - 1)/(M + P - 1) to (P - 1)/(R M + P - 1).

Stage s needs the strided chunks s, s + P, ..., which a `layers -> pipe` sharding of the
scan layout does not put on one device: every step would move the stacked parameters
(and their gradients) between the pipe devices. So a circular pipeline keeps its
parameters in the *circular layout* `CircularLayout`: every leaf [P, R, L/(RP), ...]
(logical axes "stages", None, None, ...), chunk r * P + s at [s, r], and each pipe device
holds exactly the chunks its stage runs. Checkpoints stay in the scan layout: the trainer's
`Checkpointer` converts on save and restore (`CircularLayout.to_scan`/`from_scan`), so a
circular run resumes on any mesh and pipeline settings, and back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dsjax.errors import ConfigError

LAYERS_AXIS = "layers"
STAGES_AXIS = "stages"
REPLICA_AXIS = "replica"
_UNCONSTRAINED = jax.sharding.PartitionSpec.UNCONSTRAINED


def bubble_fraction(num_stages: int, num_microbatches: int, num_repeats: int = 1) -> float:
  """The theoretical pipeline bubble: (P - 1) / (R M + P - 1).

  Each of the R M + P - 1 schedule steps runs every stage once, and a stage does useful
  work in exactly R M of them, so this share of the stage-steps is idle (filling and
  draining the pipeline). It ignores communication and the backward pass's own bubble,
  which has the same shape. More microbatches or circular repeats shrink it: P=4, M=4
  idles 3/7; M=16 3/19; M=4 with R=2 3/11.

  Args:
    num_stages: pipeline stages P (>= 1).
    num_microbatches: microbatches M per batch (>= 1).
    num_repeats: circular repeats R (>= 1); 1 is GPipe.

  Returns:
    The idle fraction in [0, 1); 0.0 for a single stage.
  """
  if num_stages < 1 or num_microbatches < 1 or num_repeats < 1:
    raise ConfigError(
        f"bubble_fraction needs num_stages, num_microbatches and num_repeats >= 1, got "
        f"{num_stages}, {num_microbatches} and {num_repeats}; pass positive counts.")
  return (num_stages - 1) / (num_repeats * num_microbatches + num_stages - 1)


@dataclasses.dataclass(frozen=True)
class CircularLayout:
  """The circular pipeline's parameter layout, and conversions from and to the scan's.

  Scan layout: every stacked leaf [L, ...], logical axes ("layers", ...). Circular layout:
  [P, R, L/(RP), ...], logical axes ("stages", None, None, ...), chunk r * P + s (layers
  (r P + s) L/(RP) ...) at [s, r]. Both sharded on `pipe` by their first axis, the circular
  one gives each device the chunks its stage runs.

  The tree methods convert every leaf under a "layers" key, wherever it sits, so they take
  whole train states: the optimizer moments and any other parameter-shaped buffers move
  with the parameters.
  """

  num_stages: int
  num_repeats: int

  def to_scan(self, tree: Any) -> Any:
    """Circular -> scan layout, for every leaf under a "layers" key."""
    return _map_stacked(self._leaf_to_scan, tree)

  def from_scan(self, tree: Any) -> Any:
    """Scan -> circular layout, for every leaf under a "layers" key."""
    return _map_stacked(self._leaf_from_scan, tree)

  def scan_abstract(self, tree: Any) -> Any:
    """The scan-layout `jax.ShapeDtypeStruct`s (with shardings) of an abstract state.

    A leaf's sharding keeps its stage axis's mesh axes on the merged layer axis: a
    contiguous layers -> pipe sharding, as the scan layout is sharded.
    """
    def leaf(x: Any) -> jax.ShapeDtypeStruct:
      shape = (x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:])
      sharding = getattr(x, "sharding", None)
      if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(spec[0], *spec[3:]))
      return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)
    return _map_stacked(leaf, tree)

  def _leaf_to_scan(self, x: Any) -> Any:
    if isinstance(x, nn.Partitioned):
      return x.replace(value=self._leaf_to_scan(x.value), names=(LAYERS_AXIS, *x.names[3:]))
    if x.shape[:2] != (self.num_stages, self.num_repeats):
      raise ConfigError(
          f"a stacked parameter of shape {x.shape} is not in the circular layout of "
          f"{self.num_stages} stages x {self.num_repeats} repeats; it was made with other "
          "pipeline settings: use the pipe size and parallel.pipeline_repeats it was made with")
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])

  def _leaf_from_scan(self, x: Any) -> Any:
    if isinstance(x, nn.Partitioned):
      return x.replace(value=self._leaf_from_scan(x.value),
                       names=(STAGES_AXIS, None, None, *x.names[1:]))
    chunks = self.num_stages * self.num_repeats
    if not x.shape or x.shape[0] % chunks:
      raise ConfigError(
          f"a stack of {x.shape[:1]} layers does not split into {self.num_stages} pipeline "
          f"stages x {self.num_repeats} circular repeats: make the layer count a multiple "
          f"of {chunks}")
    x = x.reshape(self.num_repeats, self.num_stages, -1, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def _leaves_to_scan(self, tree: Any) -> Any:
    return jax.tree.map(self._leaf_to_scan, tree, is_leaf=_is_box)

  def _leaves_from_scan(self, tree: Any) -> Any:
    return jax.tree.map(self._leaf_from_scan, tree, is_leaf=_is_box)


def circular_layout(num_stages: int, num_repeats: int) -> CircularLayout | None:
  """The layout a `Pipeline` with these settings keeps its parameters in; None: scan's."""
  return CircularLayout(num_stages, num_repeats) if num_stages > 1 and num_repeats > 1 else None


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _map_stacked(fn: Any, tree: Any) -> Any:
  """Applies `fn` to every leaf with a "layers" dict key on its path; others unchanged."""
  def leaf(path: Any, x: Any) -> Any:
    stacked = any(isinstance(key, jax.tree_util.DictKey) and key.key == LAYERS_AXIS
                  for key in path)
    return fn(x) if stacked else x
  return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_box)


@functools.cache
def _carry_adapter(layer_cls: type[nn.Module], train: bool) -> type[nn.Module]:
  """A subclass of `layer_cls` with the `(carry, xs) -> (carry, ys)` call `nn.scan` wants.

  A subclass rather than a wrapper module, so the scanned parameters sit directly under
  "layers" exactly as `nn.scan(layer_cls)` would put them. `train` is baked into the
  class (two classes per layer class at most) so that no Python bool has to pass through
  `nn.scan` or `nn.remat`.
  """

  class Adapter(layer_cls):  # type: ignore[valid-type, misc]

    def __call__(self, carry, args):
      return super().__call__(carry, *args, train=train), None

  Adapter.__name__ = Adapter.__qualname__ = f"{layer_cls.__name__}Scanned"
  return Adapter


def _layer_fields(layer: nn.Module) -> dict[str, Any]:
  """The dataclass attributes of `layer`, without `parent` and `name`."""
  return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
          if f.init and f.name not in ("parent", "name")}


def _axis_names(axes: str | Sequence[str] | None) -> tuple[str, ...]:
  """A rule's mesh axes (one name, several, or None) as a tuple of names."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _stage_mesh_axis() -> str | tuple[str, ...] | None:
  """The mesh axis the logical "stages" axis maps to, if rules and a mesh say so.

  Passed as `spmd_axis_name` to the vmap over stages, so that sharding constraints inside
  the layer (on its activations) keep the stage axis sharded instead of replicating it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axis = nn.logical_to_mesh_axes((STAGES_AXIS,))[0]
  names = _axis_names(axis)
  if not names or any(name not in mesh.axis_names for name in names):
    return None
  return axis


def _replica_mesh_axes() -> tuple[tuple[str, ...], int]:
  """The data-parallel mesh axes of the batch, and how many ways they split it.

  Data parallelism inside the pipeline: every schedule step adds each stage's parameter
  gradient for one microbatch, and a gradient summed over a batch split on some mesh axes
  is all-reduced where it is made, so every step would all-reduce the stage's gradients.
  The pipeline instead gives each data-parallel replica its own copy of the stage
  parameters, accumulates per-copy gradients locally and sums the copies once, after the
  schedule. The replicas are the mesh axes of the logical axis "replica" (default rules:
  `data`), when they lead the batch's mesh axes (so that a replica's rows are a
  contiguous block of the microbatch). `((), 1)` without a mesh or such rules.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  replicas, batch = (_axis_names(nn.logical_to_mesh_axes((name,))[0])
                     for name in (REPLICA_AXIS, "batch"))
  if not replicas or batch[:len(replicas)] != replicas or not set(replicas) <= set(
      mesh.axis_names):
    return (), 1
  return replicas, math.prod(mesh.shape[axis] for axis in replicas)


def _rules_without(axes: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
  """The current logical axis rules with `axes` removed from every mapping."""
  def strip(value: Any) -> Any:
    return tuple(a for a in _axis_names(value) if a not in axes) or None
  return tuple((name, strip(value)) for name, value in nn.get_logical_axis_rules())


def _constrain_stages(tree: Any) -> Any:
  """Shards axis 0 ("stages") of every leaf; other axes follow their inputs."""
  return jax.tree.map(
      lambda a: nn.with_logical_constraint(a, (STAGES_AXIS,) + (_UNCONSTRAINED,) * (a.ndim - 1)),
      tree)


def _to_microbatches(a: jax.Array, num_microbatches: int) -> jax.Array:
  # Strided: microbatch m holds examples m, m + M, m + 2M, ... . A batch sharded on its
  # leading axis (data parallelism) keeps that sharding on the microbatch axis [mb], so
  # every data shard works on every microbatch and the split needs no communication.
  return jnp.swapaxes(a.reshape(-1, num_microbatches, *a.shape[1:]), 0, 1)


def _from_microbatches(a: jax.Array) -> jax.Array:
  return jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])


class Pipeline(nn.Module):
  """`num_layers` copies of `layer`, run as one scan or as a GPipe pipeline.

  Attributes:
    layer: an unbound template instance; its `__call__(x, *per_example_args, train=...)`
      returns an array shaped (and typed) like x. Only its attributes are used: the
      parameters live under "layers", never under "layer".
    num_layers: L, the number of stacked layers.
    num_stages: P, pipeline stages; must divide L. 1 is a plain `nn.scan`.
    num_microbatches: M, microbatches per batch; must divide the batch. The pipeline
      idles `bubble_fraction(P, M)` of the time.
    remat: recompute activations in the backward pass (per layer in the scan, per
      schedule step in the pipeline) instead of storing them.
    num_repeats: R, circular repeats (see the module docstring); R * P must divide L,
      and R > 1 needs M >= P. The pipeline then idles `bubble_fraction(P, M, R)`.
  """

  layer: nn.Module
  num_layers: int
  num_stages: int = 1
  num_microbatches: int = 1
  remat: bool = False
  num_repeats: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *per_example_args: jax.Array,
               train: bool = False) -> jax.Array:
    """Applies the layer stack.

    Args:
      x: activations [B, ...].
      *per_example_args: further layer inputs with the batch as leading axis (an attention
        bias [B, 1, 1, S], a mask); they are split into microbatches with x.
      train: passed to the layer (dropout). Dropout draws from the "dropout" rng stream.

    Returns:
      The output of the last layer, shaped like x.
    """
    self._validate(x, per_example_args)
    if self.num_stages == 1 or self.is_initializing():
      return self._scan(x, per_example_args, train)
    return self._pipeline(x, per_example_args, train)

  def _validate(self, x: jax.Array, per_example_args: Sequence[jax.Array]) -> None:
    if self.num_layers < 1 or self.num_stages < 1:
      raise ConfigError(
          f"Pipeline needs num_layers >= 1 and num_stages >= 1, got {self.num_layers} and "
          f"{self.num_stages}; set both to positive counts.")
    if self.num_repeats < 1:
      raise ConfigError(f"num_repeats must be at least 1, got {self.num_repeats}; use 1 for "
                        "GPipe or R > 1 for a circular pipeline.")
    if self.num_layers % self.num_stages:
      raise ConfigError(
          f"{self.num_layers} layers do not split into {self.num_stages} pipeline stages: "
          f"make num_layers a multiple of num_stages.")
    if self.num_layers % (self.num_stages * self.num_repeats):
      raise ConfigError(
          f"{self.num_layers} layers do not split into {self.num_stages} stages x "
          f"{self.num_repeats} circular repeats: make num_layers a multiple of "
          f"{self.num_stages * self.num_repeats} or use fewer repeats.")
    if self.num_microbatches < 1:
      raise ConfigError(
          f"num_microbatches must be at least 1, got {self.num_microbatches}; set it to a "
          f"divisor of the batch size.")
    if self.num_repeats > 1 and self.num_stages > 1 and self.num_microbatches < self.num_stages:
      raise ConfigError(
          f"a circular pipeline needs at least as many microbatches as stages (a microbatch "
          f"re-enters stage 0 M steps after it left it), got {self.num_microbatches} "
          f"microbatches for {self.num_stages} stages: raise num_microbatches.")
    batch = x.shape[0]
    if batch % self.num_microbatches and not self.is_initializing():  # Init runs the scan.
      raise ConfigError(
          f"A batch of {batch} does not split into {self.num_microbatches} microbatches: "
          f"make the batch size a multiple of num_microbatches.")
    for i, arg in enumerate(per_example_args):
      if arg.shape[:1] != (batch,):
        raise ConfigError(
            f"Per-example argument {i} has shape {arg.shape} but the batch is {batch}: "
            f"give every per-example argument the batch as its leading axis.")

  def _scan(self, x: jax.Array, args: Sequence[jax.Array], train: bool) -> jax.Array:
    """The reference: `nn.scan` over the layer class; also creates the parameters."""
    body = _carry_adapter(type(self.layer), train)
    if self.remat:
      body = nn.remat(body, prevent_cse=False)
    scanned = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
    )
    layout = circular_layout(self.num_stages, self.num_repeats)
    if layout is not None:
      # The parameters live in the circular layout; the scan (which creates them) sees the
      # scan layout.
      scanned = nn.map_variables(scanned, "params", trans_in_fn=layout._leaves_to_scan,
                                 trans_out_fn=layout._leaves_from_scan,
                                 init=self.is_initializing())
    y, _ = scanned(**_layer_fields(self.layer), name="layers")(x, tuple(args))
    return y

  def _pipeline(self, x: jax.Array, args: Sequence[jax.Array], train: bool) -> jax.Array:
    """GPipe (or its circular form) over `num_stages` stages on the parameters of `_scan`."""
    stages, micro, repeats = self.num_stages, self.num_microbatches, self.num_repeats
    per_chunk = self.num_layers // (stages * repeats)
    params = nn.unbox(self.variables["params"][LAYERS_AXIS])
    if self.num_repeats == 1:
      # [L, ...] -> [P, 1, L/P, ...]: stage s gets the contiguous block of layers a
      # layers -> pipe sharding already puts on device s. With R > 1 the parameters are
      # stored in this circular layout [P, R, L/(RP), ...] already.
      params = CircularLayout(stages, 1)._leaves_from_scan(params)
    layer = self.layer.clone(parent=None, name=None)
    dropout_key = self.make_rng("dropout") if train and self.has_rng("dropout") else None

    inputs = jax.tree.map(lambda a: _to_microbatches(a, micro), (x, *args))
    replica_axes, replicas = _replica_mesh_axes()
    if inputs[0].shape[1] % replicas:
      replica_axes, replicas = (), 1  # Microbatches too small to split: plain data parallel.
    # [P, R, ...] -> [P, D, R, ...]: one copy of the stage's parameters per replica (see
    # `_replica_mesh_axes`); the transpose of this broadcast sums the gradient copies once.
    stage_axis = _stage_mesh_axis()
    params = jax.tree.map(
        lambda p: lax.with_sharding_constraint(
            jnp.broadcast_to(p[:, None], (stages, replicas, *p.shape[1:])),
            jax.P(stage_axis, replica_axes or None, *(_UNCONSTRAINED,) * (p.ndim - 1)))
        if replicas > 1 else p[:, None], params)
    # Inside a replica its rows are the whole batch axis: the layer's activation
    # constraints must not shard them on the replica axes again.
    layer_rules = _rules_without(replica_axes)

    def run_stage(stage_params, stage, held, step):
      """Applies stage `stage`'s layers to the microbatch `held` it holds at `step`."""
      # The item held here entered stage 0 at step - stage: its repeat and microbatch.
      # Out of range while filling or draining: clipped, and the output is unused.
      entry = step - stage
      repeat = jnp.clip(entry // micro, 0, repeats - 1)
      microbatch = jnp.mod(entry, micro)
      first_layer = (repeat * stages + stage) * per_chunk

      def run_replica(replica_params, replica, held):
        h, held_args = held[0], held[1:]
        chunk_params = jax.tree.map(lambda p: lax.dynamic_index_in_dim(p, repeat, 0, False),
                                    replica_params)

        def run_layer(h, layer_in):
          layer_params, index = layer_in
          rngs = None
          if dropout_key is not None:
            # One key per (layer, microbatch[, replica]): deterministic, independent of
            # the schedule.
            key = jax.random.fold_in(jax.random.fold_in(dropout_key, first_layer + index),
                                     microbatch)
            rngs = {"dropout": jax.random.fold_in(key, replica) if replicas > 1 else key}
          with nn.logical_axis_rules(layer_rules):
            h = layer.apply({"params": layer_params}, h, *held_args, train=train, rngs=rngs)
          return h, None

        h, _ = lax.scan(run_layer, h, (chunk_params, jnp.arange(per_chunk)))
        return (h, *held_args)

      # Rows [mb] -> [D, mb / D]: replica d's rows are the ones its batch shard holds.
      split = jax.tree.map(lambda a: a.reshape(replicas, -1, *a.shape[1:]), held)
      done = jax.vmap(run_replica, spmd_axis_name=replica_axes or None)(
          stage_params, jnp.arange(replicas), split)
      return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), done)

    run_stages = jax.vmap(run_stage, in_axes=(0, 0, 0, None), spmd_axis_name=stage_axis)

    first_stage = jnp.arange(stages) == 0

    def at_first_stage(new: jax.Array, held: jax.Array) -> jax.Array:
      # A per-stage select rather than held.at[0].set(new): every device keeps its own
      # stage's slice, and only stage 0's takes `new` (no gather of the stage axis).
      mask = first_stage.reshape(stages, *(1,) * (held.ndim - 1))
      return jnp.where(mask, new, held)

    def schedule_step(carry, step):
      held, received = carry
      # Stage 0 takes entry `step`: microbatch step mod M, fresh in the first repeat and,
      # in later ones, the last stage's result for it, which stage 0 received earlier.
      # Past the last entry it re-reads one, harmlessly.
      slot = jnp.mod(step, micro)
      fresh = jax.tree.map(lambda a: a[:, slot], staged_inputs)
      first = fresh[0]
      if repeats > 1:
        again = (step >= micro) & (step < repeats * micro)
        first = jnp.where(again, received[:, slot], first)
      held = _constrain_stages((at_first_stage(first, held[0]),
                                *map(at_first_stage, fresh[1:], held[1:])))
      done = _constrain_stages(run_stages(params, jnp.arange(stages), held, step))
      # Shift: stage s + 1 gets what stage s produced (and its per-example args), and
      # stage 0 what the last stage finished, entry step - (P - 1).
      held = jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), done)
      # Every stage files what it received under that entry's microbatch, in its own slice
      # of the buffer: stage 0's slice collects the last stage's results without a
      # per-step broadcast. While the pipeline fills the entry is negative; its slot
      # (mod M) is overwritten with a real result later. The buffer ends holding the last
      # repeat's results.
      finished = jnp.mod(step - (stages - 1), micro)
      received = _constrain_stages(
          lax.dynamic_update_index_in_dim(received, held[0][:, None], finished, 1))
      return (held, received), None

    if self.remat:
      schedule_step = jax.checkpoint(schedule_step, prevent_cse=False)
    # Start every stage on real data (microbatch 0), not zeros, so the idle stages of the
    # fill phase cannot produce inf/NaN that would leak into gradients as 0 * inf.
    held = _constrain_stages(jax.tree.map(
        lambda a: jnp.broadcast_to(a[:1], (stages, *a.shape[1:])), inputs))
    # The inputs, and the buffer stage 0 collects results in, per stage: every device reads
    # and writes only its own slice inside the loop. The inputs' broadcast is free (they
    # are not sharded on the stage axis), and their gradient is summed over the stages
    # once, after the loop, instead of every step.
    staged_inputs = _constrain_stages(jax.tree.map(
        lambda a: jnp.broadcast_to(a, (stages, *a.shape)), inputs))
    received = _constrain_stages(jnp.zeros_like(staged_inputs[0]))
    (_, received), _ = lax.scan(schedule_step, (held, received),
                                jnp.arange(repeats * micro + stages - 1))
    # One transfer of the whole batch's outputs from stage 0, after the schedule.
    outputs = received[0]
    return _from_microbatches(outputs)
