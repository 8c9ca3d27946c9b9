"""Bytes moved by collectives, read from the compiled HLO of a step.

Communication is measured from the program XLA will run, never estimated by hand: each
collective instruction of the per-device program contributes its operand bytes times the
devices taking part (see `collective_bytes`), once per execution: an instruction inside a
while loop (a layer scan, a pipeline schedule, gradient accumulation) counts once per
iteration, from the trip count XLA records. Async pairs (`*-start`/`*-done`) count once.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                    "all-to-all")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
                "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = <shape> <op>(`: the shape is a single array or a tuple of arrays.
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVE_KINDS) + r")(?P<suffix>-start|-done)?\(")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
# A computation's header: `%name (params) -> result {` or `ENTRY %name ...{`.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?body=%?(?P<body>[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(shape: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _participants(attributes: str) -> int:
  """Devices taking part in one collective: a replica group's size, or permute pairs."""
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
  if pairs:
    return pairs.group(1).count("{")
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if named:  # Shardy: mesh['data'=4,'model'=2] {'data'}: the product of the named axes.
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", named.group(1))}
    return math.prod(sizes.get(name, 1) for name in re.findall(r"'([^']+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
  if groups:
    return len([d for d in groups.group(1).split(",") if d])
  return 1


def _executions(text: str) -> list[tuple[int, int, int]]:
  """`(start, end, executions per program run)` of each computation's text span.

  The entry and every computation outside loops run once; a while body runs its recorded
  trip count times per execution of the computation holding the loop (nested loops
  multiply). A loop without a recorded trip count is counted once.
  """
  spans, parents = [], {}  # (start, end, name); body -> (parent, trips)
  name, start, offset = None, 0, 0
  for line in text.splitlines(keepends=True):
    header = _COMPUTATION.match(line)
    if header and not line.startswith((" ", "\t")):
      name, start = header.group("name"), offset
    elif name is not None and line.startswith("}"):
      spans.append((start, offset + len(line), name))
      name = None
    elif name is not None and (loop := _WHILE.search(line)):
      trips = _TRIP_COUNT.search(line)
      parents[loop.group("body")] = (name, int(trips.group(1)) if trips else 1)
    offset += len(line)

  def count(name: str, depth: int = 0) -> int:
    if name not in parents or depth > 64:
      return 1
    parent, trips = parents[name]
    return trips * count(parent, depth + 1)

  return [(begin, end, count(name)) for begin, end, name in spans]


def collective_bytes(program: Any) -> dict[str, float]:
  """Bytes each collective kind moves in one call of a compiled program.

  The measure is the issue's "operand sizes x participants": every device taking part
  contributes its operand, so a data-parallel all-reduce of n gradient bytes over 8
  devices moves 8n, and an all-gather of k bytes per device moves 8k. Operand sizes are
  derived from the result shapes (an all-gather's operand is its result / participants, a
  reduce-scatter's its result x participants).

  Args:
    program: a compiled jax function (`.as_text()` is read) or HLO text.

  Returns:
    `{kind: bytes}` for every kind in COLLECTIVE_KINDS (0 where absent), plus "total".
  """
  text = program if isinstance(program, str) else program.as_text()
  text = re.sub(r"/\*.*?\*/", "", text)  # Long tuples carry /*index=5*/ markers.
  spans = _executions(text)
  totals = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
  for match in _INSTRUCTION.finditer(text):
    if match.group("suffix") == "-done":
      continue
    op, shape = match.group("op"), match.group("shape")
    attributes = text[match.end():text.find("\n", match.end())]
    if match.group("suffix") == "-start" and shape.startswith("(") and op != "all-reduce":
      # An async start returns (operands, results[, context scalars]): keep the results.
      arrays = [(d, dims) for d, dims in _ARRAY.findall(shape) if dims or d not in ("u32", "s32")]
      half = len(arrays) // 2 if len(arrays) > 1 else len(arrays)
      shape = " ".join(f"{d}[{dims}]" for d, dims in arrays[half:2 * half] or arrays)
    result = _shape_bytes(shape)
    participants = _participants(attributes)
    operand = {"all-gather": result / participants,
               "reduce-scatter": result * participants}.get(op, result)
    runs = next((n for begin, end, n in spans if begin <= match.start() < end), 1)
    totals[op] += operand * participants * runs
  totals["total"] = float(np.sum(list(totals.values())))
  return totals
