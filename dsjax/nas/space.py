"""The DNAS search space: which blocks exist, which ops and widths each may choose.

A search space is a chain of `depth_range[1]` blocks after an optional 3x3 stem and
before a classifier head. Block `i` picks one candidate op (a k x k convolution or a
depthwise-separable k x k convolution for each kernel size, identity, zero), an output
width among `channel_choices` values from `min_channels` to `max_channels`, and, when
`i >= depth_range[0]`, whether it exists at all. Strides are fixed per block by the
config; only mandatory blocks may stride, so skipping a block never changes resolution.

Candidate names are "conv_3x3", "sep_conv_5x5", "identity", "zero": the op families are
declared in `dsjax.nas.ops`, each with its module, cost formulas and derived form. Identity
is offered only in stride-1 blocks; where its input and output widths differ it zero-pads
or drops trailing channels, which is exactly what the supernet's channel masks compute.

With `precision_choices` (names in `dsjax.precision.FORMATS`) each block also chooses the
numeric format its convolutions compute in, weights and input activations alike; empty
(the default) searches no format, and the space, its `arch` collection and its costs are
exactly those of a format-free search.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dsjax.errors import ConfigError
from dsjax.nas import ops as ops_lib
from dsjax.precision import quantize

OPS = ops_lib.known_ops()  # The built-in ops (conv, sep_conv, identity, zero): the default.
HEADS = ("pool", "flatten", "none")
ACTIVATIONS = ("relu", "silu", "gelu")
FORMAT_MIXINGS = ("outputs", "operands")


@dataclasses.dataclass(frozen=True)
class BlockChoice:
  """The derived choice for one block position.

  Attributes:
    op: candidate name, e.g. "conv_3x3", "sep_conv_5x5", "identity", "zero".
    channels: output width.
    kept: False for a skipped optional block (then op and channels are ignored).
    format: the numeric format of the block's convolutions (a name in
      `dsjax.precision.FORMATS`); None: the run's precision, as without a format search.
  """

  op: str
  channels: int
  kept: bool = True
  format: str | None = None


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """An immutable, hashable search space (usable as a Flax module attribute).

  Attributes:
    min_channels: the narrowest block width.
    max_channels: the widest block width; the supernet computes at this width.
    channel_choices: how many widths, evenly spaced from min to max (rounded).
    depth_range: (min, max) number of blocks; blocks min..max-1 can be skipped.
    kernel_sizes: odd kernel sizes offered to the conv and sep_conv ops.
    ops: op families offered, registered in `dsjax.nas.ops` (the built-ins: `OPS`).
    stem_channels: width of the 3x3 stem convolution; 0 feeds images to block 0.
    strides: strides of the first len(strides) blocks; the rest stride 1.
    head: "pool" (global average pool, then dense), "flatten" (flatten, then dense) or
      "none" (the last block's feature map is the output: dense prediction, tests).
    activation: nonlinearity after every convolution op and the stem; "silu" and "gelu"
      are smooth, which second-order gradients (and their finite-difference checks) need
      to be well defined.
    batch_norm: BatchNorm between every convolution op (and the stem) and its
      activation, as DARTS' ops have (those convolutions then have no bias); its
      statistics live in "batch_stats". As in DARTS, the supernet's BatchNorms are
      affine-free during the search (no scale or bias) and the derived network's learn a
      per-channel scale and bias.
    precision_choices: numeric formats each block may compute in (`dsjax.precision.FORMATS`
      names, e.g. ("float32", "bfloat16", "int8", "int4")); empty: no format search. The
      stem and the classifier head always compute at the run's precision.
    format_mixing: how the search relaxes a block's format choice. "outputs" (Wu et al.
      2018): sum_f w_f op_f(x), each op computed under every format, the exact
      expectation the costs count; "operands" (EdMIPS): op(sum_f w_f Q_f(x), sum_f w_f
      Q_f(W)), one computation per op whatever the number of formats.
  """

  min_channels: int = 16
  max_channels: int = 64
  channel_choices: int = 4
  depth_range: tuple[int, int] = (2, 4)
  kernel_sizes: tuple[int, ...] = (3, 5)
  ops: tuple[str, ...] = OPS
  stem_channels: int = 16
  strides: tuple[int, ...] = ()
  head: str = "pool"
  activation: str = "relu"
  batch_norm: bool = False
  precision_choices: tuple[str, ...] = ()
  format_mixing: str = "outputs"

  def __post_init__(self) -> None:
    for name in ("depth_range", "kernel_sizes", "ops", "strides", "precision_choices"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    problems = self.problems()
    if problems:
      raise ConfigError("invalid DNAS search space: " + "; ".join(problems))

  def problems(self) -> list[str]:
    """Returns every impossible value, each as 'field: problem (fix)'."""
    out = []
    if not 1 <= self.min_channels <= self.max_channels:
      out.append(f"min_channels={self.min_channels}, max_channels={self.max_channels}: need "
                 "1 <= min_channels <= max_channels")
    if self.channel_choices < 1:
      out.append(f"channel_choices must be >= 1, got {self.channel_choices}")
    if len(self.depth_range) != 2 or not 1 <= self.depth_range[0] <= self.depth_range[1]:
      out.append(f"depth_range must be (min, max) with 1 <= min <= max, got {self.depth_range}")
    known = ops_lib.known_ops()
    unknown = [op for op in self.ops if op not in known]
    if unknown or not self.ops:
      out.append(f"ops must be a non-empty subset of {known}, got {self.ops}")
    if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
      out.append(f"kernel_sizes must be odd positive integers, got {self.kernel_sizes}")
    if self.stem_channels < 0:
      out.append(f"stem_channels must be >= 0 (0: no stem), got {self.stem_channels}")
    if any(s < 1 for s in self.strides):
      out.append(f"strides must be >= 1, got {self.strides}")
    if len(self.depth_range) == 2 and len(self.strides) > self.depth_range[1]:
      out.append(f"strides has {len(self.strides)} entries but there are only "
                 f"{self.depth_range[1]} blocks (depth_range[1])")
    if len(self.depth_range) == 2 and any(
        s > 1 for s in self.strides[self.depth_range[0]:]):
      out.append(f"strides {self.strides} put a stride > 1 on an optional block (index >= "
                 f"depth_range[0]={self.depth_range[0]}); move it to a mandatory block")
    if self.head not in HEADS:
      out.append(f"head must be one of {HEADS}, got {self.head!r}")
    if self.activation not in ACTIVATIONS:
      out.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    unknown_formats = [f for f in self.precision_choices if f not in quantize.FORMATS]
    if unknown_formats:
      out.append(f"precision_choices {self.precision_choices} has unknown format(s) "
                 f"{unknown_formats}; use names from {', '.join(quantize.FORMATS)}")
    elif len(set(self.precision_choices)) != len(self.precision_choices):
      out.append(f"precision_choices {self.precision_choices} repeats a format; list each once")
    if self.format_mixing not in FORMAT_MIXINGS:
      out.append(f"format_mixing must be one of {FORMAT_MIXINGS}, got {self.format_mixing!r}")
    if self.precision_choices and not unknown:
      unformatted = [op for op in self.ops if not ops_lib.get_op(op).param_free
                     and not ops_lib.get_op(op).formats]
      if unformatted:
        out.append(f"ops {unformatted} cannot compute in a searched numeric format (their "
                   "OpSpec has formats=False); drop them or set precision_choices=()")
    if not out and any(not self.candidates(i) for i in range(self.num_blocks)):
      strided = [op for op in known if ops_lib.get_op(op).strided]
      out.append(f"ops {self.ops} leave a strided block with no candidate; add one of "
                 f"{', '.join(strided)}")
    return out

  @property
  def num_blocks(self) -> int:
    """The number of searchable blocks, `depth_range[1]`."""
    return self.depth_range[1]

  @property
  def channels(self) -> tuple[int, ...]:
    """The width options, ascending and distinct."""
    values = np.linspace(self.min_channels, self.max_channels, self.channel_choices)
    return tuple(sorted({int(round(v)) for v in values}))

  def stride(self, index: int) -> int:
    """Returns the stride of block `index`."""
    return self.strides[index] if index < len(self.strides) else 1

  def optional(self, index: int) -> bool:
    """Returns whether block `index` can be skipped (index >= depth_range[0])."""
    return index >= self.depth_range[0]

  def candidates(self, index: int) -> tuple[str, ...]:
    """Returns the candidate op names of block `index`, in arch-logit order."""
    return tuple(candidate for family in self.ops for candidate in
                 ops_lib.get_op(family).candidates(self.kernel_sizes, self.stride(index)))

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable form (tuples as lists).

    An empty `precision_choices` is left out, so a format-free space writes the same
    `architecture.json` as before formats could be searched.
    """
    return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)
            if f.name != "precision_choices" or self.precision_choices}


