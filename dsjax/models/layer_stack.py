"""A layer stack held as separate layers in memory and as the scan's stack on disk.

A scanned stack (`nn.scan` named "layers") keeps each parameter as one [L, ...] array.
A model that runs its layers one by one (bert's `scan_layers=False`) holds `layers_0` ...
`layers_{L-1}` instead, so no layer slices its weights out of a stack and no gradient is
stacked back. Checkpoints and pretrained weights stay in the scan layout: `UnstackedLayout`
converts whole train states (parameters and the optimizer's parameter-shaped moments), as
`dsjax.parallel.pipeline.CircularLayout` does for a circular pipeline, so a run restores a
checkpoint written with either layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYERS = "layers"


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _layer_key(index: int) -> str:
  return f"{LAYERS}_{index}"


@dataclasses.dataclass(frozen=True)
class UnstackedLayout:
  """`layers_0` ... `layers_{num_layers-1}` in memory; `layers` [num_layers, ...] saved.

  The tree methods convert every mapping holding the stack, wherever it sits in the tree.
  """

  num_layers: int

  def _stacked(self, x: Any) -> bool:
    return isinstance(x, Mapping) and LAYERS in x

  def _unstacked(self, x: Any) -> bool:
    return isinstance(x, Mapping) and _layer_key(0) in x

  def from_scan(self, tree: Any) -> Any:
    """Scan -> separate layers."""
    def convert(node: Any) -> Any:
      if not self._stacked(node):
        return node
      out = {key: value for key, value in node.items() if key != LAYERS}
      for index in range(self.num_layers):
        out[_layer_key(index)] = jax.tree.map(lambda x, i=index: _take(x, i), node[LAYERS],
                                              is_leaf=_is_box)
      return out
    return jax.tree.map(convert, tree, is_leaf=self._stacked)

  def to_scan(self, tree: Any) -> Any:
    """Separate layers -> scan."""
    return self._fold(tree, lambda *xs: _stack(xs), _is_box)

  def scan_abstract(self, tree: Any) -> Any:
    """The scan-layout `jax.ShapeDtypeStruct`s (with shardings) of an abstract state: the
    layer axis leads, unsharded (a pipeline, which shards it, keeps the scan layout)."""
    def leaf(*xs: Any) -> jax.ShapeDtypeStruct:
      x = xs[0]
      sharding = getattr(x, "sharding", None)
      if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
      return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
    return self._fold(tree, leaf, None)

  def _fold(self, tree: Any, combine: Any, is_leaf: Any) -> Any:
    """Every mapping holding `layers_0` ...: those entries replaced by `layers`, whose
    leaves are `combine(leaf of layers_0, leaf of layers_1, ...)`."""
    names = [_layer_key(index) for index in range(self.num_layers)]

    def convert(node: Any) -> Any:
      if not self._unstacked(node):
        return node
      out = {key: value for key, value in node.items() if key not in names}
      out[LAYERS] = jax.tree.map(combine, *[node[name] for name in names], is_leaf=is_leaf)
      return out
    return jax.tree.map(convert, tree, is_leaf=self._unstacked)


def _take(x: Any, index: int) -> Any:
  if _is_box(x):
    return x.replace(value=x.value[index], names=x.names[1:])
  return x[index]


def _stack(xs: tuple[Any, ...]) -> Any:
  if _is_box(xs[0]):
    return xs[0].replace(value=jnp.stack([x.value for x in xs]),
                         names=(LAYERS, *xs[0].names))
  return jnp.stack(xs)


def precision_state_for(state: Mapping[str, Any], num_layers: int,
                        stacked: bool) -> dict[str, Any]:
  """The adaptive controller's checkpointed state (`state_dict()`) with its layer paths in
  this run's layout: `.../layers/...` (one entry for every scanned layer) for a stacked
  encoder, `.../layers_{i}/...` for separate layers. Separate layers folding into one
  entry keep the widest choice ("fp32" if any layer had it) and the smallest counts, so
  no promotion is lost; a stacked entry spreads to every layer."""
  def paths(path: str) -> list[str]:
    parts = path.split("/")
    if stacked:
      return ["/".join(LAYERS if p.startswith(f"{LAYERS}_") and p[len(LAYERS) + 1:].isdigit()
                       else p for p in parts)]
    if LAYERS not in parts:
      return [path]
    at = parts.index(LAYERS)
    return ["/".join([*parts[:at], _layer_key(i), *parts[at + 1:]]) for i in range(num_layers)]

  def merge(mapping: Mapping[str, Any], pick: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in mapping.items():
      for new in paths(path):
        out[new] = value if new not in out else pick(out[new], value)
    return out

  wider = lambda a, b: "fp32" if "fp32" in (a, b) else a  # noqa: E731
  plan = dict(state.get("plan", {}))
  if "layers" in plan:
    plan["layers"] = merge(plan["layers"], wider)
  return {**state, "plan": plan, "stable": merge(state.get("stable", {}), min),
          "promotions": merge(state.get("promotions", {}), max)}
