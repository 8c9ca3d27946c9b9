"""Peephole clean-up of jax2onnx graphs, for onnxruntime's optimiser and quantizer.

jax2onnx lowers each JAX primitive on its own, so the graph spells out what JAX traced:
`relu` is `Max(x, 0)`, a dense layer is `Gemm(x, W, 0, beta=0)` then `Add(bias)`, an
average pool is a 6-D all-ones `Conv` between `Unsqueeze`s and a `Div`, and kernels are
stored HWIO behind a `Transpose`. onnxruntime runs that as it is, but its int8
quantizer knows only the usual forms (it fails on the Gemm's scalar bias, and leaves
the rest in float). `simplify` gives the usual forms and changes no value:

* `Transpose` of a constant -> the transposed constant;
* `Max(x, 0.0)` with a floating scalar zero -> `Relu(x)`;
* `Sub(x, c)` with a floating constant -> `Add(x, -c)` (BatchNorm's `x - mean`), which
  onnxruntime folds into the convolution before it, as it does the scale's `Mul`;
* `Gemm(..., C, beta=0)` -> `Gemm` without C, and `Gemm` whose only consumer is `Add(b)`
  with a constant bias of shape [N] or [1, N] -> `Gemm(..., b, beta=1)`;
* the average pool of NHWC `x` -> `Transpose`, `AveragePool`, `Transpose` (the
  transposes cancel against the convolutions' own in onnxruntime).

`compact` then drops what only takes room (shape annotations, node names, long tensor
names, default attributes, duplicate constants), for the file sizes that matter on an
edge device; `drop_zero_points` also drops the quantizer's all-zero weight zero points.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np


def _attribute(node: Any, name: str, default: Any) -> Any:
  import onnx  # noqa: PLC0415 - the `export` extra.

  for attribute in node.attribute:
    if attribute.name == name:
      return onnx.helper.get_attribute_value(attribute)
  return default


def _set_attribute(node: Any, name: str, value: Any) -> None:
  import onnx  # noqa: PLC0415

  for index, attribute in enumerate(node.attribute):
    if attribute.name == name:
      del node.attribute[index]
      break
  node.attribute.append(onnx.helper.make_attribute(name, value))


class _Rewriter:
  """The graph's constants, producers and consumers, and the edits made so far."""

  def __init__(self, graph: Any):
    from onnx import numpy_helper  # noqa: PLC0415

    self.graph = graph
    self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
      value = _attribute(node, "value", None) if node.op_type == "Constant" else None
      if value is not None:
        self.constants[node.output[0]] = numpy_helper.to_array(value)
    self.outputs = {output.name for output in graph.output}
    self.nodes = list(graph.node)
    self.producer = {name: node for node in self.nodes for name in node.output}
    self.consumers: dict[str, list[Any]] = {}
    for node in self.nodes:
      for name in node.input:
        self.consumers.setdefault(name, []).append(node)
    self.removed: set[int] = set()
    self.inserted: dict[int, list[Any]] = {}  # Nodes to insert before a node (by id).
    self.initializers: list[Any] = []

  def add_constant(self, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper  # noqa: PLC0415

    if name not in self.constants:
      self.constants[name] = value
      self.initializers.append(numpy_helper.from_array(value, name))
    return name

  def only_user(self, name: str) -> Any:
    """The single node reading `name`, if it has exactly one and is not a graph output."""
    users = self.consumers.get(name, [])
    return users[0] if len(users) == 1 and name not in self.outputs else None

  def finish(self) -> None:
    kept = []
    for node in self.nodes:
      kept.extend(self.inserted.get(id(node), []))
      if id(node) not in self.removed:
        kept.append(node)
    del self.graph.node[:]
    self.graph.node.extend(kept)
    self.graph.initializer.extend(self.initializers)
    used = {name for node in self.graph.node for name in node.input} | self.outputs
    for init in [init for init in self.graph.initializer if init.name not in used]:
      self.graph.initializer.remove(init)


def _average_pool(edit: _Rewriter, node: Any) -> None:
  """`Unsqueeze(0)`, `Unsqueeze(1)`, 6-D ones `Conv`, `Squeeze`, `Div(k)` on NHWC `x`
  (jax2onnx's `reduce_window_sum` and the pool's division) -> an `AveragePool`."""
  import onnx  # noqa: PLC0415

  kernel = edit.constants.get(node.input[1]) if len(node.input) == 2 else None
  if kernel is None or kernel.ndim != 6 or kernel.shape[:3] != (1, 1, 1) \
      or kernel.shape[5] != 1 or not np.all(kernel == 1):
    return
  strides = list(_attribute(node, "strides", [1] * 4))
  pads = list(_attribute(node, "pads", [0] * 8))
  if strides[0] != 1 or strides[3] != 1 or any(pads[i] for i in (0, 3, 4, 7)) \
      or _attribute(node, "group", 1) != 1 or any(d != 1 for d in _attribute(node, "dilations",
                                                                             [1] * 4)):
    return
  inner = edit.producer.get(node.input[0])
  outer = edit.producer.get(inner.input[0]) if inner is not None else None
  squeeze = edit.only_user(node.output[0])
  div = edit.only_user(squeeze.output[0]) if squeeze is not None else None
  if (inner is None or outer is None or inner.op_type != "Unsqueeze"
      or outer.op_type != "Unsqueeze" or squeeze.op_type != "Squeeze" or div is None
      or div.op_type != "Div" or div.input[0] != squeeze.output[0]
      or edit.only_user(inner.output[0]) is not node
      or edit.only_user(outer.output[0]) is not inner):
    return
  def axes(op: Any) -> list[int]:
    value = edit.constants.get(op.input[1]) if len(op.input) > 1 else None
    return [] if value is None else [int(a) for a in value.reshape(-1)]

  if axes(outer) != [0] or axes(inner) != [1] or axes(squeeze) != [0, 1]:
    return
  window = kernel.shape[3] * kernel.shape[4]
  divisor = edit.constants.get(div.input[1])
  if divisor is None or divisor.size != 1 or float(divisor.reshape(())) != float(window):
    return
  x, name = outer.input[0], div.output[0]
  pool = onnx.helper.make_node(
      "AveragePool", [f"{name}_nchw"], [f"{name}_pooled"],
      kernel_shape=list(kernel.shape[3:5]), strides=strides[1:3],
      pads=[pads[1], pads[2], pads[5], pads[6]], count_include_pad=1)
  edit.inserted[id(div)] = [
      onnx.helper.make_node("Transpose", [x], [f"{name}_nchw"], perm=[0, 3, 1, 2]), pool,
      onnx.helper.make_node("Transpose", [f"{name}_pooled"], [name], perm=[0, 2, 3, 1])]
  edit.removed.update(id(n) for n in (outer, inner, node, squeeze, div))


def _rewrite(edit: _Rewriter, node: Any) -> None:
  constants = edit.constants
  if node.op_type == "Transpose" and node.input[0] in constants \
      and node.output[0] not in edit.outputs:
    perm = _attribute(node, "perm", None)
    edit.add_constant(node.output[0],
                      np.ascontiguousarray(np.transpose(constants[node.input[0]], perm)))
    edit.removed.add(id(node))
  elif node.op_type == "Max" and len(node.input) == 2:
    for value, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
      bound = constants.get(other)
      # Floats only: onnxruntime has no integer Relu.
      if (bound is not None and bound.size == 1 and np.issubdtype(bound.dtype, np.floating)
          and float(bound.reshape(())) == 0.0 and value not in constants):
        del node.input[:]
        node.input.append(value)
        node.op_type = "Relu"
        break
  elif node.op_type == "Sub" and node.input[1] in constants \
      and np.issubdtype(constants[node.input[1]].dtype, np.floating):
    node.input[1] = edit.add_constant(f"{node.input[1]}_negated", -constants[node.input[1]])
    node.op_type = "Add"
  elif node.op_type == "Gemm":
    if len(node.input) == 3 and float(_attribute(node, "beta", 1.0)) == 0.0:
      del node.input[2]
    add = edit.only_user(node.output[0])
    if len(node.input) == 2 and add is not None and add.op_type == "Add":
      bias_name = next((name for name in add.input if name != node.output[0]), None)
      bias = constants.get(bias_name)
      if bias is not None and bias.ndim <= 2 and bias.shape[:-1] in ((), (1,)):
        node.input.append(edit.add_constant(f"{bias_name}_gemm_bias", bias.reshape(-1)))
        _set_attribute(node, "beta", 1.0)
        node.output[0] = add.output[0]
        edit.removed.add(id(add))
  elif node.op_type == "Conv":
    _average_pool(edit, node)


def simplify(model: Any) -> Any:
  """Rewrites `model` (an `onnx.ModelProto`) in place; returns it.

  Args:
    model: a model as jax2onnx writes it.

  Returns:
    The same model, with the rewrites in the module docstring applied (top-level graph
    only; loop bodies are left as they are).
  """
  import onnx  # noqa: PLC0415

  edit = _Rewriter(model.graph)
  for node in edit.nodes:
    if id(node) not in edit.removed:
      _rewrite(edit, node)
  edit.finish()
  onnx.checker.check_model(model)
  return model


# Conv-like attributes whose schema gives no default value, only words: all-one strides
# and dilations, all-zero pads.
_UNIT_ATTRIBUTES = {"strides": 1, "dilations": 1, "pads": 0}
_CONV_LIKE = {"Conv", "ConvInteger", "QLinearConv", "AveragePool", "MaxPool", "LpPool"}
# Where a DequantizeLinear output may lose an all-zero zero point (absent, it is zero of the
# quantized input's type: the same values) and onnxruntime still fuses the node into its
# int8 kernel: a Conv's weight and bias, a Gemm's bias. Its QDQ-to-QGemm fusion needs the
# Gemm *weight's* zero point (without it the Gemm runs in float, with other outputs).
_ZERO_POINT_OPTIONAL = {("Conv", 1), ("Conv", 2), ("Gemm", 2)}
_NAME_START = string.ascii_letters + "_"
_NAME_REST = _NAME_START + string.digits


def _has_subgraphs(graph: Any) -> bool:
  import onnx  # noqa: PLC0415

  return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
             for node in graph.node for attr in node.attribute)


