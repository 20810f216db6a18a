"""Segmentation metrics on host label maps: per-case overlap, surface distances (HD95, ASSD) and normalized
surface Dice (NSD). The on-device counts and the Dice / IoU / generalized Dice from them live in
`medjax.metrics.overlap` and are re-exported here.

Conventions (the same for every function here):
- Arguments follow scikit-learn: the reference (ground truth) `y_true` first, then the prediction `y_pred`.
- Empty masks follow the table in `medjax.metrics.overlap`: Dice, IoU and NSD score `empty_score` (default
  NaN, left out of means over cases) when reference and prediction are both empty, `false_positive_score`
  (default 0, as nnU-Net) for a prediction on an empty reference, and 0 for a missed reference. Recall is
  NaN on an empty reference and precision NaN when nothing is predicted, whatever these options.
- Surfaces are the mask minus its erosion with face connectivity (6-neighbourhood in 3D, 4 in 2D); voxels
  on the image border belong to the surface (MONAI's `get_mask_edges` without subvoxels). Distances are
  Euclidean in millimetres between voxel centres, from `scipy.ndimage.distance_transform_edt(...,
  sampling=spacing_mm)`.
- Surface distances (HD95, ASSD) are NaN when both masks are empty, and `empty_distance` when exactly one is:
  "nan" (default; the distance to an empty set is undefined and an image-size stand-in would dominate any
  mean over cases, so such cases show in the false-positive / missed counts instead) or "inf" (MONAI's
  `compute_hausdorff_distance`; any mean that includes the case is then infinite).
- HD_q = max(q-th percentile of pred->ref distances, q-th percentile of ref->pred distances), linear
  interpolation between samples (q = 100 is the Hausdorff distance); ASSD is the mean over the surface
  voxels of both masks of the distance to the other surface (Heimann et al., IEEE TMI 28(8), 2009).
- NSD at tolerance tau (Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for
  radiotherapy", JMIR 23(7), 2021) is the fraction of the surface voxels of both masks that lie within tau mm
  of the other surface: (|{d_pr <= tau}| + |{d_rp <= tau}|) / (|S_P| + |S_R|). Each surface voxel counts
  once, as in MONAI's `compute_surface_dice(use_subvoxels=False)`; DeepMind's `surface-distance` package
  (use_subvoxels=True) weighs each surface element by its area instead, which differs on oblique surfaces.
- A voxel `mask` (the real voxels of a case padded to a common shape) crops every map to the mask's
  bounding box and removes the voxels outside the mask from every class, so padding changes nothing.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.ndimage

from medjax.metrics import _checks
from medjax.metrics.overlap import (Score, apply_empty_conventions, dice_per_case, empty_distance_value,
                                    generalized_dice_score, iou_per_case, multilabel_segmentation_counts,
                                    segmentation_counts)

__all__ = [
    "average_surface_distance", "binary_case_metrics", "dice_per_case", "generalized_dice_score", "hausdorff_distance",
    "iou_per_case", "multilabel_case_metrics", "multilabel_segmentation_counts", "normalized_surface_dice",
    "segmentation_case_metrics", "segmentation_counts", "surface_distances",
]

Tolerance = Union[float, Sequence[float], None]
# Distances equal to the tolerance count as within it; this absorbs the rounding of sqrt((d * s)^2).
_TOLERANCE_SLACK = 1e-9


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


def _one_empty(ref_mask: np.ndarray, pred_mask: np.ndarray) -> Optional[bool]:
  """None when both masks have voxels, True when exactly one is empty, False when both are."""
  ref_any, pred_any = bool(ref_mask.any()), bool(pred_mask.any())
  return None if ref_any and pred_any else ref_any != pred_any


def _hausdorff(distances, percentile, one_empty, empty_distance) -> float:
  if one_empty is not None:
    return empty_distance_value(empty_distance) if one_empty else float("nan")
  pred_to_ref, ref_to_pred = distances
  return float(max(np.percentile(pred_to_ref, percentile), np.percentile(ref_to_pred, percentile)))


def _assd(distances, one_empty, empty_distance) -> float:
  if one_empty is not None:
    return empty_distance_value(empty_distance) if one_empty else float("nan")
  pred_to_ref, ref_to_pred = distances
  return float((pred_to_ref.sum() + ref_to_pred.sum()) / (pred_to_ref.size + ref_to_pred.size))


def _check_tolerance(tolerance_mm) -> float:
  tolerance = float(tolerance_mm)
  if not np.isfinite(tolerance) or tolerance < 0:
    raise ValueError(f"NSD tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}.")
  return tolerance


def _nsd(distances, tolerance, ref_mask, pred_mask, empty_score, false_positive_score) -> float:
  pred_to_ref, ref_to_pred = distances
  limit = tolerance + _TOLERANCE_SLACK * max(tolerance, 1.0)
  within = float(np.sum(pred_to_ref <= limit) + np.sum(ref_to_pred <= limit))
  score = within / (pred_to_ref.size + ref_to_pred.size) if pred_to_ref.size else 0.0
  return float(apply_empty_conventions(score, ref_mask.any(), pred_mask.any(), empty_score, false_positive_score))


def hausdorff_distance(y_true, y_pred, spacing_mm: Sequence[float], percentile: float = 95,
                       empty_distance: Score = "nan") -> float:
  """Symmetric percentile Hausdorff distance in mm (HD95 by default).

  Args:
    y_true: (*spatial) bool reference mask; y_pred: (*spatial) bool predicted mask, same shape.
    spacing_mm: voxel size (mm) per spatial axis.
    percentile: q in [0, 100]; 100 gives the Hausdorff distance.
    empty_distance: value when exactly one mask is empty: "nan" (default) or "inf". Both empty: NaN.
  """
  if not 0 <= percentile <= 100:
    raise ValueError(f"percentile must lie in [0, 100], got {percentile}.")
  ref_mask, pred_mask, spacing = _check_masks(y_true, y_pred, spacing_mm)
  distances = surface_distances(ref_mask, pred_mask, spacing)
  return _hausdorff(distances, percentile, _one_empty(ref_mask, pred_mask), empty_distance)


def average_surface_distance(y_true, y_pred, spacing_mm: Sequence[float], empty_distance: Score = "nan") -> float:
  """Average symmetric surface distance (ASSD) in mm.

  y_true, y_pred: (*spatial) bool reference and predicted masks; spacing_mm: voxel size (mm) per axis;
  empty_distance: value when exactly one mask is empty, "nan" (default) or "inf"; both empty: NaN.
  """
  ref_mask, pred_mask, spacing = _check_masks(y_true, y_pred, spacing_mm)
  distances = surface_distances(ref_mask, pred_mask, spacing)
  return _assd(distances, _one_empty(ref_mask, pred_mask), empty_distance)


def normalized_surface_dice(y_true, y_pred, spacing_mm: Sequence[float], tolerance_mm: float,
                            empty_score: Score = "nan", false_positive_score: Score = 0.0) -> float:
  """Normalized surface Dice (surface Dice at tolerance tau; definition in the module docstring).

  Args:
    y_true: (*spatial) bool reference mask; y_pred: (*spatial) bool predicted mask, same shape (2D or 3D).
    spacing_mm: voxel size (mm) per spatial axis (anisotropic spacing is honoured).
    tolerance_mm: tau >= 0 in mm; a surface voxel at distance <= tau from the other surface counts as right.
    empty_score: both masks empty -> "nan" (default), 0.0 or 1.0.
    false_positive_score: prediction on an empty reference -> 0.0 (default) or "nan". A missed reference is 0.
  Returns: NSD in [0, 1], or NaN as above.
  """
  tolerance = _check_tolerance(tolerance_mm)
  ref_mask, pred_mask, spacing = _check_masks(y_true, y_pred, spacing_mm)
  distances = surface_distances(ref_mask, pred_mask, spacing)
  return _nsd(distances, tolerance, ref_mask, pred_mask, empty_score, false_positive_score)


def binary_case_metrics(y_true, y_pred, spacing_mm: Sequence[float], *, nsd_tolerance_mm: Optional[float] = None,
                        empty_score: Score = "nan", false_positive_score: Score = 0.0,
                        empty_distance: Score = "nan") -> Dict[str, float]:
  """Every metric of one binary mask pair (one class or region of one case), surfaces computed once.

  Args:
    y_true, y_pred: (*spatial) bool reference and predicted masks.
    spacing_mm: voxel size (mm) per spatial axis.
    nsd_tolerance_mm: NSD tolerance in mm; None leaves "nsd" out.
    empty_score, false_positive_score, empty_distance: the empty-mask conventions (module docstring).
  Returns: {"dice", "iou", "precision", "recall", "hd95" (mm), "assd" (mm)[, "nsd"], "reference_voxels",
    "predicted_voxels"} as floats.
  """
  ref_mask, pred_mask, spacing = _check_masks(y_true, y_pred, spacing_mm)
  overlap, predicted, reference = float(np.sum(ref_mask & pred_mask)), float(pred_mask.sum()), float(ref_mask.sum())
  counts = np.array([[[overlap, predicted, reference]]])
  result = {"dice": float(dice_per_case(counts, empty_score, false_positive_score)[0, 0]),
            "iou": float(iou_per_case(counts, empty_score, false_positive_score)[0, 0]),
            "precision": overlap / predicted if predicted else float("nan"),
            "recall": overlap / reference if reference else float("nan")}
  distances = surface_distances(ref_mask, pred_mask, spacing)
  one_empty = _one_empty(ref_mask, pred_mask)
  result["hd95"] = _hausdorff(distances, 95, one_empty, empty_distance)
  result["assd"] = _assd(distances, one_empty, empty_distance)
  if nsd_tolerance_mm is not None:
    result["nsd"] = _nsd(distances, _check_tolerance(nsd_tolerance_mm), ref_mask, pred_mask, empty_score,
                         false_positive_score)
  result.update(reference_voxels=reference, predicted_voxels=predicted)
  return result


def _tolerances(nsd_tolerance_mm: Tolerance, num_classes: int) -> Optional[np.ndarray]:
  if nsd_tolerance_mm is None:
    return None
  tolerances = np.asarray(nsd_tolerance_mm, np.float64)
  if tolerances.ndim == 0:
    return np.full(num_classes, float(tolerances))
  if tolerances.shape != (num_classes,):
    raise ValueError(f"nsd_tolerance_mm must be one number or one per class ({num_classes}), got "
                     f"{nsd_tolerance_mm!r}.")
  return tolerances


def _crop_to_mask(mask, *maps) -> Tuple[Optional[np.ndarray], tuple]:
  """(mask cropped to its bounding box, maps cropped alike on their leading axes, voxels outside the mask
  cleared); (None, maps) without a mask. Each map is (*spatial) or (*spatial, K)."""
  if mask is None:
    return None, maps
  mask = np.asarray(mask) != 0
  for m in maps:
    if np.shape(m)[:mask.ndim] != mask.shape:
      raise ValueError(f"mask of shape {mask.shape} does not match label maps of shape {np.shape(m)}.")
  points = np.argwhere(mask)
  if points.size:
    box = tuple(slice(a, b + 1) for a, b in zip(points.min(0), points.max(0)))
  else:
    box = tuple(slice(0, 0) for _ in mask.shape)
  mask = mask[box]
  cropped = []
  for m in maps:
    m = np.asarray(m)[box]
    inside = mask.reshape(mask.shape + (1,) * (m.ndim - mask.ndim))
    cropped.append(np.where(inside, m, np.zeros((), m.dtype)))
  return mask, tuple(cropped)


_CASE_KEYS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "volume_diff_ml", "reference_voxels",
              "predicted_voxels")


def _stack(rows, spacing) -> Dict[str, np.ndarray]:
  voxel_ml = float(np.prod(spacing)) / 1000.0
  result = {key: np.array([row[key] for row in rows], np.float64) for key in _CASE_KEYS[:-3] if key in rows[0]}
  reference = np.array([row["reference_voxels"] for row in rows], np.float64)
  predicted = np.array([row["predicted_voxels"] for row in rows], np.float64)
  result.update(volume_diff_ml=(predicted - reference) * voxel_ml, reference_voxels=reference,
                predicted_voxels=predicted)
  return result


def segmentation_case_metrics(y_true, y_pred, num_classes: int, spacing_mm: Sequence[float], *, mask=None,
                              nsd_tolerance_mm: Tolerance = None, empty_score: Score = "nan",
                              false_positive_score: Score = 0.0,
                              empty_distance: Score = "nan") -> Dict[str, np.ndarray]:
  """All per-class metrics of one case (conventions in the module docstring).

  Args:
    y_true: (*spatial) integer reference label map in [0, num_classes).
    y_pred: (*spatial) integer predicted label map in [0, num_classes), same shape.
    num_classes: K, background (class 0) included.
    spacing_mm: voxel size (mm) per spatial axis, in the label maps' axis order.
    mask: optional (*spatial) bool voxels that count (see the module docstring); labels outside it are not
      checked.
    nsd_tolerance_mm: NSD tolerance (mm), one number or one per class; None leaves "nsd" out.
    empty_score, false_positive_score, empty_distance: the empty-mask conventions.
  Returns: dict of (K,) float64 arrays: dice, iou, precision, recall (scikit-learn's f1_score, jaccard_score,
    precision_score, recall_score of the flattened maps with average=None, except on empty masks as above),
    hd95 (mm), assd (mm)[, nsd], volume_diff_ml (predicted minus reference volume, millilitres) and the
    reference_voxels / predicted_voxels counts.
  """
  _checks.same_shape(y_true=y_true, y_pred=y_pred)
  mask, (y_true, y_pred) = _crop_to_mask(mask, y_true, y_pred)
  ref_label = _checks.as_labels(y_true, "y_true", num_classes)
  pred_label = _checks.as_labels(y_pred, "y_pred", num_classes)
  _, _, spacing = _check_masks(ref_label, pred_label, spacing_mm)
  tolerances = _tolerances(nsd_tolerance_mm, num_classes)
  inside = True if mask is None else mask
  rows = [binary_case_metrics((ref_label == k) & inside, (pred_label == k) & inside, spacing,
                              nsd_tolerance_mm=None if tolerances is None else tolerances[k], empty_score=empty_score,
                              false_positive_score=false_positive_score, empty_distance=empty_distance)
          for k in range(num_classes)]
  return _stack(rows, spacing)


def multilabel_case_metrics(y_true, y_pred, spacing_mm: Sequence[float], *, mask=None,
                            nsd_tolerance_mm: Tolerance = None, empty_score: Score = "nan",
                            false_positive_score: Score = 0.0,
                            empty_distance: Score = "nan") -> Dict[str, np.ndarray]:
  """`segmentation_case_metrics` for overlapping regions: one binary mask per channel.

  Args:
    y_true, y_pred: (*spatial, K) bool (or 0/1) reference and predicted region masks (e.g. BraTS tumour core,
      whole tumour, enhancing tumour; the prediction thresholded from sigmoid outputs).
    spacing_mm, mask, nsd_tolerance_mm, empty_score, false_positive_score, empty_distance: as there.
  Returns: dict of (K,) float64 arrays with the keys of `segmentation_case_metrics`.
  """
  ref, pred = _checks.as_binary(y_true, "y_true"), _checks.as_binary(y_pred, "y_pred")
  _checks.same_shape(y_true=ref, y_pred=pred)
  _, (ref, pred) = _crop_to_mask(mask, ref, pred)
  num_channels = ref.shape[-1]
  _, _, spacing = _check_masks(ref[..., 0], pred[..., 0], spacing_mm)
  tolerances = _tolerances(nsd_tolerance_mm, num_channels)
  rows = [binary_case_metrics(ref[..., k], pred[..., k], spacing,
                              nsd_tolerance_mm=None if tolerances is None else tolerances[k], empty_score=empty_score,
                              false_positive_score=false_positive_score, empty_distance=empty_distance)
          for k in range(num_channels)]
  return _stack(rows, spacing)