def spatial_sizes(space: SearchSpace, input_shape: tuple[int, ...]) -> list[tuple[int, int]]:
  """Returns the (height, width) of each block's output for images of `input_shape` (H, W, C).

  Args:
    space: the search space.
    input_shape: one image's shape, without the batch dimension.

  Returns:
    One (height, width) per block; SAME padding, so a stride s gives ceil(size / s).
  """
  height, width = input_shape[0], input_shape[1]
  sizes = []
  for index in range(space.num_blocks):
    stride = space.stride(index)
    height, width = math.ceil(height / stride), math.ceil(width / stride)
    sizes.append((height, width))
  return sizes


def from_config(config: Mapping[str, Any] | SearchSpace) -> SearchSpace:
  """Builds a search space from a config section (dict or ConfigDict).

  Args:
    config: the `model.backbone` section; keys are `SearchSpace` fields, plus an optional
      `type` ("DNAS"), which is ignored. A SearchSpace is returned unchanged.

  Returns:
    The validated search space.

  Raises:
    ConfigError: an unknown key, or impossible values (every problem in one message).
  """
  if isinstance(config, SearchSpace):
    return config
  values = dict(config.items())
  if str(values.pop("type", "DNAS")).upper() != "DNAS":
    raise ConfigError(f"model.backbone.type must be 'DNAS' for a supernet, got {config['type']!r}")
  known = {f.name for f in dataclasses.fields(SearchSpace)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"unknown DNAS search-space key(s) {unknown}; known: {sorted(known)}")
  return SearchSpace(**values)
