"""Writing an inference function as StableHLO and ONNX, and quantizing the ONNX to int8.

Both exporters start from one traced program. StableHLO is `jax.export` of the jitted
function with a symbolic batch dimension. ONNX is jax2onnx replaying the same jaxpr,
traced once here with that symbolic batch: the converter then sees only JAX primitives,
never the Flax modules that jax2onnx would otherwise monkey-patch (its `flax.linen`
patches do not take every call form dsjax's models use, e.g. a positional pool window).
An equation whose primitive jax2onnx cannot lower is reported with the layer it belongs
to (the jaxpr's name stack, e.g. `CNN/conv0_1`) and the primitive's name.
"""

from __future__ import annotations

import collections.abc
import contextlib
import importlib.metadata
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dsjax.errors import ExportError
from dsjax.export import onnx_graph
from dsjax.export.restore import InputSpec

log = logging.getLogger(__name__)

OPSET = 23  # jax2onnx's default; onnxruntime >= 1.20 runs it.
BATCH = "batch"  # The name of the dynamic batch dimension in both formats.


def batch_specs(inputs: Sequence[InputSpec]) -> list[jax.ShapeDtypeStruct]:
  """The inputs as abstract arrays whose leading dimension is the symbolic `batch`."""
  batch, = jax.export.symbolic_shape(BATCH)
  return [jax.ShapeDtypeStruct((batch, *spec.shape), np.dtype(spec.dtype)) for spec in inputs]


def write_stablehlo(fn: Callable[..., jax.Array], inputs: Sequence[InputSpec],
                    out_dir: Path) -> tuple[dict[str, int], jax.export.Exported]:
  """Exports `fn` (weights closed over) as `model.stablehlo` (serialized) and `model.mlir`.

  Returns:
    `({file name: bytes}, the Exported)`; `jax.export.deserialize` of the file's bytes
    gives a function callable at any batch size.
  """
  exported = jax.export.export(jax.jit(fn))(*batch_specs(inputs))
  (out_dir / "model.stablehlo").write_bytes(exported.serialize())
  (out_dir / "model.mlir").write_text(exported.mlir_module())
  return {name: (out_dir / name).stat().st_size for name in ("model.stablehlo", "model.mlir")}, \
      exported


def _load_plugins() -> None:
  """Registers jax2onnx's primitive lowerings, and only those.

  `to_onnx` otherwise imports every module under `jax2onnx/plugins` on first use, examples
  included, several of which build and compile models at import (~15 s on two cores). A
  replayed jaxpr needs only the `jax` tree. If jax2onnx's layout changes, `to_onnx`
  falls back to its own import-everything, which is slower but still correct.
  """
  from jax2onnx.plugins import plugin_system  # noqa: PLC0415 - the `export` extra.

  if getattr(plugin_system, "_already_imported_plugins", True):
    return
  tree = Path(plugin_system.__file__).parent / "jax"
  if tree.is_dir() and hasattr(plugin_system, "_import_tree"):
    plugin_system._import_tree(tree, "jax2onnx.plugins.jax")
    plugin_system._already_imported_plugins = True


# Call-like primitives whose bodies are inlined when the jaxpr is replayed for jax2onnx
# (inference needs no custom derivative or rematerialisation), and their body's param.
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr"}


def _subjaxprs(eqn: Any) -> Iterable[Any]:
  for value in eqn.params.values():
    values = value if isinstance(value, tuple | list) else (value,)
    for item in values:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _layer(eqn: Any, outer: str = "") -> str:
  """The Flax module path of an equation (`CNN/conv0_1`), from its name stack; `outer`
  is the path of the call it sits in (a nested jaxpr's names are relative to it)."""
  inner = str(eqn.source_info.name_stack)
  return "/".join(part for part in (outer, inner) if part)


