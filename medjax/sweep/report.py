"""The sweep report: results.csv, results.md (one row per trial, k-fold mean and std), metric_vs_<key>.png.

Rows come from `trials.trial_summary` (results.json of each trial, metrics.jsonl as the fallback). For
cross-validation, trials whose overrides differ only in `data.fold` form one configuration; its row gives the
mean and the sample standard deviation (ddof=1) over the folds that finished.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from medjax.sweep import trials as trials_lib

FOLD_KEYS = ("data.fold",)
_NOT_PLOTTED = ("data.fold", "data.num_folds")


def collect(workdir: str, metric: str, mode: str) -> List[Dict[str, Any]]:
  """One summary per trial of the sweep in `workdir`, in sweep order."""
  doc = trials_lib.read_sweep(workdir)
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
  rows = collect(workdir, metric, mode)
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
  plots = [plot_metric(workdir, rows, key, metric) for key in keys if key not in _NOT_PLOTTED
           and len({trials_lib.value_text(r["overrides"].get(key)) for r in rows}) > 1]
  return dict(rows=rows, kfold=groups, csv=csv_path, markdown=md_path, plots=[p for p in plots if p])


def plot_metric(workdir: str, rows: Sequence[Mapping[str, Any]], key: str, metric: str):
  """`metric_vs_<key>.png`: each finished trial's best metric against its value of `key` (None if none)."""
  # The Agg canvas directly: no global backend switch inside a library.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  points = [(r["overrides"][key], r["best"]) for r in rows
            if key in r["overrides"] and r["best"] is not None and r["status"] in trials_lib.DONE]
  if not points:
    return None
  xs, ys = zip(*points)
  numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
  fig = Figure(figsize=(4.5, 3.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if numeric:
    ax.scatter(xs, ys)
    if min(xs) > 0 and max(xs) / min(xs) > 20:
      ax.set_xscale("log")
  else:
    labels = sorted({_fmt(x) for x in xs})
    ax.scatter([labels.index(_fmt(x)) for x in xs], ys)
    ax.set_xticks(range(len(labels)), labels)
  ax.set_xlabel(key)
  ax.set_ylabel(f"best {metric}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, f"metric_vs_{trials_lib.safe_text(key)}.png")
  fig.savefig(path)
  return path
