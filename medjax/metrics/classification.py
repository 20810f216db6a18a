"""Classification metrics on host arrays (numpy)."""

from __future__ import annotations

import numpy as np
import scipy.stats


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy: probs (N, K), labels (N,) ints. Binary tasks use argmax, i.e. threshold 0.5."""
  return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(labels)))


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
  """Binary ROC-AUC by the Mann-Whitney statistic with average ranks for ties.

  Args:
    scores: (N,) higher means more likely positive.
    positives: (N,) bool or {0, 1}.
  Returns: AUC in [0, 1], NaN when only one class is present.
  """
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives).astype(bool)
  n_pos, n_neg = int(positives.sum()), int((~positives).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = scipy.stats.rankdata(scores)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(probs: np.ndarray, labels: np.ndarray) -> float:
  """ROC-AUC for (N, K) class probabilities: the positive-class AUC for K = 2, else the macro mean of
  one-vs-rest AUCs over classes present (as MedMNIST reports it)."""
  probs, labels = np.asarray(probs), np.asarray(labels)
  if probs.shape[-1] == 2:
    return roc_auc(probs[:, 1], labels == 1)
  aucs = [roc_auc(probs[:, k], labels == k) for k in range(probs.shape[-1])]
  return float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
