"""ROC AUC: how a real-valued score ranks binary labels, the figure click prediction is
judged by (the trainer's evaluation, the exported model's, a synthetic CTR task's ceiling)."""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_auc(labels: Any, scores: Any, weights: Any = None) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (scikit-learn's).

  Examples of weight 0 (e.g. the padding of `eval_batches`, whose mask can be passed as
  `weights`) are dropped first. AUC is undefined when the remaining examples are all of
  one class (a tiny or degenerate split): the result is then nan rather than an error, so
  an evaluation loop can log it and carry on.

  Args:
    labels: 0/1 labels [N].
    scores: real-valued scores [N] (logits or probabilities: AUC only uses their order).
    weights: optional non-negative example weights [N].

  Returns:
    The AUC in [0, 1], or nan if fewer than two classes have positive weight.
  """
  labels = np.asarray(labels).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if weights is not None:
    weights = np.asarray(weights, np.float64).reshape(-1)
    keep = weights > 0
    labels, scores, weights = labels[keep], scores[keep], weights[keep]
  if np.unique(labels).size < 2:
    return float("nan")
  from sklearn import metrics as sk_metrics  # noqa: PLC0415 - 1.4 s to import; CLIs start faster.

  return float(sk_metrics.roc_auc_score(labels, scores, sample_weight=weights))
