"""The README's DP-SGD and scanner-shift tables (issue 22) from run workdirs, mean ± sample std over seeds.

  python -m benchmarks.hospital_tables --runs runs/dp runs/shift

Runs are found as `benchmarks.paper_table` finds them (a workdir with results.json, or folders searched for them)
and sorted by their `config.json` tags:
- experiments/medmnist_dp.py (tags experiment="medmnist_dp"): one row per (subset, eps, width), with the test AUC
  / ACC of the last state and of the best-validation-AUC checkpoint, the epsilon reached at delta = 1/N and the
  noise multiplier (results.json "privacy"), and the wall time per run;
- experiments/sites_dann.py (experiment="sites_dann"): one row per (method, harmonise, skew), with the test AUC
  / ACC on the training sites' test images ("test/...") and on the held-out site ("external_test/...").
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from benchmarks.paper_table import CONFIG_FILE, RESULTS_FILE, _cell, _minutes, find_runs


def _read(workdir: str) -> Dict[str, Any]:
  out = {}
  for name, file in (("config", CONFIG_FILE), ("results", RESULTS_FILE)):
    try:
      with open(os.path.join(workdir, file)) as f:
        out[name] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"hospital_tables: cannot read {os.path.join(workdir, file)}: {e}") from e
  return out


def _metric(results: Mapping[str, Any], key: str) -> Optional[float]:
  section = key.split("/")[0]
  for part in (section, "extra_tests"):
    value = (results.get(part) or {}).get(key)
    if value is not None:
      return float(value)
  return None


def _table(groups: Mapping[tuple, List[Dict[str, Any]]], key_titles: Sequence[str],
           columns: Sequence[tuple]) -> List[str]:
  """Markdown lines: one row per group (its key, the seeds, then `columns` of (title, fn(run) -> value))."""
  header = list(key_titles) + ["seeds"] + [title for title, _ in columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
    members = sorted(groups[key], key=lambda r: r["config"].get("seed", 0))
    seeds = ",".join(str(r["config"].get("seed")) for r in members)
    cells = []
    for title, fn in columns:
      values = [fn(r) for r in members]
      cells.append(_minutes(values) if title.startswith("wall") else _cell(values))
    lines.append("| " + " | ".join([str(k) for k in key] + [seeds] + cells) + " |")
  return lines


def dp_table(runs: Sequence[Dict[str, Any]]) -> List[str]:
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for run in runs:
    tags = run["config"].get("tags") or {}
    width = (run["config"].get("model") or {}).get("width", 64)
    eps = float(tags.get("eps", 0))
    groups.setdefault((tags.get("subset"), "non-private" if not eps else f"{eps:g}", width), []).append(run)
  privacy = lambda name: lambda r: (r["results"].get("privacy") or {}).get(name)
  columns = [("AUC (last)", lambda r: _metric(r["results"], "test/auc")),
             ("ACC (last)", lambda r: _metric(r["results"], "test/accuracy")),
             ("AUC (best val)", lambda r: _metric(r["results"], "test_best/auc")),
             ("ACC (best val)", lambda r: _metric(r["results"], "test_best/accuracy")),
             ("epsilon reached", privacy("epsilon")), ("sigma", privacy("noise_multiplier")),
             ("wall min/run", lambda r: r["results"].get("wall_s"))]
  return _table(groups, ["subset", "target epsilon", "width"], columns)


def shift_table(runs: Sequence[Dict[str, Any]]) -> List[str]:
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for run in runs:
    tags = run["config"].get("tags") or {}
    groups.setdefault((tags.get("method"), tags.get("harmonise") or "none", tags.get("skew"),
                       tags.get("holdout")), []).append(run)
  columns = [("AUC train sites", lambda r: _metric(r["results"], "test/auc")),
             ("ACC train sites", lambda r: _metric(r["results"], "test/accuracy")),
             ("AUC held-out site", lambda r: _metric(r["results"], "external_test/auc")),
             ("ACC held-out site", lambda r: _metric(r["results"], "external_test/accuracy")),
             ("wall min/run", lambda r: r["results"].get("wall_s"))]
  return _table(groups, ["method", "harmonise", "skew", "held-out site"], columns)


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.hospital_tables", description=__doc__.split("\n")[0])
  parser.add_argument("--runs", nargs="+", required=True, help="run workdirs or folders holding them")
  args = parser.parse_args(argv)
  done, unfinished = find_runs(args.runs)
  by_experiment: Dict[str, List[Dict[str, Any]]] = {}
  for workdir in done:
    run = _read(workdir)
    if (run["config"].get("tags") or {}).get("quick"):
      continue  # smoke runs never mix in
    by_experiment.setdefault((run["config"].get("tags") or {}).get("experiment"), []).append(run)
  lines: List[str] = []
  if by_experiment.get("medmnist_dp"):
    lines += ["DP-SGD (experiments/medmnist_dp.py), test split:", ""] + dp_table(by_experiment["medmnist_dp"]) + [""]
  if by_experiment.get("sites_dann"):
    lines += ["Scanner shift (experiments/sites_dann.py), test split:", ""] + shift_table(by_experiment["sites_dann"])
    lines += [""]
  return print_tables(lines, unfinished)


def print_tables(lines: List[str], unfinished: Sequence[str]) -> str:
  """Prints and returns the tables' lines, then the workdirs still running (no results.json yet)."""
  if unfinished:
    lines = lines + ["Unfinished (no results.json yet): " + ", ".join(unfinished) + "."]
  text = "\n".join(lines) + "\n"
  print(text, end="")
  return text


if __name__ == "__main__":
  main()