def _unsupported(jaxpr: Any, known: collections.abc.Container[str],
                 outer: str = "") -> tuple[str, str] | None:
  """The first `(layer, primitive)` whose primitive has no lowering, depth first."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name not in known and eqn.primitive.name not in _INLINED:
      return _layer(eqn, outer) or "(top level)", eqn.primitive.name
    for sub in _subjaxprs(eqn):
      found = _unsupported(sub, known, _layer(eqn, outer))
      if found:
        return found
  return None


def _inlined_body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
  body = eqn.params.get(_INLINED.get(eqn.primitive.name, ""))
  if isinstance(body, jax.extend.core.ClosedJaxpr):
    body, consts = body.jaxpr, body.consts
  elif isinstance(body, jax.extend.core.Jaxpr):
    consts = ()
  else:
    return None
  return (body, consts) if len(body.invars) == len(eqn.invars) else None


def _bind(eqn: Any, args: list[Any]) -> list[Any]:
  out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


@contextlib.contextmanager
def _symbolic_dims_by_name() -> Iterator[None]:
  """Lets onnx_ir take JAX's symbolic dimensions (`batch`, `8*batch`) by name.

  Several jax2onnx 0.17 lowerings (integer `rem`, `pad`, ...) first set an output's shape
  from the JAX aval, symbolic dimensions included, which onnx_ir rejects (it calls
  `int()` on them), and only then stamp the shape by name. Converting them to named
  dimensions at that first step lets those lowerings finish with the same result.
  """
  from onnx_ir import _core  # noqa: PLC0415 - the `export` extra.

  original = getattr(_core, "_maybe_convert_to_symbolic_dim", None)
  if original is None:  # Another onnx_ir: unpatched, any failure is reported as usual.
    yield
    return

  def convert(dim: Any) -> Any:
    return _core.SymbolicDim(str(dim)) if jax.export.is_symbolic_dim(dim) else original(dim)

  _core._maybe_convert_to_symbolic_dim = convert
  try:
    yield
  finally:
    _core._maybe_convert_to_symbolic_dim = original


def _replay(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], outer: str = "") -> list[Any]:
  """Evaluates `jaxpr` equation by equation (as `jax.core.eval_jaxpr`), inlining calls and
  binding each equation under its layer's name, so what jax2onnx traces keeps the names."""
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))

  def read(var: Any) -> Any:
    return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

  for eqn in jaxpr.eqns:
    args_in = [read(var) for var in eqn.invars]
    layer = _layer(eqn, outer)
    inlined = _inlined_body(eqn)
    if inlined is not None:
      outs = _replay(*inlined, args_in, layer)
    else:
      with jax.named_scope(layer) if layer else contextlib.nullcontext():
        outs = _bind(eqn, args_in)
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(var) for var in jaxpr.outvars]


def _failing_layer(error: BaseException) -> tuple[str, str] | None:
  """`(layer, primitive)` of the equation jax2onnx was lowering when `error` was raised:
  the equations on the traceback, outermost first (a scan's body names are relative)."""
  chain: list[Any] = []
  traceback = error.__traceback__
  while traceback is not None:
    eqn = traceback.tb_frame.f_locals.get("eqn")
    if hasattr(eqn, "primitive") and hasattr(eqn, "source_info") and \
        not any(eqn is seen for seen in chain):
      chain.append(eqn)
    traceback = traceback.tb_next
  if not chain:
    return None
  layer = ""
  for eqn in chain:
    layer = _layer(eqn, layer)
  return layer or "(top level)", chain[-1].primitive.name


def _converter_version() -> str:
  try:
    return f"jax2onnx {importlib.metadata.version('jax2onnx')}"
  except importlib.metadata.PackageNotFoundError:
    return "jax2onnx"


def _cannot_express(layer: str, op: str, detail: str = "") -> ExportError:
  detail = f" ({detail})" if detail else ""
  return ExportError(
      f"ONNX export: {_converter_version()} cannot express op {op!r} of layer {layer}"
      f"{detail}; export this model with --format stablehlo, or build that layer from ops "
      "ONNX has")


