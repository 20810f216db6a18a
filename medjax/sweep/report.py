"""The sweep report: results.csv, results.md (one row per trial, k-fold mean and std), metric_vs_<key>.png.

Rows come from `trials.trial_summary` (results.json of each trial, metrics.jsonl as the fallback). For
cross-validation, trials whose overrides differ only in `data.fold` form one configuration; its row gives the
mean and the sample standard deviation (ddof=1) over the folds that finished.

Plots take their x axis from sweep.json's "axes" (`space.plot_axes` of the sweep, or the optuna study's
distributions): a log axis with decade labels ("1e-4", "1e-3") over the range of a log-uniform parameter,
a linear one over the range of a uniform or integer one, categories for a choice or a grid's list of values.
A key with no recorded axis (a sweep.json from before axes were recorded) is linear when its values are
numbers, else categorical: its scale is never guessed from how widely the values spread.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from medjax.sweep import trials as trials_lib

FOLD_KEYS = ("data.fold",)
_NOT_PLOTTED = ("data.fold", "data.num_folds")


def collect(workdir: str, metric: str, mode: str) -> List[Dict[str, Any]]:
  """One summary per trial of the sweep in `workdir`, in sweep order."""
  return _rows(trials_lib.read_sweep(workdir), metric, mode)


def _rows(doc: Mapping[str, Any], metric: str, mode: str) -> List[Dict[str, Any]]:
  return [trials_lib.trial_summary(r, metric, mode) for r in doc["trials"]]


def _fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return trials_lib.value_text(value)


def swept_keys(rows: Sequence[Mapping[str, Any]]) -> List[str]:
  """Override keys in first-seen order."""
  keys: List[str] = []
  for row in rows:
    keys += [k for k in row["overrides"] if k not in keys]
  return keys


def kfold_groups(rows: Sequence[Mapping[str, Any]], mode: str) -> List[Dict[str, Any]]:
  """Mean and std of the best metric per configuration (trials equal up to `data.fold`), best first."""
  groups: Dict[str, Dict[str, Any]] = {}
  for row in rows:
    if not any(k in row["overrides"] for k in FOLD_KEYS):
      continue
    config = {k: v for k, v in row["overrides"].items() if k not in FOLD_KEYS}
    group = groups.setdefault(trials_lib.trial_name(config), dict(overrides=config, values=[], folds=0))
    group["folds"] += 1
    if row["status"] in trials_lib.DONE and row["best"] is not None:
      group["values"].append(row["best"])
  result = []
  for name, group in groups.items():
    values = np.asarray(group["values"], float)
    result.append(dict(name=name, overrides=group["overrides"], folds_done=len(values), folds=group["folds"],
                       mean=float(values.mean()) if len(values) else None,
                       std=float(values.std(ddof=1)) if len(values) > 1 else None))
  sign = -1.0 if mode == "max" else 1.0
  return sorted(result, key=lambda g: (g["mean"] is None, sign * (g["mean"] or 0.0)))


def _md_cell(value: Any) -> str:
  return _fmt(value).replace("|", "\\|").replace("\n", " ")


def write_report(workdir: str, metric: str, mode: str) -> Dict[str, Any]:
  """Writes results.csv, results.md and the plots into `workdir`; returns rows, k-fold groups, paths."""
  doc = trials_lib.read_sweep(workdir)
  rows, axes = _rows(doc, metric, mode), doc.get("axes") or {}
  keys = swept_keys(rows)
  header = ["name", "status", *keys, f"best {metric}", "best step", f"final {metric}", "wall s", "error"]
  table = [[row["name"], row["status"], *[row["overrides"].get(k) for k in keys], row["best"],
            row["best_step"], row["final"], row["wall_s"], row["error"]] for row in rows]
  csv_path = os.path.join(workdir, "results.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([[_fmt(v) if not isinstance(v, float) else repr(v) for v in line] for line in table])

  lines = [f"# Sweep results ({metric}, {mode})", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_md_cell(v) for v in line) + " |" for line in table]
  groups = kfold_groups(rows, mode)
  if groups:
    lines += ["", f"## Cross-validation: best {metric} over folds (mean, sample std)", "",
              "| configuration | folds done | mean | std |", "|---|---|---|---|"]
    lines += [f"| {_md_cell(g['name'])} | {g['folds_done']}/{g['folds']} | {_md_cell(g['mean'])} | "
              f"{_md_cell(g['std'])} |" for g in groups]
  md_path = os.path.join(workdir, "results.md")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  plots = [plot_metric(workdir, rows, key, metric, axes.get(key)) for key in keys if key not in _NOT_PLOTTED
           and len({trials_lib.value_text(r["overrides"].get(key)) for r in rows}) > 1]
  return dict(rows=rows, kfold=groups, csv=csv_path, markdown=md_path, plots=[p for p in plots if p])


def plot_metric(workdir: str, rows: Sequence[Mapping[str, Any]], key: str, metric: str,
                axis: Optional[Mapping[str, Any]] = None) -> Optional[str]:
  """`metric_vs_<key>.png`: each finished trial's best metric against its value of `key` (None if none)."""
  fig = metric_figure(rows, key, metric, axis)
  if fig is None:
    return None
  path = os.path.join(workdir, f"metric_vs_{trials_lib.safe_text(key)}.png")
  fig.savefig(path)
  return path


