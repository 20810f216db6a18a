"""Segmentation metrics: on-device overlap counts and host-side per-case overlap and surface distances.

Conventions (the same for every function here):
- Arguments follow scikit-learn: the reference (ground truth) `y_true` first, then the prediction `y_pred`
  (or the `logits` it comes from).
- Empty reference: Dice, IoU and recall are NaN, whatever the prediction (as MONAI's `ignore_empty=True`),
  so cases without a lesion neither reward nor punish the lesion class; NaN values are left out of means
  over cases. False positives on such cases still show: precision is 0 and volume_diff_ml is positive.
  A class present in the reference but not predicted scores Dice 0. Precision is NaN when nothing is
  predicted.
- Surfaces are the mask minus its erosion with face connectivity (6-neighbourhood in 3D, 4 in 2D); voxels
  on the image border belong to the surface. Distances are Euclidean in millimetres, between voxel centres,
  from `scipy.ndimage.distance_transform_edt(..., sampling=spacing_mm)`.
- Surface distances (HD95, ASSD) are NaN when either mask is empty: the distance to an empty set is
  undefined, and an infinite or image-size stand-in would dominate any mean over cases. Count such cases
  as detection failures separately.
- HD_q = max(q-th percentile of pred->ref distances, q-th percentile of ref->pred distances), linear
  interpolation between samples (q = 100 is the Hausdorff distance); ASSD is the mean over the surface
  voxels of both masks of the distance to the other surface (Heimann et al., IEEE TMI 28(8), 2009).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from medjax.metrics import _checks
from medjax.typing import Array


def segmentation_counts(y_true: Array, logits: Array) -> Array:
  """Per-example, per-class voxel counts of the argmax prediction (jittable).

  Args:
    y_true: (B, *spatial) integer reference classes.
    logits: (B, *spatial, K) scores; the prediction is their argmax.
  Returns:
    (B, K, 3) float32: [intersection, predicted voxels, reference voxels] for each class.
  """
  labels = y_true
  if jnp.ndim(labels) == jnp.ndim(logits) + 1 and jnp.shape(labels)[:-1] == jnp.shape(logits):
    raise _checks.swapped_error("segmentation_counts", "logits", f"y_true has shape {jnp.shape(labels)} and "
                                f"logits {jnp.shape(logits)}, one axis fewer")
  num_classes = logits.shape[-1]
  axes = tuple(range(1, logits.ndim - 1))
  pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.float32)
  ref = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.stack([jnp.sum(pred * ref, axis=axes), jnp.sum(pred, axis=axes), jnp.sum(ref, axis=axes)], -1)


def dice_per_case(counts: np.ndarray) -> np.ndarray:
  """Dice per case and class from `segmentation_counts` output (N, K, 3) -> (N, K), NaN where the
  reference is empty."""
  counts = np.asarray(counts, np.float64)
  intersection, predicted, reference = counts[..., 0], counts[..., 1], counts[..., 2]
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = 2.0 * intersection / (predicted + reference)
  return np.where(reference > 0, dice, np.nan)


def _check_masks(ref_mask, pred_mask, spacing_mm) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  ref_mask, pred_mask = np.asarray(ref_mask, bool), np.asarray(pred_mask, bool)
  _checks.same_shape(y_true=ref_mask, y_pred=pred_mask)
  spacing = np.asarray(spacing_mm, np.float64).reshape(-1)
  if spacing.size != pred_mask.ndim or not np.all(spacing > 0):
    raise ValueError(f"spacing_mm must hold {pred_mask.ndim} positive values (one per spatial axis of masks "
                     f"shaped {pred_mask.shape}), got {tuple(spacing)}.")
  return ref_mask, pred_mask, spacing


def _surface(mask: np.ndarray) -> np.ndarray:
  faces = scipy.ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~scipy.ndimage.binary_erosion(mask, faces, border_value=0)


def surface_distances(y_true, y_pred, spacing_mm: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
  """Distances (mm) from each surface voxel of one mask to the nearest surface voxel of the other.

  Args:
    y_true: (*spatial) bool reference mask.
    y_pred: (*spatial) bool predicted mask, same shape.
    spacing_mm: one positive voxel size (mm) per spatial axis.
  Returns: (pred_to_ref (P,), ref_to_pred (R,)) in mm, in this order, for the P predicted and R reference
    surface voxels; both empty when either mask is empty.
  """
  ref_mask, pred_mask, spacing = _check_masks(y_true, y_pred, spacing_mm)
  if not pred_mask.any() or not ref_mask.any():
    return np.zeros(0), np.zeros(0)
  # Work in the bounding box of both masks plus one background voxel (where the image allows), which
  # changes neither the surfaces nor the distances between them but shrinks the distance transforms.
  union = np.argwhere(pred_mask | ref_mask)
  low, high = np.maximum(union.min(0) - 1, 0), np.minimum(union.max(0) + 2, pred_mask.shape)
  box = tuple(slice(a, b) for a, b in zip(low, high))
  pred_surface, ref_surface = _surface(pred_mask[box]), _surface(ref_mask[box])
  to_ref = scipy.ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
  to_pred = scipy.ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
  return to_ref[pred_surface], to_pred[ref_surface]


def _hausdorff(pred_to_ref, ref_to_pred, percentile) -> float:
  if pred_to_ref.size == 0:
    return float("nan")
  return float(max(np.percentile(pred_to_ref, percentile), np.percentile(ref_to_pred, percentile)))


def _assd(pred_to_ref, ref_to_pred) -> float:
  if pred_to_ref.size == 0:
    return float("nan")
  return float((pred_to_ref.sum() + ref_to_pred.sum()) / (pred_to_ref.size + ref_to_pred.size))


def hausdorff_distance(y_true, y_pred, spacing_mm: Sequence[float], percentile: float = 95) -> float:
  """Symmetric percentile Hausdorff distance in mm (HD95 by default); NaN if either mask is empty.

  Args:
    y_true: (*spatial) bool reference mask; y_pred: (*spatial) bool predicted mask, same shape.
    spacing_mm: voxel size (mm) per spatial axis.
    percentile: q in [0, 100]; 100 gives the Hausdorff distance.
  """
  if not 0 <= percentile <= 100:
    raise ValueError(f"percentile must lie in [0, 100], got {percentile}.")
  return _hausdorff(*surface_distances(y_true, y_pred, spacing_mm), percentile)


def average_surface_distance(y_true, y_pred, spacing_mm: Sequence[float]) -> float:
  """Average symmetric surface distance (ASSD) in mm; NaN if either mask is empty.
  y_true, y_pred: (*spatial) bool reference and predicted masks; spacing_mm: voxel size (mm) per axis."""
  return _assd(*surface_distances(y_true, y_pred, spacing_mm))


def segmentation_case_metrics(y_true, y_pred, num_classes: int,
                              spacing_mm: Sequence[float]) -> Dict[str, np.ndarray]:
  """All per-class metrics of one case (conventions in the module docstring).

  Args:
    y_true: (*spatial) integer reference label map in [0, num_classes).
    y_pred: (*spatial) integer predicted label map in [0, num_classes), same shape.
    num_classes: K, background (class 0) included.
    spacing_mm: voxel size (mm) per spatial axis, in the label maps' axis order.
  Returns: dict of (K,) float64 arrays: dice, iou, precision, recall (scikit-learn's f1_score, jaccard_score,
    precision_score, recall_score of the flattened maps with average=None, except NaN as above), hd95 (mm),
    assd (mm) and volume_diff_ml (predicted minus reference volume, millilitres).
  """
  ref_label = _checks.as_labels(y_true, "y_true", num_classes)
  pred_label = _checks.as_labels(y_pred, "y_pred", num_classes)
  _, _, spacing = _check_masks(ref_label, pred_label, spacing_mm)
  voxel_ml = float(np.prod(spacing)) / 1000.0
  names = ("dice", "iou", "precision", "recall", "hd95", "assd", "volume_diff_ml")
  result = {name: np.full(num_classes, np.nan) for name in names}
  for k in range(num_classes):
    pred, ref = pred_label == k, ref_label == k
    overlap, predicted, reference = float(np.sum(pred & ref)), float(pred.sum()), float(ref.sum())
    if reference > 0:
      result["dice"][k] = 2 * overlap / (predicted + reference)
      result["iou"][k] = overlap / (predicted + reference - overlap)
      result["recall"][k] = overlap / reference
    if predicted > 0:
      result["precision"][k] = overlap / predicted
    distances = surface_distances(ref, pred, spacing)
    result["hd95"][k] = _hausdorff(*distances, 95)
    result["assd"][k] = _assd(*distances)
    result["volume_diff_ml"][k] = (predicted - reference) * voxel_ml
  return result
