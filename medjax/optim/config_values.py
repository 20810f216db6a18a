"""Reading optimizer config values: keyword checks, dicts, numbers (errors name the config key)."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple


# ------------------------------------------------------------------------------------- config reading

def kwarg_names(fn: Callable, skip: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(all keyword names, required keyword names) of `fn`, leaving out the names in `skip`."""
  names, required = [], []
  for p in inspect.signature(fn).parameters.values():
    if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    names.append(p.name)
    if p.default is p.empty:
      required.append(p.name)
  return tuple(names), tuple(required)


def check_keys(where: str, what: str, given: Sequence[str], valid: Sequence[str],
                required: Sequence[str] = ()) -> None:
  for key in given:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{where}: unknown key {key!r} for {what}.{hint} Valid: {', '.join(sorted(valid))}.")
  missing = [k for k in required if k not in given]
  if missing:
    raise ValueError(f"{where}: {what} needs {', '.join(repr(k) for k in missing)}.")


def get(config: Any, key: str, default: Any = None) -> Any:
  try:
    value = config.get(key, default)
  except AttributeError:  # plain object with attributes
    value = getattr(config, key, default)
  return default if value is None and default is not None else value


def as_dict(value: Any, where: str) -> Dict[str, Any]:
  if value is None:
    return {}
  if isinstance(value, str):
    return {"name": value}
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ValueError(f"{where} must be a dict (or a name string), got {type(value).__name__}.")
  return dict(value)


def number(value: Any, where: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  if ok and integer:
    ok = float(value).is_integer()
  if not ok or value < minimum:
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{where} must be {kind} >= {minimum:g}, got {value!r}.")
  return int(value) if integer else float(value)