def to_onnx(fn: Callable[..., jax.Array], inputs: Sequence[InputSpec], path: Path, *,
            model_name: str, output_name: str = "logits") -> dict[str, int]:
  """Converts `fn` (weights closed over) to an ONNX file with a dynamic `batch` dimension.

  Args:
    fn: the inference function, one array per input.
    inputs: its inputs; their names become the ONNX graph's input names.
    path: the `.onnx` file to write (self-contained: weights are initializers inside it).
    model_name: the graph's name.
    output_name: the graph output's name.

  Returns:
    `{file name: bytes}`.

  Raises:
    ExportError: an op jax2onnx cannot lower, naming its layer and the op.
  """
  import jax2onnx  # noqa: PLC0415 - the `export` extra.
  import onnx  # noqa: PLC0415
  from jax2onnx.plugins import plugin_system  # noqa: PLC0415

  _load_plugins()
  specs = batch_specs(inputs)
  closed = jax.make_jaxpr(fn)(*specs)
  known = set(plugin_system.PLUGIN_REGISTRY)
  # An empty registry: jax2onnx registers its plugins inside `to_onnx` (see `_load_plugins`),
  # and only the conversion itself can tell.
  missing = _unsupported(closed.jaxpr, known) if known else None
  if missing:
    raise _cannot_express(*missing, detail="no lowering for this primitive")
  serde_log = logging.getLogger("onnx_ir.serde")  # Notes on shape-only helper values.
  level = serde_log.level
  serde_log.setLevel(logging.ERROR)
  try:
    with _symbolic_dims_by_name():
      proto = jax2onnx.to_onnx(
          lambda *arrays: _replay(closed.jaxpr, closed.consts, arrays)[0], specs,
          model_name=model_name, opset=OPSET, input_names=[spec.name for spec in inputs],
          output_names=[output_name])
  except Exception as error:  # noqa: BLE001 - a plugin may fail in any way on an odd eqn.
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    failing = _failing_layer(error)
    if failing is None:
      raise ExportError(f"ONNX export: {_converter_version()} failed ({first}); export this "
                        "model with --format stablehlo") from error
    raise _cannot_express(*failing, detail=first) from error
  finally:
    serde_log.setLevel(level)
  onnx.save_model(onnx_graph.compact(onnx_graph.simplify(proto)), str(path))
  return {path.name: path.stat().st_size}


def _calibration_reader(batches: Iterable[dict[str, np.ndarray]]) -> Any:
  """An onnxruntime `CalibrationDataReader` over dicts of input arrays."""
  from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415 - the extra.

  class TrainingBatches(CalibrationDataReader):
    def __init__(self) -> None:
      self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
      return next(self._batches, None)

  return TrainingBatches()


def quantize_int8(fp32_path: Path, int8_path: Path,
                  calibration: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Post-training static int8 quantization: QDQ format, per-channel weights.

  The float model first goes through onnxruntime's quantization pre-processing (shape
  inference and graph optimisation: transposes around convolutions cancel, biases fold
  into them), then activation ranges are calibrated (min/max) on `calibration`. What the
  quantizer writes is then shrunk without changing a value: the weights' and biases'
  all-zero zero points go, shared scales are stored once, names are short (see
  `onnx_graph.compact`); on a model of a few thousand weights that is a tenth of the file.

  Args:
    fp32_path: the float32 `.onnx` file.
    int8_path: where the quantized model goes.
    calibration: batches `{input name: array}`, e.g. training batches.

  Returns:
    `{file name: bytes}` of the int8 file.
  """
  import onnx  # noqa: PLC0415 - the `export` extra.
  from onnxruntime import quantization  # noqa: PLC0415
  from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as scratch:
    prepared = Path(scratch) / "prepared.onnx"
    try:
      quant_pre_process(str(fp32_path), str(prepared))
    except Exception as error:  # noqa: BLE001 - its symbolic shapes miss some ops (Loop).
      log.info("int8: symbolic shape inference failed (%s); ONNX's own shape inference "
               "only", error)
      quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantization.quantize_static(
        str(prepared), str(int8_path), _calibration_reader(calibration),
        quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax)
  quantized = onnx_graph.drop_zero_points(onnx.load(str(int8_path)))
  onnx.save_model(onnx_graph.compact(quantized), str(int8_path))
  return {int8_path.name: int8_path.stat().st_size}
