"""The parts of an evaluation report that every task shares: bootstrap CIs, the per-case table, subgroups.

A report is a JSON-ready dict:

  "task"          "classification" | "segmentation" | "regression"
  "metrics"       {name: {"value", "low", "high"}}: the split's metric and its bootstrap percentile interval
  "bootstrap"     {"num_samples", "alpha", "seed", "unit": "patient" | "case", "num_units"}
  "cases"         [{"id": ..., <per-case values>, <metadata columns>}], one row per case in split order
  "subgroups"     {column: {group: {"num_cases", <metric>: value}}} for each usable metadata column
  "subgroups_skipped"  {column: reason} for metadata columns that could not be used (documented below)
  "curves"        task-specific plot data (ROC / PR / calibration / confusion matrix for classification)

Non-finite numbers (a class absent from every case, an infinite Hausdorff distance) become None in JSON.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax import metrics

# Metadata columns holding the patient of each case: the bootstrap then resamples patients, not cases, so
# several images of one patient stay together (Efron & Tibshirani 1993, ch. 8, resampling the independent
# units).
PATIENT_COLUMNS = ("patient_id", "patient")
MISSING = "(missing)"
MAX_GROUPS = 20


def json_safe(value: Any) -> Any:
  """numpy scalars/arrays -> Python numbers/lists; NaN and inf -> None; dict keys -> str."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _is_missing(value: Any) -> bool:
  if value is None:
    return True
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return True
  return isinstance(value, (str, bytes)) and not value.strip()


def _as_text(value: Any) -> str:
  if isinstance(value, bytes):
    value = value.decode()
  if isinstance(value, np.generic):
    value = value.item()
  return MISSING if _is_missing(value) else str(value)


def check_metadata(metadata: Optional[Mapping[str, Sequence]], num_cases: int) -> Dict[str, list]:
  """Metadata columns as lists of length `num_cases`; raises ValueError naming a column of another length."""
  columns = {}
  for name, values in (metadata or {}).items():
    values = list(np.asarray(values, dtype=object).reshape(-1)) if not isinstance(values, list) else values
    if len(values) != num_cases:
      raise ValueError(f"report: metadata column {name!r} has {len(values)} values for {num_cases} cases.")
    columns[str(name)] = values
  return columns


def patient_groups(columns: Mapping[str, list]) -> Tuple[Optional[np.ndarray], str]:
  """(group index per case, unit name) from the first patient column; (None, "case") without one.

  Patients are numbered in order of first appearance, so the resamples do not depend on the ids' type.
  Cases with a missing patient id count as their own patient.
  """
  for name in PATIENT_COLUMNS:
    if name in columns:
      keys = [f"case#{i}" if _is_missing(v) else _as_text(v) for i, v in enumerate(columns[name])]
      first_seen: Dict[str, int] = {}
      return np.asarray([first_seen.setdefault(k, len(first_seen)) for k in keys]), "patient"
  return None, "case"


def bootstrap_metrics(summarize: Callable[..., Dict[str, float]], arrays: Sequence[np.ndarray],
                      groups: Optional[np.ndarray], *, num_samples: int, seed: int, alpha: float,
                      skip: Sequence[str] = ()) -> Dict[str, Dict[str, Optional[float]]]:
  """{metric: {"value", "low", "high"}}: `summarize(*arrays)` with a percentile bootstrap interval.

  Every metric is resampled with the same seed, so all intervals come from the same resamples; metrics in
  `skip` (counts) get value only.
  """
  point = summarize(*arrays)
  cache: Dict[bytes, Dict[str, float]] = {}

  def shared(*resampled):
    # bootstrap_ci is called once per metric with the same seed, so the resamples repeat; summarising each
    # resample once and caching it makes the cost one summary per resample rather than one per metric.
    digest = hashlib.blake2b(digest_size=16)
    for array in resampled:
      digest.update(np.ascontiguousarray(array).tobytes())
    key = digest.digest()
    if key not in cache:
      cache[key] = summarize(*resampled)
    return cache[key]

  result = {}
  for name, value in point.items():
    if name in skip or num_samples <= 0:
      result[name] = {"value": value, "low": None, "high": None}
      continue
    ci = metrics.bootstrap_ci(lambda *a, name=name: shared(*a)[name], *arrays, groups=groups,
                              num_samples=num_samples, seed=seed, alpha=alpha)
    result[name] = {"value": value, "low": float(ci["low"]), "high": float(ci["high"])}
  return result


