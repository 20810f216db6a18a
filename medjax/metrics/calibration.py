"""Calibration (host side, numpy): reliability-diagram bins and expected calibration error.

Bins split [0, 1] into `num_bins` equal-width intervals ((m-1)/M, m/M] (the first also holds 0), and
ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|, as defined by Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017 (Naeini et al., AAAI 2015, for the binned estimator).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from medjax.metrics import _checks


def calibration_curve(confidences, correct, num_bins: int = 15) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-bin mean confidence, accuracy and count.

  Args:
    confidences: (N,) in [0, 1], the probability the model gave its own prediction.
    correct: (N,) bool, whether that prediction was right.
    num_bins: number of equal-width bins.
  Returns:
    (bin_confidence, bin_accuracy, bin_count), each (num_bins,); empty bins have count 0 and NaN means.
  """
  if int(num_bins) < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
  confidences = _checks.as_scores(confidences, "confidences", ndim=1)
  correct = _checks.as_binary(correct, "correct")
  _checks.same_length(confidences=confidences, correct=correct)
  if confidences.min() < 0.0 or confidences.max() > 1.0:
    raise ValueError(f"confidences must lie in [0, 1], got range [{confidences.min()}, {confidences.max()}].")
  inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  bins = np.searchsorted(inner_edges, confidences, side="left")  # right-closed bins
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.bincount(bins, confidences, minlength=num_bins) / count
    mean_accuracy = np.bincount(bins, correct.astype(np.float64), minlength=num_bins) / count
  return mean_confidence, mean_accuracy, count.astype(np.int64)


def confidence_and_correct(probs, labels) -> Tuple[np.ndarray, np.ndarray]:
  """Confidence of the predicted class and whether it is right.

  Args:
    probs: (N, K) class probabilities with labels (N,) class indices; or (N,) positive-class
      probabilities with labels (N,) in {0, 1} (prediction: positive when p >= 0.5).
  Returns: (confidences (N,), correct (N,) bool).
  """
  probs = _checks.as_scores(probs, "probs", ndim=(1, 2))
  if probs.ndim == 1:
    labels = _checks.as_binary(labels, "labels")
    _checks.same_length(probs=probs, labels=labels)
    predicted = probs >= 0.5
    return np.where(predicted, probs, 1.0 - probs), predicted == labels
  labels = _checks.as_labels(labels, "labels", probs.shape[1])
  _checks.same_length(probs=probs, labels=labels)
  return probs.max(axis=1), probs.argmax(axis=1) == labels


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  """Expected calibration error in [0, 1] of top-1 predictions; inputs as `confidence_and_correct`."""
  confidences, correct = confidence_and_correct(probs, labels)
  mean_confidence, mean_accuracy, count = calibration_curve(confidences, correct, num_bins)
  filled = count > 0
  gaps = np.abs(mean_accuracy[filled] - mean_confidence[filled])
  return float(np.sum(count[filled] * gaps) / count.sum())
