"""Bytes moved by collectives, read from the compiled HLO of a step.

Communication is measured from the program XLA will run, never estimated by hand: each
collective instruction of the per-device program contributes the bytes of its result
(for an all-reduce, the buffer reduced; for an all-gather, the gathered buffer; for a
reduce-scatter, this device's shard). Async pairs (`*-start`/`*-done`) count once.
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


def _shape_bytes(shape: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collective_bytes(program: Any) -> dict[str, float]:
  """Bytes per collective kind in one call of a compiled program.

  Args:
    program: a compiled jax function (`.as_text()` is read) or HLO text.

  Returns:
    `{kind: bytes}` for every kind in COLLECTIVE_KINDS (0 where absent), plus "total".
  """
  text = program if isinstance(program, str) else program.as_text()
  text = re.sub(r"/\*.*?\*/", "", text)  # Long tuples carry /*index=5*/ markers.
  totals = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
  for match in _INSTRUCTION.finditer(text):
    if match.group("suffix") == "-done":
      continue
    shape = match.group("shape")
    if match.group("suffix") == "-start" and shape.startswith("("):
      # An async start returns (operands, results[, context]); count the results only.
      arrays = _ARRAY.findall(shape)
      half = len(arrays) // 2 if len(arrays) > 1 else len(arrays)
      shape = " ".join(f"{d}[{s}]" for d, s in arrays[half:2 * half] or arrays)
    totals[match.group("op")] += _shape_bytes(shape)
  totals["total"] = float(np.sum(list(totals.values())))
  return totals
