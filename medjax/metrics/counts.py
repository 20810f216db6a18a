"""On-device (jittable) confusion-matrix counts.

Counts are int32 sums, so adding the counts of batches, or of the shards of one batch, gives exactly the
counts of the whole split whatever the batch size and device count; an int32 holds 2^31 voxels per batch,
and the host adds batches in int64.
"""

from __future__ import annotations

import jax.numpy as jnp

from medjax.metrics import _checks
from medjax.typing import Array


def confusion_counts(y_true: Array, y_pred: Array, num_classes: int, weight: Array = None) -> Array:
  """(K, K) int32 confusion counts of one batch, rows = reference class, columns = predicted class (the
  device-side `confusion_matrix(y_true, y_pred, num_classes)`, argument order as in scikit-learn).

  Args:
    y_true: (B, ...) reference classes; the spatial axes of a segmentation map are counted voxel by voxel.
    y_pred: (B, ...) predicted classes, or (B, ..., K) scores/logits whose argmax is the prediction.
    num_classes: K.
    weight: optional (B,) per-example inclusion (nonzero = counted), e.g. the pipeline's padding weight;
      fractional weights are not counts, so only weight != 0 matters.
  Returns: int32 (K, K). Labels or predictions outside [0, K) are not counted (the device cannot raise;
    check labels on the host with `confusion_matrix`).
  """
  labels = jnp.asarray(y_true)
  logits_or_preds = jnp.asarray(y_pred)
  if logits_or_preds.shape == labels.shape:
    preds = logits_or_preds.astype(jnp.int32)
  elif logits_or_preds.shape[:-1] == labels.shape:
    if logits_or_preds.shape[-1] != num_classes:
      raise ValueError(f"confusion_counts: logits have {logits_or_preds.shape[-1]} classes, "
                       f"num_classes is {num_classes}.")
    preds = jnp.argmax(logits_or_preds, axis=-1).astype(jnp.int32)
  elif labels.shape[:-1] == logits_or_preds.shape:
    raise _checks.swapped_error("confusion_counts", "y_pred", f"y_true has shape {labels.shape} (logits?) and "
                                f"y_pred {logits_or_preds.shape} (labels?)")
  else:
    raise ValueError(f"confusion_counts: y_pred shape {logits_or_preds.shape} does not match y_true "
                     f"shape {labels.shape} (expected equal shapes, or y_true.shape + (K,)).")
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
  if weight is not None:
    weight = jnp.asarray(weight)
    if weight.shape != labels.shape[:1]:
      raise ValueError(f"confusion_counts: weight must be ({labels.shape[0]},), got {weight.shape}.")
    valid &= (weight != 0).reshape(weight.shape + (1,) * (labels.ndim - 1))
  # Excluded entries go to an extra bin that is dropped, which keeps the shapes static under jit.
  flat = jnp.where(valid, labels * num_classes + preds, num_classes * num_classes)
  counts = jnp.bincount(flat.ravel(), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)
