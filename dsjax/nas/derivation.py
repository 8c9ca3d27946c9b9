"""From architecture logits to a discrete architecture, `architecture.json`, and back.

`derive` takes the most probable op and width of each block, and keeps an optional block
when its keep probability is at least 1/2. As in DARTS' derivation, a kept block never
takes the zero op while it has another candidate: the blocks form a chain, so a zero block
would cut every path from the input to the output (a constant network), however much
probability a resource penalty gave it; skipping a block is the depth gate's job. The
result is a JSON-ready dict:

  {"format": "dsjax-dnas-architecture", "version": 1, "search_space": {...},
   "input_shape": [8, 8, 1], "num_classes": 10, "depth": 3, "flops": ..., "params": ...,
   "blocks": [{"index": 0, "op": "conv", "kernel_size": 3, "channels": 32, "stride": 1,
               "kept": true}, ...],
   "probabilities": {"block_0": {"ops": {...}, "channels": {...}, "keep": 1.0}, ...}}

With `precision_choices` in the space, each block also gets its most probable numeric
`"format"` ("int8"), the probabilities a `"formats"` table, and the summary fields
`"bitops"` and `"model_bytes"` (`dsjax.nas.cost`); without, none of these appear, and
files written before formats could be searched still load.

`load_architecture` validates a file against the search space of the run that loads it
and names the offending field in a ConfigError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dsjax.errors import ConfigError
from dsjax.nas import cost as cost_lib
from dsjax.nas import ops as ops_lib
from dsjax.nas import space as space_lib
from dsjax.nas.space import BlockChoice, SearchSpace

FORMAT = "dsjax-dnas-architecture"
VERSION = 1
# Fields that shape the network outside the blocks: a file searched with other values
# describes a different network than the one the run would build.
_STRUCTURAL = ("stem_channels", "strides", "head", "depth_range", "batch_norm")


def _softmax(logits: Any) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max())
  return z / z.sum()


def probabilities(arch: Mapping[str, Any], space: SearchSpace) -> dict[str, Any]:
  """Returns {"block_i": {"ops": {name: p}, "channels": {width: p}, "keep": p}} as floats,
  and "formats": {name: p} per block when the space searches formats."""
  out = {}
  for index in range(space.num_blocks):
    block = arch[f"block_{index}"]
    ops = _softmax(block["op_logits"])
    widths = _softmax(block["channel_logits"])
    keep = float(_softmax(block["depth_logits"])[1]) if space.optional(index) else 1.0
    out[f"block_{index}"] = {
        "ops": {c: float(p) for c, p in zip(space.candidates(index), ops, strict=True)},
        "channels": {str(c): float(p) for c, p in zip(space.channels, widths, strict=True)},
        "keep": keep}
    if space.precision_choices:
      formats = _softmax(block["format_logits"])
      out[f"block_{index}"]["formats"] = {
          f: float(p) for f, p in zip(space.precision_choices, formats, strict=True)}
  return out


def flat_probabilities(arch: Mapping[str, Any], space: SearchSpace) -> dict[str, float]:
  """Returns scalar metrics "arch/block_0/op/conv_3x3", ".../channels/16", ".../keep"."""
  flat = {}
  for name, block in probabilities(arch, space).items():
    for kind, label in (("ops", "op"), ("channels", "channels"), ("formats", "format")):
      for choice, p in block.get(kind, {}).items():
        flat[f"arch/{name}/{label}/{choice}"] = p
    flat[f"arch/{name}/keep"] = block["keep"]
  return flat


def derive(arch: Mapping[str, Any], space: SearchSpace, *, input_shape: Sequence[int],
           num_classes: int) -> dict[str, Any]:
  """Returns the discrete architecture the logits favour.

  Args:
    arch: the `arch` collection of a search state.
    space: the search space it was searched in.
    input_shape: one image's (H, W, C), for the FLOPs/params fields.
    num_classes: classifier outputs, for the FLOPs/params fields.

  Returns:
    The architecture dict (see the module docstring).
  """
  probs = probabilities(arch, space)
  blocks = []
  for index in range(space.num_blocks):
    block = probs[f"block_{index}"]
    kept = block["keep"] >= 0.5
    # max() keeps the first of equal candidates, like argmax; a kept block takes zero
    # only if it is its one candidate.
    live = [c for c in block["ops"] if not kept or ops_lib.op_family(c) != "zero"]
    op = max(live or list(block["ops"]), key=block["ops"].get)
    channels = int(max(block["channels"], key=block["channels"].get))
    blocks.append({"index": index, "op": ops_lib.op_family(op),
                   "kernel_size": ops_lib.op_kernel(op), "channels": channels,
                   "stride": space.stride(index), "kept": kept})
    if "formats" in block:
      blocks[-1]["format"] = max(block["formats"], key=block["formats"].get)
  return _finish(blocks, space, input_shape, num_classes, probs)


def _finish(blocks: list[dict[str, Any]], space: SearchSpace, input_shape: Sequence[int],
            num_classes: int, probs: dict[str, Any] | None) -> dict[str, Any]:
  cost = cost_lib.exact_cost(choices_from_dict({"blocks": blocks}), space, input_shape,
                             num_classes)
  out = {"format": FORMAT, "version": VERSION, "search_space": space.to_dict(),
         "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes),
         "depth": sum(b["kept"] for b in blocks), "flops": cost["flops"],
         "params": cost["params"], "blocks": blocks}
  if "bitops" in cost:
    out["bitops"], out["model_bytes"] = cost["bitops"], cost["model_bytes"]
  if probs is not None:
    out["probabilities"] = probs
  return out



def choices_from_dict(architecture: Mapping[str, Any]) -> tuple[BlockChoice, ...]:
  """Turns an architecture dict into the supernet's `architecture` (one choice per block).

  Args:
    architecture: {"blocks": [{"op", "kernel_size", "channels", "kept"}, ...]}, already
      validated (`validate_architecture`).

  Returns:
    One BlockChoice per block position, hashable so the module stays a valid jit static.
  """
  return tuple(
      BlockChoice(ops_lib.candidate_name(b["op"], b.get("kernel_size")), int(b["channels"]),
                  bool(b.get("kept", True)), b.get("format"))
      for b in architecture["blocks"])


def validate_architecture(architecture: Any, space: SearchSpace,
                          source: str = "architecture") -> dict[str, Any]:
  """Checks an architecture dict against a search space.

  Args:
    architecture: the parsed JSON.
    space: the search space of the run that will build it.
    source: what to call it in messages (e.g. the file path).

  Returns:
    The architecture with normalised blocks and recomputed depth, FLOPs and params (for
    its own input_shape and num_classes).

  Raises:
    ConfigError: naming the first field that is missing, malformed or outside the space.
  """
  def fail(field: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {field} {problem}; re-derive it with dsjax-search, or fix "
                       "the file to match model.backbone")

  if not isinstance(architecture, Mapping) or architecture.get("format") != FORMAT:
    raise fail("format", f"must be {FORMAT!r} (is this an architecture.json?)")
  searched = architecture.get("search_space", {})
  for field in _STRUCTURAL:
    if field in searched and tuple(np.atleast_1d(searched[field])) != tuple(
        np.atleast_1d(getattr(space, field))):
      raise fail(f"search_space.{field}",
                 f"is {searched[field]} but the run's backbone has {getattr(space, field)}")
  blocks = architecture.get("blocks")
  if not isinstance(blocks, list) or len(blocks) != space.num_blocks:
    raise fail("blocks", f"must list {space.num_blocks} blocks (depth_range[1]), one per "
               f"position, got {len(blocks) if isinstance(blocks, list) else blocks!r}")
  normalised = []
  for index, block in enumerate(blocks):
    where = f"blocks[{index}]"
    if not isinstance(block, Mapping):
      raise fail(where, f"must be an object, got {block!r}")
    kept = block.get("kept", True)
    if not isinstance(kept, bool):
      raise fail(f"{where}.kept", f"must be true or false, got {kept!r}")
    if not kept and not space.optional(index):
      raise fail(f"{where}.kept", f"is false but block {index} is mandatory "
                 f"(depth_range[0]={space.depth_range[0]})")
    op, kernel = block.get("op"), block.get("kernel_size")
    allowed = space.candidates(index)
    if op not in {ops_lib.op_family(c) for c in allowed}:
      raise fail(f"{where}.op", f"is {op!r}; block {index} allows "
                 f"{sorted({ops_lib.op_family(c) for c in allowed})}")
    if not ops_lib.get_op(op).sized:
      kernel = None
    elif ops_lib.candidate_name(op, kernel) not in allowed:
      raise fail(f"{where}.kernel_size", f"is {kernel!r}; allowed {list(space.kernel_sizes)}")
    channels = block.get("channels")
    if not isinstance(channels, int) or isinstance(channels, bool) or (
        channels not in space.channels):
      raise fail(f"{where}.channels", f"is {channels!r}; allowed {list(space.channels)} "
                 f"(min_channels..max_channels in {space.channel_choices} steps)")
    normalised.append({"index": index, "op": op, "kernel_size": kernel, "channels": channels,
                       "stride": space.stride(index), "kept": kept})
    if "format" in block:
      fmt = block["format"]
      if not space.precision_choices:
        raise fail(f"{where}.format", f"is {fmt!r} but the run's backbone searches no "
                   "format; set model.backbone.precision_choices to the searched ones")
      if fmt not in space.precision_choices:
        raise fail(f"{where}.format", f"is {fmt!r}; allowed {list(space.precision_choices)} "
                   "(model.backbone.precision_choices)")
      normalised[-1]["format"] = fmt
  depth = sum(b["kept"] for b in normalised)
  if "depth" in architecture and architecture["depth"] != depth:
    raise fail("depth", f"is {architecture['depth']!r} but {depth} blocks are kept")
  input_shape = architecture.get("input_shape")
  if not (isinstance(input_shape, list) and len(input_shape) == 3):
    raise fail("input_shape", f"must be [height, width, channels], got {input_shape!r}")
  num_classes = architecture.get("num_classes")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise fail("num_classes", f"must be a positive integer, got {num_classes!r}")
  return _finish(normalised, space, input_shape, num_classes,
                 architecture.get("probabilities"))


def save_architecture(path: str, architecture: Mapping[str, Any]) -> str:
  """Writes `architecture` as JSON; a directory path gets `architecture.json` inside.

  Args:
    path: a file path, or an existing directory (e.g. the search workdir).
    architecture: from `derive`.

  Returns:
    The path written. The write is atomic (temporary file, then rename).
  """
  if os.path.isdir(path):
    path = os.path.join(path, "architecture.json")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(architecture, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
  return path


def load_architecture(path: str, space: SearchSpace) -> dict[str, Any]:
  """Reads and validates an architecture file (or a directory holding architecture.json).

  Args:
    path: the file, e.g. `W/architecture.json`.
    space: the search space of the run (config.model.backbone).

  Returns:
    The validated architecture (see `validate_architecture`).

  Raises:
    ConfigError: missing or unreadable file, invalid JSON, or out-of-space contents.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "architecture.json")
  try:
    with open(path) as f:
      architecture = json.load(f)
  except FileNotFoundError as error:
    raise ConfigError(f"architecture file {path} does not exist; pass the architecture.json "
                      "that dsjax-search wrote to its workdir") from error
  except (OSError, json.JSONDecodeError) as error:
    raise ConfigError(f"architecture file {path} is not readable JSON ({error}); "
                      "re-run dsjax-search to write it again") from error
  return validate_architecture(architecture, space, source=path)


