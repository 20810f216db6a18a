"""Input checks shared by the host-side metrics: a user's mistake becomes a ValueError that says what is
wrong and with which argument, instead of a silent wrong number or a numpy broadcasting error."""

from __future__ import annotations

import numpy as np


def as_scores(values, name: str, ndim=None) -> np.ndarray:
  """Float64 copy of `values`; raises on NaN/inf or an unexpected rank."""
  values = np.asarray(values, np.float64)
  if ndim is not None and values.ndim not in np.atleast_1d(ndim):
    raise ValueError(f"{name}: expected rank {ndim}, got shape {values.shape}.")
  if not np.all(np.isfinite(values)):
    bad = int(np.size(values) - np.isfinite(values).sum())
    raise ValueError(f"{name}: {bad} value(s) are NaN or infinite; metrics need finite scores/probabilities.")
  return values


def as_binary(values, name: str) -> np.ndarray:
  """Bool copy of a {0, 1} / bool array; raises on any other value."""
  values = np.asarray(values)
  if values.dtype != bool:
    if not np.all(np.isin(values, (0, 1))):
      raise ValueError(f"{name}: expected binary values (bool or 0/1), got {np.unique(values)[:8]}.")
    values = values.astype(bool)
  return values


def as_labels(values, name: str, num_classes: int) -> np.ndarray:
  """Int64 copy of class indices; raises unless every value is an integer in [0, num_classes)."""
  values = np.asarray(values)
  if values.dtype.kind == "f":
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
      raise ValueError(f"{name}: class indices must be whole numbers, got non-integer values.")
  elif values.dtype.kind not in "biu":
    raise ValueError(f"{name}: class indices must be integers, got dtype {values.dtype}.")
  values = values.astype(np.int64)
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"{name}: class indices must lie in [0, {num_classes}), got range "
                     f"[{values.min()}, {values.max()}].")
  return values


def same_length(**arrays) -> int:
  """The shared first dimension of `arrays` (name=array); raises when they disagree or are empty."""
  lengths = {name: len(np.asarray(array)) for name, array in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"Arrays must have the same length (first dimension), got {lengths}.")
  length = next(iter(lengths.values()))
  if length == 0:
    raise ValueError(f"Arrays {tuple(lengths)} are empty; a metric needs at least one example.")
  return length


def same_shape(**arrays) -> tuple:
  """The shared shape of `arrays` (name=array); raises when they disagree."""
  shapes = {name: np.shape(array) for name, array in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"Arrays must have the same shape, got {shapes}.")
  return next(iter(shapes.values()))


def _is_binary(values) -> bool:
  values = np.asarray(values)
  return values.size > 0 and (values.dtype == bool or bool(np.all(np.isin(values, (0, 1)))))


def swapped_error(fn: str, second: str, detail: str) -> ValueError:
  """The error for a call whose ground truth and prediction arguments look exchanged."""
  return ValueError(f"{fn}: {detail}; the arguments look swapped. Pass the ground truth y_true first and "
                    f"{second} second, as in scikit-learn.")


def binary_truth(y_true, other, fn: str, second: str = "y_score") -> np.ndarray:
  """`as_binary(y_true)`; when y_true is not binary but `other` (the second argument) is, the error says the
  arguments look swapped. Only the message changes: a non-binary y_true raises either way."""
  try:
    return as_binary(y_true, "y_true")
  except ValueError as error:
    if _is_binary(other):
      raise swapped_error(fn, second, f"y_true is not binary but {second} is") from error
    raise


def check_not_swapped_ranks(y_true, y_prob, fn: str, second: str = "y_prob") -> None:
  """Raises when y_true is (N, K) and y_prob (N,): the shapes of (N, K) probabilities and (N,) class labels
  passed in the wrong order. A correct call never has these ranks, so the check cannot misfire."""
  if np.ndim(y_true) == 2 and np.ndim(y_prob) == 1:
    raise swapped_error(fn, second, f"y_true has shape {np.shape(y_true)} (scores?) and {second} "
                        f"{np.shape(y_prob)} (labels?)")
