"""Calibration (host side, numpy): reliability-diagram bins and expected calibration error.

Bins split [0, 1] into `num_bins` equal-width intervals ((m-1)/M, m/M] (the first also holds 0), and
ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|, as defined by Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017 (Naeini et al., AAAI 2015, for the binned estimator). Arguments follow
scikit-learn: the ground truth `y_true` first, then the probabilities `y_prob`.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from medjax.metrics import _checks


def calibration_curve(y_true, y_prob, num_bins: int = 15) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-bin mean confidence, accuracy and count (scikit-learn's `calibration_curve(y_true, y_prob,
  n_bins=num_bins)` gives the same accuracy and confidence for the non-empty bins).

  Args:
    y_true: (N,) bool or {0, 1}: whether the top-1 prediction was right (from `confidence_and_correct`), or
      the binary outcome when y_prob is the positive-class probability.
    y_prob: (N,) in [0, 1]: the probability the model gave its own prediction (or the positive class).
    num_bins: number of equal-width bins.
  Returns:
    (bin_confidence, bin_accuracy, bin_count), each (num_bins,): mean y_prob, mean y_true (fraction right)
    and case count per bin; empty bins have count 0 and NaN means.
  """
  if int(num_bins) < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
  correct = _checks.binary_truth(y_true, y_prob, "calibration_curve", "y_prob")
  confidences = _checks.as_scores(y_prob, "y_prob", ndim=1)
  _checks.same_length(y_true=correct, y_prob=confidences)
  if confidences.min() < 0.0 or confidences.max() > 1.0:
    raise ValueError(f"y_prob must lie in [0, 1], got range [{confidences.min()}, {confidences.max()}].")
  inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  bins = np.searchsorted(inner_edges, confidences, side="left")  # right-closed bins
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.bincount(bins, confidences, minlength=num_bins) / count
    mean_accuracy = np.bincount(bins, correct.astype(np.float64), minlength=num_bins) / count
  return mean_confidence, mean_accuracy, count.astype(np.int64)


def confidence_and_correct(y_true, y_prob) -> Tuple[np.ndarray, np.ndarray]:
  """Confidence of the predicted class and whether it is right.

  Args:
    y_true: (N,) class indices with y_prob (N, K) class probabilities; or (N,) {0, 1} with y_prob (N,)
      positive-class probabilities (prediction: positive when p >= 0.5).
    y_prob: as above.
  Returns: (confidences (N,), correct (N,) bool), in this order; `calibration_curve` takes them the other way
    round, truth first: `calibration_curve(correct, confidences)`.
  """
  return _confidence_and_correct(y_true, y_prob, "confidence_and_correct")


def _confidence_and_correct(y_true, y_prob, fn: str) -> Tuple[np.ndarray, np.ndarray]:
  _checks.check_not_swapped_ranks(y_true, y_prob, fn)
  if np.ndim(y_prob) == 1:
    labels = _checks.binary_truth(y_true, y_prob, fn, "y_prob")
    probs = _checks.as_scores(y_prob, "y_prob", ndim=1)
    _checks.same_length(y_true=labels, y_prob=probs)
    predicted = probs >= 0.5
    return np.where(predicted, probs, 1.0 - probs), predicted == labels
  probs = _checks.as_scores(y_prob, "y_prob", ndim=2)
  labels = _checks.as_labels(y_true, "y_true", probs.shape[1])
  _checks.same_length(y_true=labels, y_prob=probs)
  return probs.max(axis=1), probs.argmax(axis=1) == labels


def expected_calibration_error(y_true, y_prob, num_bins: int = 15) -> float:
  """Expected calibration error in [0, 1] of top-1 predictions.

  Args: y_true (N,) class indices with y_prob (N, K) probabilities, or y_true (N,) {0, 1} with y_prob (N,)
    positive-class probabilities (as `confidence_and_correct`); num_bins equal-width bins.
  """
  confidences, correct = _confidence_and_correct(y_true, y_prob, "expected_calibration_error")
  mean_confidence, mean_accuracy, count = calibration_curve(correct, confidences, num_bins)
  filled = count > 0
  gaps = np.abs(mean_accuracy[filled] - mean_confidence[filled])
  return float(np.sum(count[filled] * gaps) / count.sum())