def derived_precision_cost(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """Returns {"model_bytes", "bitops"} of the derived network a model config retrains.

  For `summary.json`: empty unless the config retrains an architecture file
  (`model.architecture`) some of whose blocks have a numeric format.

  Args:
    model_config: the `model` config section.
  """
  path = model_config.get("architecture") or ""
  if not path or "backbone" not in model_config:
    return {}
  architecture = load_architecture(path, space_lib.from_config(model_config["backbone"]))
  if not any("format" in block for block in architecture["blocks"]):
    return {}
  return {"model_bytes": architecture["model_bytes"], "bitops": architecture["bitops"]}


def format_probabilities(arch: Mapping[str, Any], space: SearchSpace, top: int = 4) -> str:
  """Returns a plain-text table of the architecture distribution, one row per block.

  Args:
    arch: the `arch` collection.
    space: the search space.
    top: how many most-probable ops to list per block.

  Returns:
    Columns: block, stride, keep probability, top ops and all widths with probabilities,
    and, when formats are searched, all formats; the derived choice is the first op and
    the starred width and format.
  """
  def starred(choices: Mapping[str, float]) -> str:
    best = max(choices, key=choices.get)
    return "  ".join(f"{c}{'*' if c == best else ''}:{p:.2f}" for c, p in choices.items())

  searched = bool(space.precision_choices)
  rows = [("block", "stride", "keep", "ops (most probable first)", "channels")
          + (("formats",) if searched else ())]
  for name, block in probabilities(arch, space).items():
    index = int(name.split("_")[1])
    ops = sorted(block["ops"].items(), key=lambda item: -item[1])[:top]
    keep = f"{block['keep']:.2f}" if space.optional(index) else "-"
    rows.append((str(index), str(space.stride(index)), keep,
                 "  ".join(f"{op} {p:.2f}" for op, p in ops), starred(block["channels"]))
                + ((starred(block["formats"]),) if searched else ()))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                   for row in rows)