def subgroups(summarize: Callable[..., Dict[str, float]], arrays: Sequence[np.ndarray],
              columns: Mapping[str, list], *, min_size: int = 1,
              max_groups: int = MAX_GROUPS) -> Tuple[dict, Dict[str, str]]:
  """Metrics per value of each metadata column, and the columns skipped with the reason.

  Documented results for columns that cannot be used: a column whose values are all missing (None, NaN,
  empty string) is skipped with reason "no values"; a column with more than `max_groups` distinct values
  (a continuous variable such as age) is skipped with reason "N distinct values; bin it first". Patient-id
  columns are never used as subgroups. Missing values within a usable column form the group "(missing)".
  """
  names = list(summarize(*arrays))
  metric_fns = {name: (lambda *a, name=name: summarize(*a)[name]) for name in names if name != "num_cases"}
  report, skipped = {}, {}
  for column, values in columns.items():
    if column in PATIENT_COLUMNS:
      continue
    if all(_is_missing(v) for v in values):
      skipped[column] = "no values"
      continue
    text = np.asarray([_as_text(v) for v in values])
    distinct = np.unique(text)
    if len(distinct) > max_groups:
      skipped[column] = f"{len(distinct)} distinct values; bin it first"
      continue
    report[column] = metrics.subgroup_report(metric_fns, tuple(arrays), text, min_size=min_size)
  return report, skipped


def build_report(*, task: str, summarize: Callable[..., Dict[str, float]], arrays: Sequence[np.ndarray],
                 ids: Sequence, case_columns: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, Sequence]],
                 curves: Mapping[str, Any], num_samples: int, seed: int, alpha: float,
                 skip_ci: Sequence[str] = ()) -> dict:
  """Assembles the report dict described in the module docstring (already JSON-safe).

  Args:
    task: the evaluator's task name.
    summarize: fn(*arrays) -> metrics; the same numbers `Evaluator.summarize` gives for the whole split.
    arrays: per-case arrays (N, ...) that the bootstrap and the subgroups resample / split by rows.
    ids: (N,) case ids in split order.
    case_columns: {column: (N,) or (N, K) per-case values} for the per-case table.
    metadata: {column: (N,) values} (patient id, sex, site, ...), or None.
    curves: plot data, stored as given.
  """
  num_cases = len(ids)
  for i, array in enumerate(arrays):
    if len(array) != num_cases:
      raise ValueError(f"report: {num_cases} ids but per-case array {i} has {len(array)} rows.")
  columns = check_metadata(metadata, num_cases)
  groups, unit = patient_groups(columns)
  ci = bootstrap_metrics(summarize, arrays, groups, num_samples=num_samples, seed=seed, alpha=alpha,
                         skip=skip_ci)
  subgroup_metrics, skipped = subgroups(summarize, arrays, columns)
  cases = []
  for i, case_id in enumerate(ids):
    row = {"id": case_id}
    row.update({name: np.asarray(values)[i] for name, values in case_columns.items()})
    row.update({name: values[i] for name, values in columns.items()})
    cases.append(row)
  num_units = int(groups.max()) + 1 if groups is not None else num_cases
  return json_safe({
      "task": task, "metrics": ci,
      "bootstrap": {"num_samples": num_samples, "alpha": alpha, "seed": seed, "unit": unit,
                    "num_units": num_units},
      "cases": cases, "subgroups": subgroup_metrics, "subgroups_skipped": skipped, "curves": dict(curves)})
