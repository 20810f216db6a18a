"""Regression evaluator: MAE, RMSE and Pearson r of scalar (or per-target) predictions."""

from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics
from medjax.evaluators import reporting
from medjax.evaluators.base import EVALUATORS, check_shapes, input_checks, raise_on_bad_input
from medjax.typing import Metrics

_WHAT = "regression evaluator"


@EVALUATORS.register("regression")
class RegressionEvaluator:
  """Metrics of `metrics.regression_metrics` (mae, rmse, pearson_r, ...) over all cases, plus num_cases.

  Outputs (B,) or (B, T) predictions, or (B, 1) for a scalar target; batch["label"] (B,) or (B, T) the
  targets, in the same units (e.g. age in years, ejection fraction in %). With T > 1 targets, the metrics
  pool every (case, target) value.

  Args:
    info: the dataset's `DatasetInfo` (unused beyond the interface every evaluator shares).
  """

  def __init__(self, info=None):
    del info

  def stats_fn(self, outputs, aux, batch) -> Dict[str, jax.Array]:
    del aux
    targets = batch["label"]
    if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
      outputs = outputs[..., 0]
    check_shapes(outputs.shape, targets.shape, "predictions shaped like the targets (B,) or (B, T), or "
                 "(B, 1) for targets (B,)", _WHAT, outputs.shape == targets.shape)
    return {"pred": outputs.astype(jnp.float32), "target": targets.astype(jnp.float32),
            **input_checks(outputs, None, None)}

  def _checked(self, stats, ids=None):
    raise_on_bad_input(stats, _WHAT, None, ids)
    pred, target = np.asarray(stats["pred"], np.float64), np.asarray(stats["target"], np.float64)
    if pred.shape != target.shape:
      raise ValueError(f"{_WHAT}: predictions {pred.shape} and targets {target.shape} differ in shape.")
    for name, values in (("predictions", pred), ("targets", target)):
      if not np.all(np.isfinite(values)):
        bad = ~np.all(np.isfinite(values.reshape(len(values), -1)), axis=1)
        raise ValueError(f"{_WHAT}: {int(bad.sum())} of {len(bad)} cases have NaN/inf {name} "
                         f"(first at position {int(np.argmax(bad))}).")
    return pred, target

  @staticmethod
  def _summarize(pred, target) -> Metrics:
    result = dict(metrics.regression_metrics(target.reshape(-1), pred.reshape(-1)))
    result["num_cases"] = float(len(pred))
    return result

  def summarize(self, stats) -> Metrics:
    return self._summarize(*self._checked(stats))

  def report(self, stats, ids: Sequence, metadata=None, *, num_samples: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> dict:
    """Metrics with bootstrap CIs, the per-case table (prediction, target, error), subgroups, and the
    scatter data under curves["scatter"]."""
    pred, target = self._checked(stats, ids)
    columns = {"prediction": pred, "target": target, "error": pred - target}
    return reporting.build_report(
        task="regression", summarize=self._summarize, arrays=(pred, target), ids=ids, case_columns=columns,
        metadata=metadata, curves={"scatter": {"prediction": pred.reshape(-1), "target": target.reshape(-1)}},
        num_samples=num_samples, seed=seed, alpha=alpha, skip_ci=("num_cases",))
