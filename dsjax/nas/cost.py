"""Cost model: expected FLOPs/params of the relaxed supernet, exact ones of a derived net.

One set of per-op formulas (each op's own, declared with it in `dsjax.nas.ops`) serves
both, so the expectation the search optimises and the number `derive` reports agree.
FLOPs are 2 x multiply-accumulates of convolutions and dense layers (bias adds, ReLUs and
pooling are not counted); params count every scalar, biases included, so
`exact_cost(...)["params"]` equals the derived model's parameter tree.
With batch_norm the convolutions have no bias (BatchNorm's scale and bias take its place);
the counts are the derived network's, whose BatchNorms learn a scale and bias, even though
the supernet's are affine-free during the search.

Expectation. Ops, widths and keep gates are independent categoricals with the softmax
probabilities of their logits. Every op's cost is bilinear in (input width, output
width), and a block's input width depends only on earlier choices, so

  E[cost of block i] = P(keep_i) * sum_op P(op) * cost(op, E[c_in,i], E[c_out,i])

exactly, with E[c_in,i+1] = P(keep_i) E[c_out,i] + (1 - P(keep_i)) E[c_in,i].

Formats (a space with `precision_choices`). Each block's one format choice sets the bits
of its weights and of its input activations, independent of its op and width, so
"bitops" and "model_bytes" join the costs, exact in expectation the same way:

  bit-ops of a layer = MACs x weight bits x activation bits (`dsjax.precision.bit_ops`;
    MACs = FLOPs / 2), so E[block i] = P(keep_i) sum_op P(op) MACs(op) x E_f[bits_f^2];
  model bytes = weights x bits / 8 + 32-bit values x 4, the 32-bit ones being the op's
    biases and BatchNorm scale and bias (`OpSpec.biases`), so E[block i] = P(keep_i)
    sum_op P(op) ((params - biases) E_f[bits_f] / 8 + 4 biases).

The stem and the head compute at the run's precision and are counted at 32 bits (1024
bit-ops per MAC, 4 bytes per parameter), as is a derived block without a format. Without
`precision_choices` the costs are only "flops" and "params", as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.errors import ConfigError
from dsjax.nas import ops as ops_lib
from dsjax.nas import relaxation as relax_lib
from dsjax.nas import space as space_lib
from dsjax.nas.space import SearchSpace
from dsjax.precision import quantize

Cost = dict[str, Any]
FULL_BITS = 32  # The stem, the head, biases and format-free blocks.


def op_cost(candidate: str, c_in: Any, c_out: Any, out_hw: int,
            batch_norm: bool = False) -> tuple[Any, Any]:
  """Returns (flops, params) of one op; works on Python numbers and traced arrays alike.

  The formulas are the op's own (`dsjax.nas.ops.OpSpec.flops` and `.params`).

  Args:
    candidate: candidate name, e.g. "sep_conv_3x3".
    c_in: input channels (or their expectation).
    c_out: output channels (or their expectation).
    out_hw: output height x width.
    batch_norm: the op ends in a BatchNorm (scale and bias per output channel; its
      FLOPs are not counted, as bias adds are not) and its convolution has no bias.

  Returns:
    FLOPs (2 x MACs) and parameter count.

  Raises:
    ConfigError: the candidate's op is not registered.
  """
  spec, kernel = ops_lib.get_op(ops_lib.op_family(candidate)), ops_lib.op_kernel(candidate)
  return spec.flops(kernel, c_in, c_out, out_hw), spec.params(kernel, c_in, c_out, batch_norm)


def _stem_and_head(space: SearchSpace, input_shape: Sequence[int], num_classes: int,
                   c_final: Any) -> tuple[Any, Any, int]:
  """Returns (flops, params) of stem plus head, and the block-0 input width."""
  height, width, channels = input_shape
  flops = params = 0
  c_in = channels
  if space.stem_channels:
    flops = 2 * height * width * 9 * channels * space.stem_channels
    # Kernel, then a bias or (batch_norm) BatchNorm's scale and bias.
    params = (9 * channels + 1 + space.batch_norm) * space.stem_channels
    c_in = space.stem_channels
  if space.head == "none":
    return flops, params, c_in
  out_h, out_w = space_lib.spatial_sizes(space, input_shape)[-1]
  features = c_final * (1 if space.head == "pool" else out_h * out_w)
  return flops + 2 * features * num_classes, params + (features + 1) * num_classes, c_in


def expected_cost(arch: Mapping[str, Any], space: SearchSpace, input_shape: Sequence[int],
                  num_classes: int) -> Cost:
  """Returns the expected {"flops", "params"} of the relaxed network, differentiable in arch.

  Args:
    arch: the `arch` collection: {"block_i": {"op_logits", "channel_logits",
      ["depth_logits"], ["format_logits"]}}.
    space: the search space.
    input_shape: one image's (H, W, C).
    num_classes: classifier outputs.

  Returns:
    float32 scalars under the softmax distributions of the logits (whatever relaxation
    the search uses: Gumbel sampling draws from the same distribution); with
    `space.precision_choices` also "bitops" and "model_bytes" (see the module docstring).
  """
  sizes = space_lib.spatial_sizes(space, input_shape)
  widths = jnp.asarray(space.channels, jnp.float32)
  formats = space.precision_choices
  _, _, c_in = _stem_and_head(space, input_shape, num_classes, 0)
  c_in = jnp.asarray(c_in, jnp.float32)
  flops = params = bitops = nbytes = jnp.zeros((), jnp.float32)
  for index, (height, width) in enumerate(sizes):
    block = arch[f"block_{index}"]
    p_op = relax_lib.probabilities(block["op_logits"])
    c_out = relax_lib.probabilities(block["channel_logits"]) @ widths
    keep = relax_lib.probabilities(block["depth_logits"])[1] if space.optional(index) else 1.0
    block_flops = block_params = block_biases = jnp.zeros((), jnp.float32)
    for i, candidate in enumerate(space.candidates(index)):
      f, p = op_cost(candidate, c_in, c_out, height * width, space.batch_norm)
      block_flops, block_params = block_flops + p_op[i] * f, block_params + p_op[i] * p
      block_biases = block_biases + p_op[i] * _biases(candidate, c_in, c_out, space.batch_norm)
    flops, params = flops + keep * block_flops, params + keep * block_params
    if formats:
      p_format = relax_lib.probabilities(block["format_logits"])
      bitops = bitops + keep * quantize.expected_bit_ops(block_flops / 2, p_format, formats)
      weight_bytes = quantize.model_bytes(block_params - block_biases,
                                          quantize.expected_bits(p_format, formats))
      nbytes = nbytes + keep * (weight_bytes + quantize.model_bytes(block_biases, FULL_BITS))
    c_in = keep * c_out + (1.0 - keep) * c_in
  f, p, _ = _stem_and_head(space, input_shape, num_classes, c_in)
  cost = {"flops": flops + f, "params": params + p}
  if formats:
    cost["bitops"] = bitops + quantize.bit_ops(f / 2, FULL_BITS, FULL_BITS)
    cost["model_bytes"] = nbytes + quantize.model_bytes(p, FULL_BITS)
  return cost


def _biases(candidate: str, c_in: Any, c_out: Any, batch_norm: bool) -> Any:
  # The op's parameters stored in 32 bits whatever its format (`OpSpec.biases`).
  spec, kernel = ops_lib.get_op(ops_lib.op_family(candidate)), ops_lib.op_kernel(candidate)
  return spec.biases(kernel, c_in, c_out, batch_norm)


def exact_cost(choices: Sequence[Any], space: SearchSpace, input_shape: Sequence[int],
               num_classes: int) -> dict[str, int]:
  """Returns the exact {"flops", "params"} of a derived network.

  Args:
    choices: one `BlockChoice` (op, channels, kept, format) per block position.
    space: the search space.
    input_shape: one image's (H, W, C).
    num_classes: classifier outputs.

  Returns:
    Python ints; with formats (`space.precision_choices`, or any choice with a format)
    also "bitops" and "model_bytes" (a float: 4-bit weights are half bytes), blocks
    without a format counted at 32 bits.
  """
  sizes = space_lib.spatial_sizes(space, input_shape)
  _, _, c_in = _stem_and_head(space, input_shape, num_classes, 0)
  flops = params = bitops = nbytes = 0
  for choice, (height, width) in zip(choices, sizes, strict=True):
    if choice.kept:
      f, p = op_cost(choice.op, c_in, choice.channels, height * width, space.batch_norm)
      biases = _biases(choice.op, c_in, choice.channels, space.batch_norm)
      bits = FULL_BITS if choice.format is None else quantize.get_format(choice.format).bits
      bitops += quantize.bit_ops(f // 2, bits, bits)
      nbytes += quantize.model_bytes(p - biases, bits) + quantize.model_bytes(biases, FULL_BITS)
      flops, params, c_in = flops + f, params + p, choice.channels
  f, p, _ = _stem_and_head(space, input_shape, num_classes, c_in)
  cost = {"flops": int(flops + f), "params": int(params + p)}
  if space.precision_choices or any(choice.format for choice in choices):
    cost["bitops"] = int(bitops + quantize.bit_ops(f // 2, FULL_BITS, FULL_BITS))
    cost["model_bytes"] = float(nbytes + quantize.model_bytes(p, FULL_BITS))
  return cost


def resource_penalty(expected: jax.Array, target: float, weight: float) -> jax.Array:
  """Returns weight * max(0, log(expected / target)); 0 when target <= 0 (no budget).

  A hinge in log space: nothing under the budget, so accuracy alone decides among
  architectures that fit, and above it a pull that is relative (scale-free), so one
  weight works for FLOPs and for params, whatever their magnitude, and whether the
  network is 2x or 20x over budget the gradient wrt log-cost is the same `weight`.

  Args:
    expected: the differentiable expected cost.
    target: the budget, same unit.
    weight: the penalty weight.
  """
  if target <= 0 or weight == 0:
    return jnp.zeros((), jnp.float32)
  return weight * jnp.maximum(0.0, jnp.log(expected / target))


def param_free_probability(arch: Mapping[str, Any], space: SearchSpace) -> jax.Array:
  """Returns the summed probability of parameter-free ops (identity, zero) over blocks.

  A collapse guard: DARTS-style searches drift towards these ops because they make the
  supernet's loss landscape easy, not because they make the derived net good.
  """
  total = jnp.zeros((), jnp.float32)
  for index in range(space.num_blocks):
    probs = relax_lib.probabilities(arch[f"block_{index}"]["op_logits"])
    for i, candidate in enumerate(space.candidates(index)):
      if ops_lib.get_op(ops_lib.op_family(candidate)).param_free:
        total = total + probs[i]
  return total


def make_arch_penalty(space: SearchSpace, input_shape: Sequence[int], num_classes: int, *,
                      target_flops: float = 0.0, target_params: float = 0.0,
                      resource_weight: float = 0.0, param_free_weight: float = 0.0,
                      latency_table: Mapping[str, float] | None = None,
                      target_latency: float = 0.0, target_bitops: float = 0.0,
                      target_model_bytes: float = 0.0
                      ) -> Callable[[Any], tuple[jax.Array, dict[str, jax.Array]]]:
  """Builds `penalty(arch) -> (scalar, metrics)` for the architecture objective.

  Args:
    space: the search space.
    input_shape: one image's (H, W, C).
    num_classes: classifier outputs.
    target_flops: FLOPs budget; 0 = none.
    target_params: parameter budget; 0 = none.
    resource_weight: weight of each `resource_penalty` term.
    param_free_weight: weight of the `param_free_probability` collapse guard.
    latency_table: from `measure_latency_table`; enables the latency term.
    target_latency: latency budget in seconds; 0 = none.
    target_bitops: bit-ops budget (MACs x weight bits x activation bits); 0 = none.
    target_model_bytes: model-size budget in bytes; 0 = none.

  Returns:
    The penalty function; metrics hold expected_flops, expected_params (expected_bitops
    and expected_model_bytes when formats are searched, and expected_latency) for logging.

  Raises:
    ConfigError: a bit-ops or bytes budget for a space that searches no format (it could
      only act as a FLOPs or params budget; set one of those instead).
  """
  if (target_bitops > 0 or target_model_bytes > 0) and not space.precision_choices:
    raise ConfigError("resource.target_bitops and target_model_bytes budget a format "
                      "search: set model.backbone.precision_choices, or budget "
                      "target_flops/target_params instead")

  def penalty(arch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    cost = expected_cost(arch, space, input_shape, num_classes)
    total = (resource_penalty(cost["flops"], target_flops, resource_weight)
             + resource_penalty(cost["params"], target_params, resource_weight)
             + param_free_weight * param_free_probability(arch, space))
    metrics = {"expected_flops": cost["flops"], "expected_params": cost["params"]}
    if space.precision_choices:
      total = (total + resource_penalty(cost["bitops"], target_bitops, resource_weight)
               + resource_penalty(cost["model_bytes"], target_model_bytes, resource_weight))
      metrics["expected_bitops"] = cost["bitops"]
      metrics["expected_model_bytes"] = cost["model_bytes"]
    if latency_table is not None:
      latency = expected_latency(arch, space, latency_table)
      total = total + resource_penalty(latency, target_latency, resource_weight)
      metrics["expected_latency"] = latency
    return total, metrics

  return penalty


def measure_latency_table(space: SearchSpace, input_shape: Sequence[int], batch_size: int = 1,
                          repeats: int = 5) -> dict[str, float]:
  """Times every (block, candidate) at full width on the current default device.

  Each op is jitted alone and timed `repeats` times after a warm-up call; the median is
  kept. Widths are not timed separately: `expected_latency` scales by the expected output
  width, a first-order model that is fine for ranking but not for absolute numbers.

  Args:
    space: the search space.
    input_shape: one image's (H, W, C).
    batch_size: images per timed call.
    repeats: timed calls per op.

  Returns:
    {"block_i/candidate": seconds}, JSON-serialisable.
  """
  table, cache = {}, {}
  height, width, channels = input_shape
  c_in = space.stem_channels or channels
  for index in range(space.num_blocks):
    shape = (batch_size, height, width, c_in)
    for candidate in space.candidates(index):
      key = (candidate, shape, space.stride(index))
      if key not in cache:
        op = ops_lib.Op(candidate, space.max_channels, space.stride(index), space.activation,
                batch_norm=space.batch_norm)
        x = jnp.ones(shape, jnp.float32)
        variables = op.init(jax.random.PRNGKey(0), x)
        fn = jax.jit(op.apply)
        jax.block_until_ready(fn(variables, x))
        times = []
        for _ in range(repeats):
          start = time.perf_counter()
          jax.block_until_ready(fn(variables, x))
          times.append(time.perf_counter() - start)
        cache[key] = float(np.median(times))
      table[f"block_{index}/{candidate}"] = cache[key]
    height, width = space_lib.spatial_sizes(space, input_shape)[index]
    c_in = space.max_channels
  return table


def expected_latency(arch: Mapping[str, Any], space: SearchSpace,
                     table: Mapping[str, float]) -> jax.Array:
  """Returns sum_i P(keep_i) sum_op P(op) * latency(op) * E[c_out,i] / max_channels."""
  total = jnp.zeros((), jnp.float32)
  widths = jnp.asarray(space.channels, jnp.float32) / space.max_channels
  for index in range(space.num_blocks):
    block = arch[f"block_{index}"]
    p_op = relax_lib.probabilities(block["op_logits"])
    scale = relax_lib.probabilities(block["channel_logits"]) @ widths
    keep = relax_lib.probabilities(block["depth_logits"])[1] if space.optional(index) else 1.0
    times = jnp.asarray([table[f"block_{index}/{c}"] for c in space.candidates(index)])
    total = total + keep * scale * (p_op @ times)
  return total
