"""Threshold-free binary metrics from scores (host side, numpy): ROC and precision-recall curves, ROC-AUC,
average precision, and the operating point that reaches a target sensitivity.

A case counts as predicted positive at threshold t when its score is >= t. Curves are traced over the
distinct scores in decreasing order, so tied scores move together (one curve point per distinct score).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import scipy.stats

from medjax.metrics import _checks


def _cumulative_counts(scores, positives) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """True/false positive counts when thresholding at each distinct score, highest first.

  Returns (thresholds, tp, fp), each (T,) for the T distinct scores.
  """
  scores = _checks.as_scores(scores, "scores", ndim=1)
  positives = _checks.as_binary(positives, "positives")
  _checks.same_length(scores=scores, positives=positives)
  order = np.argsort(-scores, kind="stable")
  scores, positives = scores[order], positives[order]
  # The last index of each run of equal scores is where the threshold at that score takes effect.
  last_of_run = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
  tp = np.cumsum(positives)[last_of_run]
  fp = (last_of_run + 1) - tp
  return scores[last_of_run], tp.astype(np.float64), fp.astype(np.float64)


def roc_curve(scores, positives) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Receiver operating characteristic over every distinct threshold.

  Args:
    scores: (N,) finite; higher means more likely positive.
    positives: (N,) bool or {0, 1}.
  Returns:
    (fpr, tpr, thresholds), each (T + 1,): thresholds decrease, the first is +inf (nothing positive), so the
    curve starts at (0, 0) and ends at (1, 1). No collinear points are dropped. fpr (tpr) is NaN throughout
    when there are no negatives (positives).
  """
  thresholds, tp, fp = _cumulative_counts(scores, positives)
  tp, fp = np.r_[0.0, tp], np.r_[0.0, fp]
  with np.errstate(invalid="ignore", divide="ignore"):
    return fp / fp[-1], tp / tp[-1], np.r_[np.inf, thresholds]


def pr_curve(scores, positives) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Precision-recall curve over every distinct threshold.

  Args: as `roc_curve`.
  Returns:
    (precision, recall, thresholds), each (T + 1,): thresholds decrease with the first +inf, where by
    convention precision is 1 and recall 0; recall is non-decreasing. recall is NaN when there are no
    positives.
  """
  thresholds, tp, fp = _cumulative_counts(scores, positives)
  with np.errstate(invalid="ignore", divide="ignore"):
    precision, recall = tp / (tp + fp), tp / tp[-1]
  return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thresholds]


def average_precision(scores, positives) -> float:
  """Average precision: sum over thresholds of (R_n - R_{n-1}) * P_n, the step-wise area under the PR curve
  without interpolation (the definition scikit-learn uses). NaN when there are no positives."""
  precision, recall, _ = pr_curve(scores, positives)
  if np.isnan(recall[-1]):
    return float("nan")
  return float(np.sum(np.diff(recall) * precision[1:]))


def roc_auc(scores, positives) -> float:
  """Binary ROC-AUC by the Mann-Whitney statistic with average ranks for ties (a tied positive-negative
  pair counts one half).

  Args:
    scores: (N,) higher means more likely positive.
    positives: (N,) bool or {0, 1}.
  Returns: AUC in [0, 1], NaN when only one class is present.
  """
  scores = _checks.as_scores(scores, "scores", ndim=1)
  positives = _checks.as_binary(positives, "positives")
  _checks.same_length(scores=scores, positives=positives)
  n_pos, n_neg = int(positives.sum()), int((~positives).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = scipy.stats.rankdata(scores)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def averaged(binary_metric, scores, positives, average: str = "macro") -> float:
  """A binary ranking metric (`roc_auc`, `average_precision`) over K one-vs-rest columns.

  Args:
    binary_metric: fn(scores (N,), positives (N,)) -> float.
    scores: (N, K).
    positives: (N, K) bool: the one-hot labels of a multi-class task, or the labels of a multi-label task.
    average: "macro" (mean over columns, columns where the metric is NaN - a single class present - are
      left out) or "micro" (all N * K decisions pooled into one binary problem).
  """
  scores = _checks.as_scores(scores, "scores", ndim=2)
  positives = _checks.as_binary(positives, "positives")
  _checks.same_shape(scores=scores, positives=positives)
  if average == "micro":
    return binary_metric(scores.ravel(), positives.ravel())
  if average != "macro":
    raise ValueError(f"average must be 'macro' or 'micro', got {average!r}.")
  values = np.array([binary_metric(scores[:, k], positives[:, k]) for k in range(scores.shape[1])])
  return float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else float("nan")


def operating_point(scores, positives, target_sensitivity: float) -> Dict[str, float]:
  """The highest threshold whose sensitivity reaches `target_sensitivity`, hence the most specific one.

  Args:
    scores: (N,); positives: (N,) bool; target_sensitivity in (0, 1].
  Returns: {"threshold", "sensitivity", "specificity"} at that threshold (predict positive when
    score >= threshold). Raises when there are no positives or no negatives.
  """
  if not 0.0 < target_sensitivity <= 1.0:
    raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}.")
  fpr, tpr, thresholds = roc_curve(scores, positives)
  if np.isnan(tpr[-1]) or np.isnan(fpr[-1]):
    raise ValueError("operating_point needs both positive and negative cases.")
  # tpr is non-decreasing along decreasing thresholds; a tiny tolerance absorbs 0.9 vs 9/10 rounding.
  index = int(np.argmax(tpr >= target_sensitivity - 1e-12))
  return {"threshold": float(thresholds[index]), "sensitivity": float(tpr[index]),
          "specificity": float(1.0 - fpr[index])}
