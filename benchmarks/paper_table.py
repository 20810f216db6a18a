"""MedMNIST results table: our test AUC / ACC per configuration (mean ± std over seeds) next to the
published MedMNIST v2 numbers.

  python -m benchmarks.paper_table --runs runs/mm [more run dirs or parents ...] --out runs/mm/table.md

(from the repository root, with medjax installed).

Each `--runs` entry is a run workdir (holding `results.json`) or a folder searched recursively for them
(e.g. a sweep directory). A run contributes its `config.json` (`tags` written by
experiments/medmnist_resnet.py: subset, model, conv, size, recipe; `seed`) and its `results.json`
(`test/...`: last state; `test_best/...`: the best-validation-AUC checkpoint; `wall_s`, all sessions of a
resumed run; older runs whose wall_s covers only their last session are left out of the mean). Runs are
grouped by (subset, model, conv, size, recipe; a schedule other than 100 epochs as "improved, 60 epochs",
mixup as "... + mixup 0.4", class-balanced sampling as "... + balanced^0.5", evaluation with flip TTA as
"... + flip TTA", runs initialised from another run as "..., from <its workdir's name>", students of a
teacher run as "..., distilled from <its workdir's name>", quick-mode runs as
"... (quick)"); each cell is the mean ± sample standard deviation
(n - 1) over the group's seeds. A workdir with a config.json but no results.json yet is listed as
unfinished. The "commit" column lists the git commits the group's runs were trained at (`env.json`, "+dirty"
for uncommitted changes; "?" for runs older than env.json). The Markdown goes to `--out` and to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medjax import atomic, provenance

RESULTS_FILE, CONFIG_FILE = "results.json", "config.json"
GroupKey = Tuple[str, str, str, int, str]  # (subset, model, conv, size, recipe)
OFFICIAL_EPOCHS = 100

# Published test (AUC, ACC), best-validation-AUC checkpoint, mean of at least 3 runs: MedMNIST v2, Yang, Shi,
# Wei, Liu, Zhao, Ke, Pfister, Ni, Scientific Data 10, 41 (2023), Tables 3 (2D) and 4 (3D); copied from
# ../shared/data/medmnist/README.md. Keyed by (subset, model, conv, size).
PUBLISHED: Mapping[Tuple[str, str, str, int], Tuple[float, float]] = {
    ("breastmnist", "resnet18", "2d", 28): (0.901, 0.863),
    ("breastmnist", "resnet50", "2d", 28): (0.857, 0.812),
    ("pneumoniamnist", "resnet18", "2d", 28): (0.944, 0.854),
    ("pneumoniamnist", "resnet50", "2d", 28): (0.948, 0.854),
    ("adrenalmnist3d", "resnet18", "3d", 28): (0.827, 0.721),
    ("adrenalmnist3d", "resnet18", "acs", 28): (0.839, 0.754),
}
CITATION = ("Published: MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023), Tables 3-4, test AUC / ACC of "
            "the best-validation-AUC checkpoint, mean of >= 3 runs.")

# (results.json section, metric key, column title)
METRICS = (("test_best", "test_best/auc", "AUC (best val)"), ("test_best", "test_best/accuracy", "ACC (best val)"),
           ("test", "test/auc", "AUC (last)"), ("test", "test/accuracy", "ACC (last)"))


def find_runs(paths: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(run workdirs with results.json, workdirs with config.json only) under `paths`, sorted.

  A path holding results.json is a run itself; otherwise it is searched recursively (checkpoint folders
  skipped). A path that does not exist raises FileNotFoundError naming it.
  """
  done, unfinished = set(), set()
  for path in paths:
    if not os.path.isdir(path):
      raise FileNotFoundError(f"paper_table: --runs {path!r} is not a directory.")
    for root, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard"))
      if RESULTS_FILE in files:
        done.add(os.path.normpath(root))
      elif CONFIG_FILE in files:
        unfinished.add(os.path.normpath(root))
  return sorted(done), sorted(unfinished)


def _read_json(path: str) -> Dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"paper_table: cannot read {path}: {e}") from e


def group_key(config: Mapping[str, Any], where: str) -> GroupKey:
  """(subset, model, conv, size, recipe) of a run from its config's `tags` (medmnist_resnet experiment)."""
  tags = config.get("tags") or {}
  missing = [k for k in ("subset", "model", "conv", "size", "recipe") if k not in tags]
  if missing:
    raise ValueError(f"paper_table: {where} has no config.tags {missing}; runs of "
                     "experiments/medmnist_resnet.py carry them.")
  recipe = str(tags["recipe"])
  if tags.get("epochs") not in (None, OFFICIAL_EPOCHS):  # a shorter or longer schedule is another row
    recipe += f", {int(tags['epochs'])} epochs"
  recipe += f" + mixup {float(tags['mixup']):g}" if tags.get("mixup") else ""
  recipe += f" + balanced^{float(tags['balance']):g}" if tags.get("balance") else ""
  recipe += " + flip TTA" if tags.get("tta") else ""
  recipe += f", from {os.path.basename(os.path.normpath(str(tags['init'])))}" if tags.get("init") else ""
  recipe += (f", distilled from {os.path.basename(os.path.normpath(str(tags['teacher'])))}"
             if tags.get("teacher") else "")
  recipe += " (quick)" if tags.get("quick") else ""  # smoke runs never mix in
  return (str(tags["subset"]), str(tags["model"]), str(tags["conv"]), int(tags["size"]), recipe)


