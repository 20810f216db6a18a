"""The README's federated table from the workdirs of experiments/medmnist_federated.py: federated runs against
centralised and local-only training, test AUC / ACC pooled over the sites' test sets and per site.

  python -m benchmarks.federated_table --runs runs/fl            # expects fedavg/, fedprox/, central/, local{j}/

A federated run reports "test/..." (pooled) and "test_site{j}/..." (`medjax.federated.simulation`); a centralised
run "test/..." and, through `config.extra_test_splits`, "site{j}_test/..."; local-only training is one run per
site, each evaluated on its own site's test set (no pooled figure: there is no single model).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

import numpy as np


def _load(path: str) -> Optional[dict]:
  file = os.path.join(path, "results.json")
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return json.load(f)


def site_metrics(results: dict, sites: List[int]) -> Dict[str, Dict[int, float]]:
  """{"auc": {site: value}, "accuracy": {...}} of a federated or centralised run."""
  flat = {**(results.get("test") or {}), **(results.get("extra_tests") or {})}
  out: Dict[str, Dict[int, float]] = {}
  for metric in ("auc", "accuracy"):
    for j in sites:
      for key in (f"test_site{j}/{metric}", f"site{j}_test/{metric}"):
        if flat.get(key) is not None:
          out.setdefault(metric, {})[j] = float(flat[key])
  return out


def _fmt(values: Dict[int, float], sites: List[int]) -> str:
  cells = [f"{values[j]:.3f}" if j in values else "-" for j in sites]
  finite = np.asarray([v for v in values.values() if np.isfinite(v)])
  spread = f"{finite.mean():.3f} ± {finite.std():.3f}" if len(finite) else "-"
  return " | ".join(cells) + f" | {spread}"


def table(runs: str, num_sites: int = 4) -> str:
  """Markdown rows: method, pooled AUC / ACC, per-site AUC, mean ± sd over sites of AUC and of ACC."""
  sites = list(range(num_sites))
  header = ("| training | pooled test AUC | pooled test ACC | " + " | ".join(f"site {j} AUC" for j in sites)
            + " | AUC mean ± sd over sites | ACC mean ± sd over sites |")
  lines = [header, "|---" * (num_sites + 5) + "|"]
  rows = [(name, _load(os.path.join(runs, name))) for name in ("fedavg", "fedprox", "fedadam", "scaffold", "central")]
  for name, results in rows:
    if results is None:
      continue
    test = results.get("test") or {}
    per_site = site_metrics(results, sites)
    acc = per_site.get("accuracy", {})
    accs = np.asarray(list(acc.values()))
    acc_spread = f"{accs.mean():.3f} ± {accs.std():.3f}" if len(accs) else "-"
    pooled = f"{test.get('test/auc', float('nan')):.3f} | {test.get('test/accuracy', float('nan')):.3f}"
    lines.append(f"| {name} | {pooled} | {_fmt(per_site.get('auc', {}), sites)} | {acc_spread} |")
  local_auc, local_acc = {}, {}
  for j in sites:
    results = _load(os.path.join(runs, f"local{j}"))
    if results is not None:
      own = site_metrics(results, [j])
      local_auc.update(own.get("auc", {}))
      local_acc.update(own.get("accuracy", {}))
  if local_auc:
    accs = np.asarray(list(local_acc.values()))
    lines.append(f"| local only (each site its own model) | - | - | {_fmt(local_auc, sites)} | "
                 f"{accs.mean():.3f} ± {accs.std():.3f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", required=True, help="folder holding fedavg/, fedprox/, central/, local{j}/")
  parser.add_argument("--num_sites", type=int, default=4)
  args = parser.parse_args()
  print(table(args.runs, args.num_sites))


if __name__ == "__main__":
  main()