def _domains(graph: Any) -> set[str]:
  """The operator domains of `graph`'s nodes, loop and branch bodies included."""
  found = set()
  for node in graph.node:
    found.add(node.domain)
    for attribute in node.attribute:
      for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
        found |= _domains(sub)
  return found


def _drop_unused(graph: Any) -> None:
  used = {name for node in graph.node for name in node.input} | \
      {value.name for value in graph.output}
  for init in [init for init in graph.initializer if init.name not in used]:
    graph.initializer.remove(init)


def _is_default(node: Any, attribute: Any, opset: int) -> bool:
  """Whether `attribute` of `node` holds the value its absence means."""
  import onnx  # noqa: PLC0415

  value = onnx.helper.get_attribute_value(attribute)
  if node.op_type in _CONV_LIKE and attribute.name in _UNIT_ATTRIBUTES:
    return all(item == _UNIT_ATTRIBUTES[attribute.name] for item in value)
  if not onnx.defs.has(node.op_type, node.domain):  # e.g. a contrib op: keep everything.
    return False
  spec = onnx.defs.get_schema(node.op_type, opset, node.domain).attributes.get(attribute.name)
  if spec is None or spec.default_value.type != attribute.type:
    return False
  return value == onnx.helper.get_attribute_value(spec.default_value)


