"""Trials of a sweep: their names and workdirs, their command lines, the sweep.json record, their results.

Sweep workdir layout:

  DIR/sweep.json              config spec, backend, metric, the report's plot axes (`space.plot_axes`), and
                              per trial: name, overrides, workdir, status, return code, error (last stderr
                              lines), start/end times, wall seconds
  DIR/<trial name>/           the trial's own workdir (config.json, checkpoints/, metrics.jsonl,
                              results.json), plus stdout.log and stderr.log of its process
  DIR/results.csv, results.md, metric_vs_<key>.png   written by `report.write_report`

A trial's name is its overrides, `lr=0.001,model.depth=3`: deterministic, so a relaunch finds the same
directory and training resumes from its checkpoints. Characters outside [A-Za-z0-9._=,+-] are replaced, and
a name that had to be changed or is longer than 80 characters gets a short hash of the exact overrides.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from medjax import atomic, config_lib
from medjax.sweep import space as space_lib

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.json"
DONE = ("finished", "early_stopped")  # results.json statuses that need no rerun
_MAX_NAME = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


# ------------------------------------------------------------------------------------ values and names


def value_text(value: Any) -> str:
  """The text `config_lib.apply_overrides` parses back into `value` (`--config.key=<text>`)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, str):
    return value
  return repr(value)


def override_args(overrides: Mapping[str, Any]) -> List[str]:
  """`["lr=0.001", "model.features=(8, 16)"]`: the form `apply_overrides` takes (and main's --config.*)."""
  return [f"{key}={value_text(value)}" for key, value in overrides.items()]


def _short(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, (list, tuple)):
    return "-".join(_short(v) for v in value)
  return value_text(value)


def safe_text(text: str) -> str:
  """`text` with characters outside [A-Za-z0-9._=,+-] replaced by '_'."""
  return _UNSAFE.sub("_", text)


def trial_name(overrides: Mapping[str, Any]) -> str:
  """A short, deterministic, file-system-safe name for a trial (see the module docstring)."""
  if not overrides:
    return "base"
  raw = ",".join(f"{key}={_short(value)}" for key, value in overrides.items())
  safe = _UNSAFE.sub("_", raw)
  if safe == raw and len(raw) <= _MAX_NAME:
    return raw
  digest = hashlib.sha1(json.dumps(override_args(overrides)).encode()).hexdigest()[:8]
  return f"{safe[:_MAX_NAME - 9]}-{digest}"


# ------------------------------------------------------------------------------ loading an experiment


