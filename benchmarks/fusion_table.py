"""The README's multimodal fusion table (issue 24) from run workdirs, mean ± sample std over seeds.

  python -m benchmarks.fusion_table --runs runs/fusion

Runs of experiments/synthetic_fusion.py (tags experiment="synthetic_fusion"), found as `benchmarks.paper_table`
finds them, one row per (fusion, sources, modality dropout, t2 missing in the data, label rule): the test AUC /
ACC of the best-validation checkpoint ("test_best/..."), and, where `medjax.tools.evaluate --absent t2` has
written WORKDIR/eval_test_without_t2/report.json, the AUC with t2 absent from every test case and its drop.
Quick runs are left out.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.hospital_tables import _metric, _read, _table, print_tables
from benchmarks.paper_table import find_runs

ABSENT_REPORT = os.path.join("eval_test_without_t2", "report.json")


def _absent_auc(run: Dict[str, Any]) -> Optional[float]:
  path = os.path.join(run["workdir"], ABSENT_REPORT)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return (json.load(f)["metrics"].get("auc") or {}).get("value")


def fusion_table(runs: Sequence[Dict[str, Any]]) -> List[str]:
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for run in runs:
    tags = run["config"].get("tags") or {}
    groups.setdefault((tags.get("fusion"), tags.get("sources"), f"{float(tags.get('dropout', 0)):g}",
                       f"{float(tags.get('missing', 0)):g}", tags.get("rule", "sum")), []).append(run)
  full = lambda r: _metric(r["results"], "test_best/auc")

  def drop(r):
    absent = _absent_auc(r)
    return None if absent is None or full(r) is None else full(r) - absent
  columns = [("AUC", full), ("ACC", lambda r: _metric(r["results"], "test_best/accuracy")),
             ("AUC, t2 absent", _absent_auc), ("AUC lost without t2", drop),
             ("wall min/run", lambda r: r["results"].get("wall_s"))]
  return _table(groups, ["fusion", "sources", "modality dropout", "t2 missing (data)", "rule"], columns)


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion_table", description=__doc__.split("\n")[0])
  parser.add_argument("--runs", nargs="+", required=True, help="run workdirs or folders holding them")
  args = parser.parse_args(argv)
  done, unfinished = find_runs(args.runs)
  runs = []
  for workdir in done:
    run = {**_read(workdir), "workdir": workdir}
    tags = run["config"].get("tags") or {}
    if tags.get("experiment") == "synthetic_fusion" and not tags.get("quick"):
      runs.append(run)
  lines = ["Multimodal fusion (experiments/synthetic_fusion.py), test split, best-validation checkpoint:", ""]
  return print_tables(lines + fusion_table(runs) + [""], unfinished)


if __name__ == "__main__":
  main()