def _short_name(index: int) -> str:
  """The `index`-th of `a, b, ..., _, aa, ab, ...`: C identifiers, as ONNX names must be."""
  if index < len(_NAME_START):
    return _NAME_START[index]
  index -= len(_NAME_START)
  rest = ""
  while True:  # The names of n characters come before those of n + 1.
    rest = _NAME_REST[index % len(_NAME_REST)] + rest
    index //= len(_NAME_REST)
    if index < len(_NAME_START):
      return _NAME_START[index] + rest
    index -= len(_NAME_START)


def _share_initializers(graph: Any, keep: set[str]) -> None:
  """Initializers equal in type, shape and bytes (the quantizer writes one zero point and
  scale per use) become one."""
  from onnx import numpy_helper  # noqa: PLC0415

  first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
  rename: dict[str, str] = {}
  for init in graph.initializer:
    if init.name in keep:
      continue
    key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
    rename[init.name] = first.setdefault(key, init.name)
  for node in graph.node:
    node.input[:] = [rename.get(name, name) for name in node.input]
  _drop_unused(graph)


def _rename(graph: Any, keep: set[str]) -> None:
  """Inner tensors get the shortest names, the most referenced first."""
  uses: dict[str, int] = {}
  for node in graph.node:
    for name in [*node.input, *node.output]:
      if name and name not in keep:
        uses[name] = uses.get(name, 0) + 1
  for init in graph.initializer:
    uses.setdefault(init.name, 0)
  names: dict[str, str] = {}
  index = 0
  for name in sorted(uses, key=lambda name: -uses[name]):  # Stable: ties keep graph order.
    while _short_name(index) in keep:
      index += 1
    names[name] = _short_name(index)
    index += 1
  for init in graph.initializer:
    init.name = names.get(init.name, init.name)
  for node in graph.node:
    node.input[:] = [names.get(name, name) for name in node.input]
    node.output[:] = [names.get(name, name) for name in node.output]


