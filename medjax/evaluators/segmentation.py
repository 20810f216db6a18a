"""Segmentation evaluator: per-class and mean foreground Dice and IoU over cases, generalized Dice, empty-mask
counts; optional HD95 / ASSD / NSD. Softmax label maps or sigmoid multi-label regions (BraTS)."""

from __future__ import annotations

import math
import warnings
from typing import Dict, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from medjax import metrics
from medjax.evaluators import reporting
from medjax.evaluators.base import EVALUATORS, check_shapes, input_checks, raise_on_bad_input
from medjax.metrics import overlap
from medjax.typing import Metrics

SURFACE_METRICS = ("hd95", "assd", "nsd")
COUNT_METRICS = ("num_both_empty", "num_false_positive_cases")
_VOXEL_KEYS = ("reference_voxels", "predicted_voxels")  # per-case counts behind COUNT_METRICS, not reported
_WHAT = "segmentation evaluator"


def _nanmean(values: np.ndarray, axis=None):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices (class never present) stay NaN
    return np.nanmean(values, axis=axis)


def _scalar(value) -> float:
  return float(value)


def _text(value: float) -> str:
  return "NaN (left out of the means)" if math.isnan(value) else f"{value:g}"


@EVALUATORS.register("segmentation")
class SegmentationEvaluator:
  """Overlap metrics per foreground class, each the mean over the cases where it is defined.

  Metric names: "dice/<class>", "dice_mean" (mean over classes), "dice_case_mean" (mean over cases of each
  case's mean foreground Dice), "iou/<class>", "iou_mean", "generalized_dice" (mean over cases of the
  generalized Dice score over the reported classes, Sudre et al. 2017), "num_both_empty/<class>" (cases
  whose reference and prediction lack the class), "num_false_positive_cases/<class>" (cases predicting the
  class on an empty reference) and "num_cases"; with `surface_metrics=True` also "hd95/<class>",
  "hd95_mean", "assd/<class>", "assd_mean" in mm (95th-percentile Hausdorff and average symmetric surface
  distance, Maier-Hein et al. 2024 "Metrics reloaded") and "nsd/<class>", "nsd_mean" (normalized surface
  Dice at `nsd_tolerance_mm`, Nikolov et al. 2021), for which `stats_fn` returns the full label maps of
  every case, so they are off by default during training.

  Empty masks (table in `medjax.metrics.overlap`): a case whose reference and prediction both lack a class
  scores `empty_score` for Dice, IoU and NSD (default NaN: left out of that class's mean); a prediction on an
  empty reference scores `false_positive_score` (default 0, as nnU-Net; "nan" leaves it out as MONAI's
  DiceMetric(ignore_empty=True)); a missed reference scores 0. HD95 / ASSD are `empty_distance` when exactly
  one mask is empty (default NaN; "inf") and NaN when both are. The report states the convention.

  Labels (B, *spatial) with logits (B, *spatial, K) are a softmax label map (prediction: argmax). Labels
  (B, *spatial, K) with the logits' shape are overlapping region masks (BraTS tumour core, whole tumour,
  enhancing tumour), one sigmoid per channel, predicted where sigmoid >= `threshold`; `include_background`
  then decides about channel 0 as MONAI's (a single channel is always kept). An optional boolean
  batch["mask"] (B, *spatial) restricts every metric to the voxels where it is true (cases padded to a
  common shape).

  Args:
    info: the dataset's `DatasetInfo` (class names, number of classes).
    include_background: also report class (channel) 0.
    surface_metrics: compute HD95, ASSD and NSD (host side, on full label maps).
    empty_score: Dice / IoU / NSD of a case with the class in neither reference nor prediction: "nan", 0, 1.
    false_positive_score: Dice / IoU / NSD of a prediction on an empty reference: 0.0 or "nan".
    empty_distance: HD95 / ASSD when exactly one mask is empty: "nan" or "inf".
    nsd_tolerance_mm: NSD tolerance in mm: one number, one per reported class, or {class name: mm}.
    threshold: probability threshold of the sigmoid outputs (multi-label regions only).
  """

  def __init__(self, info, include_background: bool = False, surface_metrics: bool = False,
               empty_score: overlap.Score = "nan", false_positive_score: overlap.Score = 0.0,
               empty_distance: overlap.Score = "nan",
               nsd_tolerance_mm: Union[float, Sequence[float], Mapping[str, float]] = 1.0, threshold: float = 0.5):
    self.class_names = tuple(info.class_names)
    self.num_classes = int(info.num_classes)
    # A single sigmoid channel is the foreground itself; MONAI ignores include_background=False there too.
    self.first_class = 0 if include_background or self.num_classes == 1 else 1
    self.surface_metrics = bool(surface_metrics)
    try:
      self.empty_score = "nan" if math.isnan(overlap.empty_score_value(empty_score)) else float(empty_score)
      fp_value = overlap.false_positive_score_value(false_positive_score)
      self.false_positive_score = "nan" if math.isnan(fp_value) else 0.0
      self.empty_distance = str(overlap.empty_distance_value(empty_distance))
    except ValueError as error:
      raise ValueError(f"{_WHAT}: {error}") from None
    if not 0.0 < float(threshold) < 1.0:
      raise ValueError(f"{_WHAT}: threshold must lie in (0, 1), got {threshold}.")
    self.threshold = float(threshold)
    self.nsd_tolerance_mm = self._tolerances(nsd_tolerance_mm)

  def _tolerances(self, value) -> Dict[str, float]:
    """{reported class name: tolerance mm} from a number, a sequence over reported classes or a mapping."""
    names = self.reported_names
    if hasattr(value, "items"):
      value = dict(value.items())
      unknown = sorted(set(value) - set(names))
      missing = [n for n in names if n not in value]
      if unknown or missing:
        raise ValueError(f"{_WHAT}: nsd_tolerance_mm must give one tolerance per reported class {names}; "
                         f"unknown {unknown}, missing {missing}.")
      tolerances = [value[n] for n in names]
    elif np.ndim(value) == 0:
      tolerances = [value] * len(names)
    else:
      tolerances = list(value)
      if len(tolerances) != len(names):
        raise ValueError(f"{_WHAT}: nsd_tolerance_mm must be one number, one per reported class {names} or a "
                         f"{{class: mm}} dict, got {value!r}.")
    result = {}
    for name, tolerance in zip(names, tolerances):
      number = not isinstance(tolerance, bool) and isinstance(tolerance, (int, float, np.number))
      if not number or not 0 <= tolerance < math.inf:
        raise ValueError(f"{_WHAT}: nsd_tolerance_mm of {name!r} must be a finite number >= 0 (mm), "
                         f"got {tolerance!r}.")
      result[name] = float(tolerance)
    return result

  # ---------------------------------------------------------------------------------------- device

  def stats_fn(self, outputs, aux, batch) -> Dict[str, object]:
    """outputs (B, *spatial, K) logits, batch["label"] (B, *spatial) classes or (B, *spatial, K) region masks,
    optional batch["mask"] (B, *spatial) -> per-case voxel counts (B, K, 3) (plus, with `surface_metrics`, the
    prediction and reference maps, "spacing_mm" and the mask)."""
    del aux
    labels, mask = batch["label"], batch.get("mask")
    k = self.num_classes
    multilabel = labels.ndim == outputs.ndim
    if multilabel:
      check_shapes(outputs.shape, labels.shape, f"logits (B, *spatial, {k}) and label maps (B, *spatial) or "
                   f"region masks (B, *spatial, {k})", _WHAT, outputs.shape == labels.shape and outputs.shape[-1] == k)
    else:
      check_shapes(outputs.shape, labels.shape, f"logits (B, *spatial, {k}) and labels (B, *spatial)", _WHAT,
                   outputs.shape[:-1] == labels.shape and outputs.shape[-1] == k)
    spatial_shape = outputs.shape[:-1]
    checked = labels
    if mask is not None:
      if tuple(mask.shape) != tuple(spatial_shape):
        raise ValueError(f"{_WHAT}: batch['mask'] of shape {tuple(mask.shape)} does not fit outputs of shape "
                         f"{tuple(outputs.shape)}; expected (B, *spatial) {tuple(spatial_shape)}.")
      mask = mask != 0
      checked = jnp.where(mask[..., None] if multilabel else mask, labels, 0)  # padding labels are not checked
    if multilabel:
      counts = metrics.multilabel_segmentation_counts(labels, outputs, self.threshold, mask)
    else:
      counts = metrics.segmentation_counts(labels, outputs, mask)
    stats = {"counts": counts, **input_checks(outputs, checked, 2 if multilabel else k)}
    if self.surface_metrics:
      if multilabel:
        stats["prediction"] = outputs.astype(jnp.float32) >= math.log(self.threshold / (1.0 - self.threshold))
        stats["reference"] = labels != 0
      else:
        stats["prediction"] = jnp.argmax(outputs, axis=-1).astype(jnp.int32)
        stats["reference"] = labels.astype(jnp.int32)
      num_spatial = len(spatial_shape) - 1
      stats["spacing_mm"] = batch.get("spacing_mm", jnp.ones((labels.shape[0], num_spatial), jnp.float32))
      if mask is not None:
        stats["mask"] = mask
    return stats

  # ---------------------------------------------------------------------------------------- host

  @property
  def conventions(self) -> Dict[str, overlap.Score]:
    return {"empty_score": self.empty_score, "false_positive_score": self.false_positive_score,
            "empty_distance": self.empty_distance}

  def _case_surface(self, stats) -> Dict[str, np.ndarray]:
    reference, spacing = stats["reference"], np.asarray(stats["spacing_mm"])
    multilabel = np.ndim(reference) == 2 + spacing.shape[-1]
    tolerances = list(self.nsd_tolerance_mm.values())
    tolerances = ([tolerances[0]] * self.first_class) + tolerances  # channel 0's, when not reported, is unused
    masks = stats.get("mask")
    per_case = []
    for i, (pred, ref, step) in enumerate(zip(stats["prediction"], reference, spacing)):
      mask = None if masks is None else masks[i]
      if multilabel:
        per_case.append(metrics.multilabel_case_metrics(ref, pred, step, mask=mask, nsd_tolerance_mm=tolerances,
                                                        **self.conventions))
      else:
        per_case.append(metrics.segmentation_case_metrics(ref, pred, self.num_classes, step, mask=mask,
                                                          nsd_tolerance_mm=tolerances, **self.conventions))
    return {key: np.stack([np.asarray(case[key], np.float64) for case in per_case])
            for key in (*SURFACE_METRICS, "volume_diff_ml")}

  def case_values(self, stats, ids: Optional[Sequence] = None) -> Dict[str, np.ndarray]:
    """Per-case values of the reported classes: {"dice", "iou"[, "hd95", "assd", "nsd", "volume_diff_ml"],
    "reference_voxels", "predicted_voxels": (N, C), "generalized_dice": (N,)}, empty masks scored as the
    class docstring says."""
    multilabel = "reference" in stats and np.ndim(stats["reference"]) == 2 + np.shape(stats["spacing_mm"])[-1]
    raise_on_bad_input(stats, _WHAT, 2 if multilabel else self.num_classes, ids)
    counts = np.asarray(stats["counts"], np.float64)
    if counts.ndim != 3 or counts.shape[1:] != (self.num_classes, 3):
      raise ValueError(f"{_WHAT}: counts must be (N, {self.num_classes}, 3), got {counts.shape}.")
    values = {"dice": metrics.dice_per_case(counts, self.empty_score, self.false_positive_score),
              "iou": metrics.iou_per_case(counts, self.empty_score, self.false_positive_score)}
    if self.surface_metrics:
      values.update(self._case_surface(stats))
    values.update(reference_voxels=counts[..., 2], predicted_voxels=counts[..., 1])
    values = {key: value[:, self.first_class:] for key, value in values.items()}
    values["generalized_dice"] = metrics.generalized_dice_score(counts, self.first_class == 0, self.empty_score,
                                                                self.false_positive_score)
    return values

  @property
  def reported_names(self) -> Sequence[str]:
    return self.class_names[self.first_class:]

  def summarize_values(self, values: Dict[str, np.ndarray]) -> Metrics:
    """The metrics from `case_values` output (also what the bootstrap resamples)."""
    result = {}
    for key in ("dice", "iou", *(SURFACE_METRICS if "hd95" in values else ())):
      per_class = _nanmean(values[key], axis=0)
      result.update({f"{key}/{name}": _scalar(v) for name, v in zip(self.reported_names, per_class)})
      result[f"{key}_mean"] = _scalar(_nanmean(per_class)) if (~np.isnan(per_class)).any() else float("nan")
    per_case = _nanmean(values["dice"], axis=1)
    result["dice_case_mean"] = _scalar(_nanmean(per_case)) if (~np.isnan(per_case)).any() else float("nan")
    gds = values["generalized_dice"]
    result["generalized_dice"] = _scalar(_nanmean(gds)) if (~np.isnan(gds)).any() else float("nan")
    reference_empty, predicted_empty = values["reference_voxels"] == 0, values["predicted_voxels"] == 0
    both, false_positive = np.sum(reference_empty & predicted_empty, 0), np.sum(reference_empty & ~predicted_empty, 0)
    for c, name in enumerate(self.reported_names):
      result[f"num_both_empty/{name}"] = float(both[c])
      result[f"num_false_positive_cases/{name}"] = float(false_positive[c])
    result["num_cases"] = float(values["dice"].shape[0])
    return result

  def summarize(self, stats) -> Metrics:
    return self.summarize_values(self.case_values(stats))

  def convention_text(self) -> str:
    """One sentence stating the empty-mask convention (and NSD tolerances), for reports."""
    text = (f"Dice/IoU{'/NSD' if self.surface_metrics else ''}: reference and prediction both empty -> "
            f"{_text(overlap.empty_score_value(self.empty_score))}; prediction on an empty reference (false "
            f"positive) -> {_text(overlap.false_positive_score_value(self.false_positive_score))}; missed "
            "reference -> 0")
    if self.surface_metrics:
      text += (f". HD95/ASSD: exactly one mask empty -> {_text(float(self.empty_distance))}, both empty -> NaN. "
               "NSD tolerance: " + ", ".join(f"{n} {t:g} mm" for n, t in self.nsd_tolerance_mm.items()))
    return text + ". Cases per class: num_both_empty, num_false_positive_cases."

  def report(self, stats, ids: Sequence, metadata=None, *, num_samples: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> dict:
    """Metrics with bootstrap CIs, the per-case table, subgroups; see `reporting.build_report`. Adds
    "empty_mask_convention": the options, the NSD tolerances and a sentence stating them."""
    values = self.case_values(stats, ids)
    keys = list(values)
    columns = {}
    for key in keys:
      if key not in _VOXEL_KEYS and values[key].ndim == 2:
        columns.update({f"{key}/{name}": values[key][:, c] for c, name in enumerate(self.reported_names)})
    columns["dice_case_mean"] = _nanmean(values["dice"], axis=1)
    columns["generalized_dice"] = values["generalized_dice"]
    summarize = lambda *arrays: self.summarize_values(dict(zip(keys, arrays)))
    counts = [f"{prefix}/{name}" for prefix in COUNT_METRICS for name in self.reported_names]
    report = reporting.build_report(
        task="segmentation", summarize=summarize, arrays=tuple(values[k] for k in keys), ids=ids,
        case_columns=columns, metadata=metadata, curves={}, num_samples=num_samples, seed=seed, alpha=alpha,
        skip_ci=("num_cases", *counts))
    report["empty_mask_convention"] = {
        **self.conventions, "nsd_tolerance_mm": dict(self.nsd_tolerance_mm) if self.surface_metrics else None,
        "description": self.convention_text()}
    return report
