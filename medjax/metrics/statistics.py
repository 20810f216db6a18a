"""Uncertainty and fairness summaries of any metric (host side, numpy): bootstrap confidence intervals that
resample patients, and per-subgroup reports with the largest gap between groups."""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from medjax.metrics import _checks


def bootstrap_ci(metric_fn: Callable[..., float], *arrays, groups: Optional[np.ndarray] = None,
                 num_samples: int = 1000, seed: int = 0, alpha: float = 0.05) -> Dict[str, float]:
  """Percentile bootstrap confidence interval of `metric_fn(*arrays)` (Efron & Tibshirani 1993, ch. 13).

  Args:
    metric_fn: fn(*arrays) -> float, e.g. `roc_auc` with arrays (y_true, y_score), in the metric's own
      (scikit-learn) argument order.
    *arrays: arrays sharing their first dimension N (rows = cases, or images/slices when `groups` is given),
      passed to metric_fn positionally in this order, e.g. `bootstrap_ci(roc_auc, y_true, y_score)`.
    groups: optional (N,) group id per row (patient id). Whole groups are resampled with replacement, so rows
      of one patient stay together and the interval reflects patient-level variability; otherwise rows are.
    num_samples: bootstrap replicates; seed: the numpy Generator seed (same seed, same interval).
    alpha: 1 - confidence level; the interval is the alpha/2 and 1 - alpha/2 percentiles of the replicates.
  Returns: {"value": metric on all data, "low", "high", "num_samples": replicates whose metric was finite}.
    Replicates where the metric is NaN (e.g. a resample with one class for AUC) are left out; low/high are
    NaN if none is finite.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array.")
  if int(num_samples) < 1 or not 0.0 < alpha < 1.0:
    raise ValueError(f"bootstrap_ci: need num_samples >= 1 and 0 < alpha < 1, got {num_samples}, {alpha}.")
  arrays = tuple(np.asarray(a) for a in arrays)
  named = {f"arrays[{i}]": a for i, a in enumerate(arrays)}
  if groups is not None:
    named["groups"] = np.asarray(groups)
  num_rows = _checks.same_length(**named)
  if groups is None:
    members = np.arange(num_rows)[:, None]  # every row is its own group
    sizes = np.ones(num_rows, np.int64)
  else:
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    members = np.split(order, np.cumsum(sizes)[:-1])
  num_groups = len(sizes)
  rng = np.random.default_rng(seed)
  replicates = np.empty(int(num_samples))
  for i in range(int(num_samples)):
    picked = rng.integers(0, num_groups, size=num_groups)
    rows = np.concatenate([members[g] for g in picked])
    replicates[i] = float(metric_fn(*(a[rows] for a in arrays)))
  finite = replicates[np.isfinite(replicates)]
  if finite.size:
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  else:
    low = high = math.nan
  return {"value": float(metric_fn(*arrays)), "low": float(low), "high": float(high),
          "num_samples": int(finite.size)}


def _python_key(value):
  return value.item() if isinstance(value, np.generic) else value


def subgroup_report(metric_fns: Mapping[str, Callable[..., float]], arrays: Sequence[np.ndarray],
                    column_values, *, min_size: int = 1) -> Dict[str, dict]:
  """Every metric per value of a metadata column (sex, site, scanner, age band), and the largest gaps.

  Args:
    metric_fns: name -> fn(*arrays) -> float, e.g. {"sensitivity": sensitivity} with arrays (y_true, y_pred).
    arrays: tuple of arrays sharing their first dimension N, passed to every metric positionally in this
      order (ground truth first for the metrics of this package).
    column_values: (N,) the metadata value of each row.
    min_size: groups with fewer rows are not scored (a metric on 3 cases is noise) and are listed under
      "skipped".
  Returns:
    {"groups": {value: {"n": rows, name: metric, ...}}, "gaps": {name: {"gap": max - min, "max_group": value,
     "min_group": value}}, "skipped": {value: rows}}. A metric that is NaN in a group is left out of that
    metric's gap; with fewer than two finite groups the gap is NaN and the groups are None.
  """
  if not metric_fns:
    raise ValueError("subgroup_report needs at least one metric.")
  arrays = tuple(np.asarray(a) for a in arrays)
  column_values = np.asarray(column_values)
  if column_values.ndim != 1:
    raise ValueError(f"column_values must be (N,), got shape {column_values.shape}.")
  _checks.same_length(column_values=column_values, **{f"arrays[{i}]": a for i, a in enumerate(arrays)})
  if column_values.dtype.kind == "f" and np.isnan(column_values).any():
    raise ValueError("column_values contains NaN; fill missing metadata with an explicit value such as -1.")
  groups, skipped = {}, {}
  for value in np.unique(column_values):
    rows = np.flatnonzero(column_values == value)
    key = _python_key(value)
    if rows.size < min_size:
      skipped[key] = int(rows.size)
      continue
    subset = tuple(a[rows] for a in arrays)
    groups[key] = {"n": int(rows.size), **{name: float(fn(*subset)) for name, fn in metric_fns.items()}}
  gaps = {}
  for name in metric_fns:
    scored = {key: metrics[name] for key, metrics in groups.items() if np.isfinite(metrics[name])}
    if len(scored) < 2:
      gaps[name] = {"gap": math.nan, "max_group": None, "min_group": None}
      continue
    max_group, min_group = max(scored, key=scored.get), min(scored, key=scored.get)
    gaps[name] = {"gap": scored[max_group] - scored[min_group], "max_group": max_group, "min_group": min_group}
  return {"groups": groups, "gaps": gaps, "skipped": skipped}
