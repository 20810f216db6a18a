"""The config of a run as its record: `config.json`, and `config_history.jsonl` for every allowed change.

A workdir is the record of one experiment, so a resumed run must use the config it was started with.
`check_config` compares a new config with `workdir/config.json` key by key (as JSON, via `config_lib.to_json`)
and refuses any difference with one line naming every differing key, old and new value. With
`allow_change=True` (`--allow_config_change`) the change is allowed, except for the keys that set the
parameter shapes (`ARCHITECTURE_KEYS`: `model_name`, `model.*`), and `record_config` first appends one JSON
line to `workdir/config_history.jsonl`:

  {"time": "2026-12-07T07:30:00+00:00", "step": 4, "changed": {"total_steps": {"old": 4, "new": 8}}}

("step": the checkpoint the changed run resumed from, so the new values apply from step + 1; a key absent on
one side has no "old" or "new"), and then rewrites `config.json` with the current config. The file is only
ever appended to, so config.json plus the history, read backwards, give the config of every step.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax

from medjax import atomic, config_lib
from medjax.checkpoint.integrity import CheckpointNotFoundError

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
# Keys (and their sub-keys) that set the shapes of the parameters: never changed on an existing run.
ARCHITECTURE_KEYS = ("model_name", "model")
_ABSENT = object()

Change = Dict[str, Tuple[Any, Any]]  # dotted key -> (old, new) JSON values; `_ABSENT` for a missing side


def _as_json(config: Any) -> Dict[str, Any]:
  """A ConfigDict (through `config_lib.to_json`, as config.json holds it) or a JSON dict as plain JSON."""
  if isinstance(config, Mapping) and not hasattr(config, "to_dict"):
    return json.loads(json.dumps(dict(config)))
  return json.loads(config_lib.to_json(config))


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """{"a.b": leaf} for nested dicts; lists are leaves; an empty dict is a leaf (so it shows in a diff)."""
  if not isinstance(tree, dict) or (not tree and prefix):
    return {prefix: tree}
  flat: Dict[str, Any] = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def _same(a: Any, b: Any) -> bool:
  # JSON compares true == 1; a config does not
  return a == b and isinstance(a, bool) == isinstance(b, bool)


def config_diff(old: Any, new: Any) -> Change:
  """{dotted key: (old value, new value)} for every key whose value differs between two configs.

  Args:
    old, new: ConfigDicts or JSON dicts (as read from config.json); compared as JSON, so tuples equal lists.
  Returns:
    Sorted by key; values as JSON (lists for tuples); a key present on one side only has `_ABSENT` (shown as
    "(absent)") on the other.
  """
  a, b = _flatten(_as_json(old)), _flatten(_as_json(new))
  keys = sorted(set(a) | set(b))
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys
          if k not in a or k not in b or not _same(a[k], b[k])}


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def describe(change: Change) -> str:
  """`key: old -> new; ...` on one line."""
  return "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in change.items())


def is_architecture_key(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in ARCHITECTURE_KEYS)


def _stored(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"{os.path.abspath(path)} cannot be read as JSON ({e}); it records the run's "
                                 "config: restore it, or start a fresh --workdir.") from None


def check_config(workdir: str | os.PathLike, config: Any, *, allow_change: bool = False) -> Change:
  """Compares `config` with the one `workdir/config.json` records; writes nothing.

  Args:
    workdir: the run directory; a missing directory or config.json means a new run (nothing to compare).
    config: the config about to be used (ConfigDict).
    allow_change: accept differences except in `ARCHITECTURE_KEYS` (`--allow_config_change`).
  Returns:
    The differences (`config_diff`; {} for a new run or an identical config).
  Raises:
    ConfigError: one line naming every differing key with old and new value, when there are differences and
      `allow_change` is False, or when a key that sets the parameter shapes differs (even if allowed).
  """
  workdir = os.fspath(workdir)
  stored = _stored(workdir)
  if stored is None:
    return {}
  change = config_diff(stored, config)
  if not change:
    return {}
  path = os.path.abspath(os.path.join(workdir, CONFIG_FILE))
  architecture = {k: v for k, v in change.items() if is_architecture_key(k)}
  if not allow_change:
    never = (" (model_name and model.* cannot change even then: they set the parameter shapes)"
             if architecture else "")
    raise config_lib.ConfigError(
        f"The config differs from the one this run was started with ({path}): {describe(change)}. "
        f"Start a fresh --workdir, or pass --allow_config_change to resume with the new values, recorded in "
        f"{CONFIG_HISTORY_FILE}{never}.")
  if architecture:
    raise config_lib.ConfigError(
        f"The config changes the model of the run in {os.path.abspath(workdir)}: {describe(architecture)}. "
        f"model_name and model.* set the parameter shapes and cannot change on an existing run, even with "
        f"--allow_config_change; start a fresh --workdir.")
  return change


def save_config(workdir: str | os.PathLike, config: Any) -> str:
  """Writes `config` (a ConfigDict) to `workdir/config.json` atomically, whatever it held; returns the path.

  The plain writer (tests, tools that prepare a workdir). A run records its config through `record_config`,
  which never overwrites a different config silently. Only process 0 writes (all hosts share the workdir);
  a crash mid-write leaves the old file intact.
  """
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if jax.process_index() != 0:
    return path
  os.makedirs(os.fspath(workdir), exist_ok=True)
  atomic.write_text_atomically(path, config_lib.to_json(config))
  return path


def record_config(workdir: str | os.PathLike, config: Any, *, step: int = 0, allow_change: bool = False) -> str:
  """Makes `workdir/config.json` hold `config`, the config a run (re)starts with at `step`; returns its path.

  A config.json that already holds the same config is left as it is (byte for byte). A different one is
  refused (`check_config`: ConfigError naming every differing key) unless `allow_change`; then the change
  is first appended to `config_history.jsonl` (with `step`, the checkpoint the run resumed from), and only
  then is config.json replaced. Checkpoints without a config.json (it was deleted) get a history line saying
  where the new file comes from. Only process 0 writes.
  """
  workdir = os.fspath(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  change = check_config(workdir, config, allow_change=allow_change)
  exists = os.path.isfile(path)
  if jax.process_index() != 0 or (exists and not change):
    return path
  os.makedirs(workdir, exist_ok=True)
  if change:
    _append_history(workdir, step, {k: {**({"old": old} if old is not _ABSENT else {}),
                                        **({"new": new} if new is not _ABSENT else {})}
                                    for k, (old, new) in change.items()})
  elif step:
    _append_history(workdir, step, {}, note=f"{CONFIG_FILE} was missing; written from the config resumed with")
  return save_config(workdir, config)


def _append_history(workdir: str, step: int, changed: Dict[str, Any], note: str = "") -> None:
  record: Dict[str, Any] = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "step": step, "changed": changed}
  if note:
    record["note"] = note
  # Append-only: one line per change, flushed to disk before config.json is replaced.
  with open(os.path.join(workdir, CONFIG_HISTORY_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_config_history(workdir: str | os.PathLike) -> List[Dict[str, Any]]:
  """The records of `workdir/config_history.jsonl`, oldest first ([] when the config never changed)."""
  path = os.path.join(os.fspath(workdir), CONFIG_HISTORY_FILE)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def load_config(workdir: str | os.PathLike) -> Any:
  """Reads `workdir/config.json` back into a ConfigDict (lists become tuples).

  Raises CheckpointNotFoundError (a FileNotFoundError) naming the path when the workdir or its config.json
  does not exist, ConfigError when config.json is not JSON.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  if not os.path.isdir(workdir):
    raise CheckpointNotFoundError(f"Workdir {workdir} does not exist (no {CONFIG_FILE} to read).")
  stored = _stored(workdir)
  if stored is None:
    raise CheckpointNotFoundError(f"No {CONFIG_FILE} in {workdir}; is it a medjax workdir?")
  return config_lib.from_json(json.dumps(stored))
