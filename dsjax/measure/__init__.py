"""Measuring a compiled step: FLOPs and MFU from XLA's cost analysis, collective bytes from
the compiled HLO, memory from the compiled memory analysis, device time from a trace
(`dsjax.measure.trace`); the ROC AUC of a click model's scores, and the COCO box AP of a
detector's boxes (`dsjax.measure.coco_eval`, pycocotools). The trainer, the models, the
data, export and the profiling app read these."""

from dsjax.measure import coco_eval
from dsjax.measure.auc import roc_auc
from dsjax.measure.flops import (
    compiled_flops,
    device_peak_flops,
    measured_peak_flops,
    mfu,
    transformer_flops_per_token,
)
from dsjax.measure.hlo import COLLECTIVE_KINDS, collective_bytes
from dsjax.measure.memory import memory_report, tree_bytes

__all__ = ["COLLECTIVE_KINDS", "coco_eval", "collective_bytes", "compiled_flops",
           "device_peak_flops", "measured_peak_flops", "memory_report", "mfu", "roc_auc",
           "transformer_flops_per_token", "tree_bytes"]