def load_sweep(spec: str) -> Any:
  """Calls `get_sweep(arg)` of the experiment file in `path.py[:arg]` (the same arg as `get_config`).

  Returns a list of override dicts or a search space (see `medjax.sweep.space`).
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f"Config file {path!r} does not exist (from --config {spec!r}).")
  module_spec = importlib.util.spec_from_file_location(
      "medjax_sweep_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(f"Config file {path!r} defines no get_sweep(arg); add one returning a list "
                                 "of override dicts or a search space (see medjax/sweep/space.py).")
  sweep = module.get_sweep(arg or None)
  if space_lib.is_space(sweep):
    return dict(sweep)
  if not isinstance(sweep, (list, tuple)) or not all(isinstance(t, Mapping) for t in sweep):
    raise config_lib.ConfigError(f"{path}:get_sweep returned {type(sweep).__name__}; expected a list of "
                                 "override dicts or a dict search space.")
  return [dict(t) for t in sweep]


def check_trials(trials: Sequence[Mapping[str, Any]]) -> List[str]:
  """The trial names, raising when two trials would share a workdir."""
  names = [trial_name(t) for t in trials]
  seen: Dict[str, int] = {}
  for i, name in enumerate(names):
    if name in seen:
      raise config_lib.ConfigError(f"Trials {seen[name]} and {i} of the sweep have the same overrides "
                                   f"({name}); remove the duplicate.")
    seen[name] = i
  if not names:
    raise config_lib.ConfigError("The sweep has no trials.")
  return names


# ------------------------------------------------------------------------------------- the sweep file


class SweepState:
  """`sweep.json`: the sweep's description and one record per trial, rewritten atomically on each change."""

  def __init__(self, workdir: str, header: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, SWEEP_FILE)
    previous = read_sweep(self.workdir) if os.path.exists(self.path) else {}
    old = {r["name"]: r for r in previous.get("trials", [])}
    self.header = dict(header)
    self.records: List[Dict[str, Any]] = []
    for overrides, name in zip(trials, check_trials(trials)):
      record = dict(old.get(name, {}))
      record.update(name=name, overrides=dict(overrides), workdir=os.path.join(self.workdir, name))
      record.setdefault("status", "pending")
      self.records.append(record)
    os.makedirs(self.workdir, exist_ok=True)
    self.save()

  def save(self) -> None:
    doc = {**self.header, "updated": time.time(), "trials": self.records}
    atomic.write_text_atomically(self.path, json.dumps(doc, indent=2, default=_jsonable) + "\n")

  def update(self, index: int, **fields: Any) -> None:
    self.records[index].update(fields)
    self.save()

  def is_done(self, index: int) -> bool:
    """Finished before: its results.json says so, or (older train loops) the sweep recorded a clean exit."""
    record = self.records[index]
    result = read_results_json(record["workdir"])
    if result is not None:
      return result.get("status") in DONE
    return record.get("status") in DONE


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, tuple):
    return list(obj)
  if hasattr(obj, "tolist"):
    return obj.tolist()
  return str(obj)


def read_sweep(workdir: str) -> Dict[str, Any]:
  """sweep.json, with override values that JSON turned into lists back as tuples (as configs hold them)."""
  with open(os.path.join(workdir, SWEEP_FILE)) as f:
    doc = json.load(f)
  for record in doc.get("trials", []):
    record["overrides"] = {k: _tuplify(v) for k, v in record.get("overrides", {}).items()}
  return doc


def _tuplify(value: Any) -> Any:
  return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------- trial results


def read_results_json(trial_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(trial_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # half-written by a killed run: treat as absent


def finite_or_none(value: Any) -> Optional[float]:
  """`value` as a float when it is a finite number, else None (JSON null, NaN, inf, text)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def best_from_metrics(trial_dir: str, metric: str, mode: str) -> Tuple[Optional[float], Optional[int],
                                                                        Optional[float]]:
  """(best value, its step, last value) of `metric` in the trial's metrics.jsonl; Nones when absent."""
  path = os.path.join(trial_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None, None, None
  best = best_step = last = None
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      value = finite_or_none(record.get(metric))
      if value is None:
        continue
      last = value
      if best is None or (value > best if mode == "max" else value < best):
        best, best_step = value, int(record["step"])
  return best, best_step, last


def trial_summary(record: Mapping[str, Any], metric: str, mode: str) -> Dict[str, Any]:
  """One report row: status, best value and step of `metric`, final value, wall seconds, error."""
  trial_dir = record["workdir"]
  result = read_results_json(trial_dir)
  best, best_step, final = best_from_metrics(trial_dir, metric, mode)
  status, wall = record.get("status", "pending"), record.get("wall_s")
  if result is not None:
    result_best = result.get("best") or {}
    if result_best.get("metric") == metric and finite_or_none(result_best.get("value")) is not None:
      best, best_step = float(result_best["value"]), result_best.get("step")
    final = finite_or_none((result.get("final") or {}).get(metric, final))
    wall = result.get("wall_s", wall)
    if status not in ("failed", "pruned"):
      status = result.get("status", status)
  return dict(name=record["name"], overrides=dict(record.get("overrides", {})), status=status, best=best,
              best_step=best_step, final=final, wall_s=finite_or_none(wall), error=record.get("error") or "")