def drop_zero_points(model: Any) -> Any:
  """Removes the all-zero zero points of the dequantized constants where onnxruntime
  still fuses the consumer (`_ZERO_POINT_OPTIONAL`): symmetric int8 weights and int32
  biases, one zero per channel. Returns `model`, edited in place; its values are the same.
  """
  from onnx import numpy_helper  # noqa: PLC0415

  graph = model.graph
  constants = {init.name: init for init in graph.initializer}
  users: dict[str, list[tuple[str, int]]] = {}
  for node in graph.node:
    for index, name in enumerate(node.input):
      users.setdefault(name, []).append((node.op_type, index))
  outputs = {value.name for value in graph.output}
  for node in graph.node:
    if (node.op_type == "DequantizeLinear" and len(node.input) == 3
        and node.input[0] in constants and node.input[2] in constants
        and node.output[0] not in outputs and users.get(node.output[0])
        and all(use in _ZERO_POINT_OPTIONAL for use in users[node.output[0]])
        and not numpy_helper.to_array(constants[node.input[2]]).any()):
      del node.input[2]
  _drop_unused(graph)
  return model


def compact(model: Any) -> Any:
  """Drops what only takes room, for the file sizes that matter on an edge device.

  Shape annotations, node names, doc strings and metadata go; so do attributes that hold
  their default value, and opset imports no node uses. Identical initializers are shared,
  and the graph's inner tensors get the shortest names (not its inputs and outputs; not in
  graphs with loop bodies, whose names may refer to the enclosing graph). onnxruntime
  builds the same session from the result (the same fused kernels, the same outputs).

  Args:
    model: an `onnx.ModelProto`, float or quantized.

  Returns:
    `model`, edited in place.
  """
  import onnx  # noqa: PLC0415

  graph = model.graph
  del graph.value_info[:]
  del model.metadata_props[:]  # The quantizer's notes on its own pre-processing.
  graph.doc_string = model.doc_string = ""
  opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
  for node in graph.node:
    node.name, node.doc_string = "", ""
    opset = opsets.get(node.domain or "ai.onnx", 1)
    for attribute in [a for a in node.attribute if _is_default(node, a, opset)]:
      node.attribute.remove(attribute)
  used = {"", "ai.onnx", *_domains(graph)} | {function.domain for function in model.functions}
  for function in model.functions:
    used.update(node.domain for node in function.node)
  for entry in [entry for entry in model.opset_import if entry.domain not in used]:
    model.opset_import.remove(entry)
  if not _has_subgraphs(graph):
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    _share_initializers(graph, keep)
    _rename(graph, keep)
  onnx.checker.check_model(model)
  return model