def metric_figure(rows: Sequence[Mapping[str, Any]], key: str, metric: str,
                  axis: Optional[Mapping[str, Any]] = None):
  """The figure of `plot_metric` (a matplotlib Figure on an Agg canvas), or None when no trial finished.

  `axis` is the key's entry of sweep.json's "axes": {"scale": "log" | "linear" | "categorical", "range":
  [lo, hi]} (see the module docstring for a missing one).
  """
  # The Agg canvas directly: no global backend switch inside a library.
  from matplotlib import ticker
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  points = [(r["overrides"][key], r["best"]) for r in rows
            if key in r["overrides"] and r["best"] is not None and r["status"] in trials_lib.DONE]
  if not points:
    return None
  xs, ys = zip(*points)
  numeric = all(_is_number(x) for x in xs)
  scale = (axis or {}).get("scale") or ("linear" if numeric else "categorical")
  if scale != "categorical" and not numeric:
    scale = "categorical"  # values a numeric axis cannot place (a space changed since): still shown
  elif scale == "log" and min(xs) <= 0:
    scale = "linear"
  value_range = (axis or {}).get("range")
  fig = Figure(figsize=(4.5, 3.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if scale == "categorical":
    labels = _categories(xs)
    ax.scatter([labels.index(_fmt(x)) for x in xs], ys)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 8 else 0)
  else:
    ax.scatter(xs, ys)
    lo, hi = min(xs), max(xs)
    if value_range:  # the whole search range, so the plot shows where in it the trials fell
      lo, hi = min(lo, value_range[0]), max(hi, value_range[1])
    if scale == "log":
      _log_axis(ax, lo, hi)
    else:
      pad = 0.04 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.5
      ax.set_xlim(lo - pad, hi + pad)
      if all(isinstance(x, int) for x in xs):
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel(key)
  ax.set_ylabel(f"best {metric}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _categories(values: Sequence[Any]) -> List[str]:
  """Distinct labels: numbers in increasing order (a grid may list them in any order), others as first seen."""
  if all(_is_number(v) for v in values):
    values = sorted(values)
  labels: List[str] = []
  for value in values:
    text = _fmt(value)
    if text not in labels:
      labels.append(text)
  return labels


def log_tick_label(x: float, pos: Optional[int] = None) -> str:
  """A log-axis tick as short plain text: 1e-4, 2.5e-3, 1, 5e1 (no mathtext, so it reads in any font)."""
  del pos
  if x <= 0 or not math.isfinite(x):
    return ""
  mantissa, exponent = f"{x:.1e}".split("e")
  mantissa = mantissa[:-2] if mantissa.endswith(".0") else mantissa
  return mantissa if int(exponent) == 0 else f"{mantissa}e{int(exponent)}"


def _log_axis(ax, lo: float, hi: float) -> None:
  """A log x axis over [lo, hi], labels on major ticks only (minor labels are what clutters a log axis):
  decades over two or more decades, 1-2-5 steps over less, every integer mantissa under half a decade."""
  from matplotlib import ticker
  ax.set_xscale("log")
  if hi <= lo:
    lo, hi = lo / 2, hi * 2
  decades = math.log10(hi / lo)
  pad = 10 ** (0.04 * decades)
  ax.set_xlim(lo / pad, hi * pad)
  subs = (1.0,) if decades >= 2 else (1.0, 2.0, 5.0) if decades >= 0.5 else tuple(float(m) for m in range(1, 10))
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs, numticks=10))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(log_tick_label))
  ax.xaxis.set_minor_locator(ticker.LogLocator(base=10, subs="auto", numticks=10))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