def read_run(workdir: str) -> Dict[str, Any]:
  """{"key", "seed", "status", "wall_s", metric key -> value or None} of one run workdir."""
  config = _read_json(os.path.join(workdir, CONFIG_FILE))
  results = _read_json(os.path.join(workdir, RESULTS_FILE))
  run = {"workdir": workdir, "key": group_key(config, os.path.join(workdir, CONFIG_FILE)),
         "seed": config.get("seed"), "status": results.get("status"), "wall_s": _whole_run_wall_s(workdir, results),
         "commit": provenance.short_commit(provenance.read(workdir)) or "?"}
  for section, key, _ in METRICS:
    run[key] = (results.get(section) or {}).get(key)
  return run


def _whole_run_wall_s(workdir: str, results: Mapping[str, Any]) -> Optional[float]:
  """results.json's wall_s, or None where it covers only the last session of a resumed run.

  Runs written before train.main summed its sessions carry no "resumed_from_step"; each session of those
  logged one "compile_s" record, so more than one means the wall time is partial.
  """
  if "resumed_from_step" in results:
    return results.get("wall_s")
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      sessions = sum(1 for line in f if '"compile_s"' in line)
  except OSError:
    sessions = 1
  return results.get("wall_s") if sessions <= 1 else None


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
  """(mean, sample std or None for a single value, n) of the finite values; (None, None, 0) if none."""
  finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not finite:
    return None, None, 0
  return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None), len(finite)


def _cell(values: Sequence[Optional[float]]) -> str:
  mean, std, n = mean_std(values)
  if mean is None:
    return "-"
  return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _signed(value: Optional[float]) -> str:
  return "-" if value is None else f"{value:+.3f}"


def _minutes(values: Sequence[Optional[float]]) -> str:
  mean, std, _ = mean_std(values)
  if mean is None:
    return "-"
  text = f"{mean / 60:.1f}" if std is None else f"{mean / 60:.1f} ± {std / 60:.1f}"
  unknown = sum(v is None for v in values)
  return text + (f" ({unknown} partial left out)" if unknown else "")


def build_table(runs: Sequence[Mapping[str, Any]], unfinished: Sequence[str] = ()) -> str:
  """The Markdown table (one row per group key, sorted) plus the citation and any unfinished workdirs."""
  groups: Dict[GroupKey, List[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(run["key"], []).append(run)
  titles = [title for _, _, title in METRICS]
  header = (["subset", "model", "conv", "size", "recipe", "seeds"] + titles +
            ["published AUC / ACC", "ΔAUC", "ΔACC", "wall min/run", "commit"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for key in sorted(groups):
    members = sorted(groups[key], key=lambda r: (r["seed"] is None, r["seed"]))
    subset, model, conv, size, recipe = key
    seeds = ",".join(str(r["seed"]) for r in members)
    not_finished = [r for r in members if r["status"] not in ("finished", "early_stopped")]
    if not_finished:
      seeds += f" ({len(not_finished)} {'/'.join(sorted({str(r['status']) for r in not_finished}))})"
    cells = [_cell([r[k] for r in members]) for _, k, _ in METRICS]
    published = PUBLISHED.get((subset, model, conv, size))
    auc, _, _ = mean_std([r["test_best/auc"] for r in members])
    acc, _, _ = mean_std([r["test_best/accuracy"] for r in members])
    if published is None:
      ref, d_auc, d_acc = "-", "-", "-"
    else:
      ref = f"{published[0]:.3f} / {published[1]:.3f}"
      d_auc = _signed(None if auc is None else auc - published[0])
      d_acc = _signed(None if acc is None else acc - published[1])
    commits = ", ".join(sorted({r["commit"] for r in members}))
    row = [subset, model, conv, str(size), recipe, seeds] + cells + [ref, d_auc, d_acc,
                                                                     _minutes([r["wall_s"] for r in members]), commits]
    lines.append("| " + " | ".join(row) + " |")
  notes = ["", 'Test split, mean ± sample std over seeds. "best val": the checkpoint with the best validation '
           'AUC (the official selection rule); "last": the final state. Δ: ours (best val) minus published.',
           CITATION]
  if unfinished:
    notes.append("Unfinished (no results.json yet): " + ", ".join(unfinished) + ".")
  return "\n".join(lines + notes) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_table", description=__doc__.split("\n")[0])
  parser.add_argument("--runs", nargs="+", required=True, help="run workdirs or folders holding them")
  parser.add_argument("--out", default=None, help="Markdown file to write (default: stdout only)")
  args = parser.parse_args(argv)
  done, unfinished = find_runs(args.runs)
  if not done and not unfinished:
    raise SystemExit(f"paper_table: no run workdirs (results.json or config.json) under {args.runs}.")
  table = build_table([read_run(d) for d in done], unfinished)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic.write_text_atomically(args.out, table)
  sys.stdout.write(table)
  return table


if __name__ == "__main__":
  main()
