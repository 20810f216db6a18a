"""Segmentation evaluator: per-class and mean foreground Dice over cases."""

from __future__ import annotations

import warnings
from typing import Dict

import numpy as np

from medjax import metrics
from medjax.evaluators.base import EVALUATORS
from medjax.typing import Metrics


@EVALUATORS.register("segmentation")
class SegmentationEvaluator:
  """Dice per foreground class (mean over cases whose reference contains the class) and their mean.

  Metric names: "dice_mean", "dice/<class name>", "dice_case_mean" (mean over cases of each case's mean
  foreground Dice).
  """

  def __init__(self, info, include_background: bool = False):
    self.class_names = tuple(info.class_names)
    self.first_class = 0 if include_background else 1

  def stats_fn(self, outputs, aux, batch) -> Dict[str, object]:
    del aux
    return {"counts": metrics.segmentation_counts(outputs, batch["label"])}

  def summarize(self, stats) -> Metrics:
    dice = metrics.dice_per_case(stats["counts"])[:, self.first_class:]
    names = self.class_names[self.first_class:]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (class never present) stay NaN
      per_class = np.nanmean(dice, axis=0)
      per_case = np.nanmean(dice, axis=1)
    result = {f"dice/{name}": float(value) for name, value in zip(names, per_class)}
    result["dice_mean"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    result["dice_case_mean"] = float(np.nanmean(per_case)) if np.isfinite(per_case).any() else float("nan")
    result["num_cases"] = float(dice.shape[0])
    return result
