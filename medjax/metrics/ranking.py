"""Threshold-free binary metrics from scores (host side, numpy): ROC and precision-recall curves, ROC-AUC,
average precision, and the operating point that reaches a target sensitivity.

Arguments follow scikit-learn: the reference `y_true` first, then `y_score`. A case counts as predicted
positive at threshold t when its score is >= t. Curves are traced over the distinct scores in decreasing
order, so tied scores move together (one curve point per distinct score).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import scipy.stats

from medjax.metrics import _checks


def _binary_inputs(y_true, y_score, fn: str) -> Tuple[np.ndarray, np.ndarray]:
  """(positives (N,) bool, scores (N,) float64) after the checks shared by the binary ranking metrics."""
  positives = _checks.binary_truth(y_true, y_score, fn)
  scores = _checks.as_scores(y_score, "y_score", ndim=1)
  _checks.same_length(y_true=positives, y_score=scores)
  return positives, scores


def _cumulative_counts(y_true, y_score, fn: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """True/false positive counts when thresholding at each distinct score, highest first.

  Returns (thresholds, tp, fp), each (T,) for the T distinct scores.
  """
  positives, scores = _binary_inputs(y_true, y_score, fn)
  order = np.argsort(-scores, kind="stable")
  scores, positives = scores[order], positives[order]
  # The last index of each run of equal scores is where the threshold at that score takes effect.
  last_of_run = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
  tp = np.cumsum(positives)[last_of_run]
  fp = (last_of_run + 1) - tp
  return scores[last_of_run], tp.astype(np.float64), fp.astype(np.float64)


def roc_curve(y_true, y_score) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Receiver operating characteristic over every distinct threshold (scikit-learn's
  `roc_curve(y_true, y_score, drop_intermediate=False)`).

  Args:
    y_true: (N,) bool or {0, 1}, the reference (1 = positive).
    y_score: (N,) finite scores; higher means more likely positive.
  Returns:
    (fpr, tpr, thresholds), each (T + 1,): thresholds decrease, the first is +inf (nothing positive), so the
    curve starts at (0, 0) and ends at (1, 1). No collinear points are dropped. fpr (tpr) is NaN throughout
    when there are no negatives (positives).
  """
  thresholds, tp, fp = _cumulative_counts(y_true, y_score, "roc_curve")
  tp, fp = np.r_[0.0, tp], np.r_[0.0, fp]
  with np.errstate(invalid="ignore", divide="ignore"):
    return fp / fp[-1], tp / tp[-1], np.r_[np.inf, thresholds]


def pr_curve(y_true, y_score) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Precision-recall curve over every distinct threshold (scikit-learn's `precision_recall_curve(y_true,
  y_score)`, in the opposite order).

  Args: as `roc_curve`: y_true (N,) bool or {0, 1}, then y_score (N,).
  Returns:
    (precision, recall, thresholds), each (T + 1,): thresholds decrease with the first +inf, where by
    convention precision is 1 and recall 0; recall is non-decreasing. recall is NaN when there are no
    positives.
  """
  thresholds, tp, fp = _cumulative_counts(y_true, y_score, "pr_curve")
  with np.errstate(invalid="ignore", divide="ignore"):
    precision, recall = tp / (tp + fp), tp / tp[-1]
  return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thresholds]


def average_precision(y_true, y_score) -> float:
  """Average precision: sum over thresholds of (R_n - R_{n-1}) * P_n, the step-wise area under the PR curve
  without interpolation (scikit-learn's `average_precision_score(y_true, y_score)`).

  Args: y_true (N,) bool or {0, 1}; y_score (N,), higher means more likely positive.
  Returns: AP in [0, 1]; NaN when there are no positives.
  """
  precision, recall, _ = pr_curve(y_true, y_score)
  if np.isnan(recall[-1]):
    return float("nan")
  return float(np.sum(np.diff(recall) * precision[1:]))


def roc_auc(y_true, y_score) -> float:
  """Binary ROC-AUC by the Mann-Whitney statistic with average ranks for ties (a tied positive-negative
  pair counts one half); scikit-learn's `roc_auc_score(y_true, y_score)`.

  Args:
    y_true: (N,) bool or {0, 1}, the reference (1 = positive).
    y_score: (N,) higher means more likely positive.
  Returns: AUC in [0, 1], NaN when only one class is present.
  """
  positives, scores = _binary_inputs(y_true, y_score, "roc_auc")
  n_pos, n_neg = int(positives.sum()), int((~positives).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = scipy.stats.rankdata(scores)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def averaged(binary_metric, y_true, y_score, average: str = "macro") -> float:
  """A binary ranking metric (`roc_auc`, `average_precision`) over K one-vs-rest columns.

  Args:
    binary_metric: fn(y_true (N,), y_score (N,)) -> float.
    y_true: (N, K) bool: the one-hot labels of a multi-class task, or the labels of a multi-label task.
    y_score: (N, K).
    average: "macro" (mean over columns), "weighted" (mean weighted by each column's number of positives,
      its prevalence; scikit-learn's average="weighted") or "micro" (all N * K decisions pooled into one
      binary problem). Columns where the metric is NaN (a single class present) are left out of "macro" and
      "weighted", and the weights of the others renormalised (scikit-learn raises instead).
  """
  positives = _checks.binary_truth(y_true, y_score, "averaged")
  scores = _checks.as_scores(y_score, "y_score", ndim=2)
  _checks.same_shape(y_true=positives, y_score=scores)
  if average == "micro":
    return binary_metric(positives.ravel(), scores.ravel())
  if average not in ("macro", "weighted"):
    raise ValueError(f"average must be 'macro', 'weighted' or 'micro', got {average!r}.")
  values = np.array([binary_metric(positives[:, k], scores[:, k]) for k in range(scores.shape[1])])
  weights = positives.sum(axis=0).astype(np.float64) if average == "weighted" else np.ones(len(values))
  defined = ~np.isnan(values) & (weights > 0)
  if not defined.any():
    return float("nan")
  return float(np.sum(values[defined] * weights[defined]) / np.sum(weights[defined]))


def operating_point(y_true, y_score, target_sensitivity: float) -> Dict[str, float]:
  """The highest threshold whose sensitivity reaches `target_sensitivity`, hence the most specific one.

  Args:
    y_true: (N,) bool or {0, 1}; y_score: (N,); target_sensitivity in (0, 1].
  Returns: {"threshold", "sensitivity", "specificity"} at that threshold (predict positive when
    score >= threshold). Raises when there are no positives or no negatives.
  """
  if not 0.0 < target_sensitivity <= 1.0:
    raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}.")
  fpr, tpr, thresholds = roc_curve(y_true, y_score)
  if np.isnan(tpr[-1]) or np.isnan(fpr[-1]):
    raise ValueError("operating_point needs both positive and negative cases.")
  # tpr is non-decreasing along decreasing thresholds; a tiny tolerance absorbs 0.9 vs 9/10 rounding.
  index = int(np.argmax(tpr >= target_sensitivity - 1e-12))
  return {"threshold": float(thresholds[index]), "sensitivity": float(tpr[index]),
          "specificity": float(1.0 - fpr[index])}
