"""Regression and agreement metrics (host side, numpy)."""

from __future__ import annotations

from typing import Dict

import numpy as np

from medjax.metrics import _checks


def regression_metrics(y_true, y_pred) -> Dict[str, float]:
  """Error, correlation and Bland-Altman agreement of predictions with a reference measurement.

  Args:
    y_true: (N,) finite reference values (the target), e.g. ejection fraction %, age in years, volume in ml.
    y_pred: (N,) finite predictions in the same unit.
  Returns (in the unit of the inputs, except pearson_r): mae, rmse (scikit-learn's
    `mean_absolute_error(y_true, y_pred)`, `root_mean_squared_error(y_true, y_pred)`), pearson_r (NaN when
    either side is constant), bland_altman_bias = mean(y_pred - y_true) (positive: predictions too high),
    loa_low / loa_high = bias -/+ 1.96 * SD(y_pred - y_true) (sample SD, N - 1; Bland & Altman, Lancet 1986;
    NaN for N = 1).
  """
  target = _checks.as_scores(y_true, "y_true", ndim=1)
  pred = _checks.as_scores(y_pred, "y_pred", ndim=1)
  num = _checks.same_length(y_true=target, y_pred=pred)
  diff = pred - target
  centred_pred, centred_target = pred - pred.mean(), target - target.mean()
  scale = np.sqrt(np.sum(centred_pred**2) * np.sum(centred_target**2))
  pearson = float(np.sum(centred_pred * centred_target) / scale) if scale > 0 else float("nan")
  bias = float(diff.mean())
  spread = 1.96 * float(diff.std(ddof=1)) if num > 1 else float("nan")
  return {"mae": float(np.abs(diff).mean()), "rmse": float(np.sqrt(np.mean(diff**2))), "pearson_r": pearson,
          "bland_altman_bias": bias, "loa_low": bias - spread, "loa_high": bias + spread}
