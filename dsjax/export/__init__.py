"""Deployment: a trained run as StableHLO and ONNX files (optionally int8), each checked.

  from dsjax.export import export
  report = export("runs/digits", formats=("stablehlo", "onnx"), int8=True)

writes `runs/digits/export/` (`model.stablehlo`, `model.mlir`, `model.onnx`,
`model.int8.onnx`, `export.json`). ONNX and int8 need the `export` extra (jax2onnx, onnx,
onnxruntime); StableHLO needs only jax.
"""

from dsjax.errors import ExportError
from dsjax.export.restore import RestoredRun, restore
from dsjax.export.run import FORMATS, export, parse_formats

__all__ = ["FORMATS", "ExportError", "RestoredRun", "export", "parse_formats", "restore"]
