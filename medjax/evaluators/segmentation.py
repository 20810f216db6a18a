"""Segmentation evaluator: per-class and mean foreground Dice and IoU over cases; optional HD95 / ASSD."""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from medjax import metrics
from medjax.evaluators import reporting
from medjax.evaluators.base import EVALUATORS, check_shapes, input_checks, raise_on_bad_input
from medjax.typing import Metrics

SURFACE_METRICS = ("hd95", "assd")
_WHAT = "segmentation evaluator"


def _nanmean(values: np.ndarray, axis=None):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices (class never present) stay NaN
    return np.nanmean(values, axis=axis)


def _scalar(value) -> float:
  return float(value) if np.isfinite(value) else float("nan")


@EVALUATORS.register("segmentation")
class SegmentationEvaluator:
  """Overlap metrics per foreground class, each the mean over the cases whose reference contains the class.

  Metric names: "dice/<class>", "dice_mean" (mean over classes), "dice_case_mean" (mean over cases of each
  case's mean foreground Dice), "iou/<class>", "iou_mean", "num_cases"; with `surface_metrics=True` also
  "hd95/<class>", "hd95_mean", "assd/<class>", "assd_mean" in mm (95th-percentile Hausdorff and average
  symmetric surface distance, Maier-Hein et al. 2024 "Metrics reloaded"), for which `stats_fn` returns the
  full argmax label map and reference of every case, so it is off by default during training.

  A class absent from a case's reference is left out of that case (NaN), as in `metrics.dice_per_case`.

  Args:
    info: the dataset's `DatasetInfo` (class names, number of classes).
    include_background: also report class 0.
    surface_metrics: compute HD95 and ASSD (host side, on full label maps).
  """

  def __init__(self, info, include_background: bool = False, surface_metrics: bool = False):
    self.class_names = tuple(info.class_names)
    self.num_classes = int(info.num_classes)
    self.first_class = 0 if include_background else 1
    self.surface_metrics = bool(surface_metrics)

  # ---------------------------------------------------------------------------------------- device

  def stats_fn(self, outputs, aux, batch) -> Dict[str, object]:
    """outputs (B, *spatial, K) logits, batch["label"] (B, *spatial) -> per-case voxel counts (B, K, 3)
    (plus the argmax (B, *spatial) int32, the reference and "spacing_mm" with `surface_metrics`)."""
    del aux
    labels = batch["label"]
    check_shapes(outputs.shape, labels.shape, f"logits (B, *spatial, {self.num_classes}) and labels "
                 "(B, *spatial)", _WHAT, outputs.shape[:-1] == labels.shape and outputs.shape[-1] == self.num_classes)
    stats = {"counts": metrics.segmentation_counts(labels, outputs),
             **input_checks(outputs, labels, self.num_classes)}
    if self.surface_metrics:
      stats["prediction"] = jnp.argmax(outputs, axis=-1).astype(jnp.int32)
      stats["reference"] = labels.astype(jnp.int32)
      spatial = labels.shape[1:]
      stats["spacing_mm"] = batch.get("spacing_mm", jnp.ones((labels.shape[0], len(spatial)), jnp.float32))
    return stats

  # ---------------------------------------------------------------------------------------- host

  def case_values(self, stats, ids: Optional[Sequence] = None) -> Dict[str, np.ndarray]:
    """Per-case metrics of the reported classes: {"dice": (N, C), "iou": (N, C)[, "hd95", "assd",
    "volume_diff_ml": (N, C)]}, NaN where the class is absent from the case's reference."""
    raise_on_bad_input(stats, _WHAT, self.num_classes, ids)
    counts = np.asarray(stats["counts"], np.float64)
    if counts.ndim != 3 or counts.shape[1:] != (self.num_classes, 3):
      raise ValueError(f"{_WHAT}: counts must be (N, {self.num_classes}, 3), got {counts.shape}.")
    dice = metrics.dice_per_case(counts)
    intersection, predicted, reference = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = np.where(reference > 0, intersection / (predicted + reference - intersection), np.nan)
    values = {"dice": dice, "iou": iou}
    if self.surface_metrics:
      per_case = [metrics.segmentation_case_metrics(r, p, self.num_classes, s) for p, r, s in
                  zip(stats["prediction"], stats["reference"], stats["spacing_mm"])]
      for key in (*SURFACE_METRICS, "volume_diff_ml"):
        values[key] = np.stack([np.asarray(case[key], np.float64) for case in per_case])
    return {key: value[:, self.first_class:] for key, value in values.items()}

  @property
  def reported_names(self) -> Sequence[str]:
    return self.class_names[self.first_class:]

  def summarize_values(self, values: Dict[str, np.ndarray]) -> Metrics:
    """The metrics from `case_values` output (also what the bootstrap resamples)."""
    result = {}
    for key in ("dice", "iou", *(SURFACE_METRICS if "hd95" in values else ())):
      per_class = _nanmean(values[key], axis=0)
      result.update({f"{key}/{name}": _scalar(v) for name, v in zip(self.reported_names, per_class)})
      result[f"{key}_mean"] = _scalar(_nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    per_case = _nanmean(values["dice"], axis=1)
    result["dice_case_mean"] = _scalar(_nanmean(per_case)) if np.isfinite(per_case).any() else float("nan")
    result["num_cases"] = float(values["dice"].shape[0])
    return result

  def summarize(self, stats) -> Metrics:
    return self.summarize_values(self.case_values(stats))

  def report(self, stats, ids: Sequence, metadata=None, *, num_samples: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> dict:
    """Metrics with bootstrap CIs, the per-case table, subgroups; see `reporting.build_report`."""
    values = self.case_values(stats, ids)
    keys = list(values)  # dice, iou[, hd95, assd, volume_diff_ml]
    columns = {}
    for key in keys:
      columns.update({f"{key}/{name}": values[key][:, c] for c, name in enumerate(self.reported_names)})
    columns["dice_case_mean"] = _nanmean(values["dice"], axis=1)
    summarize = lambda *arrays: self.summarize_values(dict(zip(keys, arrays)))
    return reporting.build_report(
        task="segmentation", summarize=summarize, arrays=tuple(values[k] for k in keys), ids=ids,
        case_columns=columns, metadata=metadata, curves={}, num_samples=num_samples, seed=seed, alpha=alpha,
        skip_ci=("num_cases",))
