"""Experiment configs: argument parsing, loading, overrides and JSON round trips.

An experiment is a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`. This module
imports nothing from medjax and no JAX, so experiment files (which import only `ml_collections` and this
module) load instantly. Turning a config into parts, and checking it, is `medjax.build`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import ml_collections as mlc

_TRUE = ("true", "True")
_FALSE = ("false", "False")


class ConfigError(ValueError):
  """A user-fixable problem in a config: the message names the key and what was expected."""


def suggest(name: str, candidates: Iterable[str]) -> str:
  """" Did you mean 'x'?" for the closest of `candidates`, or ""."""
  close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
  return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _coerce(text: str, default: Any, where: str) -> Any:
  """Parses `text` into the type of `default`; `where` names the key in error messages."""
  if isinstance(default, bool):
    if text in _TRUE:
      return True
    if text in _FALSE:
      return False
    raise ConfigError(f"{where}: expected a bool (true/false), got {text!r}.")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"{where}: expected an int, got {text!r}.") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"{where}: expected a float, got {text!r}.") from None
  if isinstance(default, str):
    return text
  # Tuples, lists, None and anything else: a Python literal (falling back to the raw string for None).
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if default is None:
      return text
    raise ConfigError(f"{where}: expected a literal of type {type(default).__name__}, got {text!r}.") from None
  if isinstance(default, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(default)(value)
  return value


def parse_arg(arg: Optional[str], **defaults: Any) -> mlc.ConfigDict:
  """Parses the experiment argument `"k=v,k2=v2"` into a ConfigDict typed from `defaults`.

  Values take the type of their default (bools only accept true/false); unknown keys raise with a
  did-you-mean. A tuple default accepts `k=(1,2)`; commas inside brackets do not split arguments. A bare
  key means true, as in big_vision: `"quick"` is `"quick=true"` (only for a bool argument).

  >>> parse_arg("dims=2,quick", dims=3, quick=False)  # -> dims=2, quick=True
  """
  result = mlc.ConfigDict(dict(defaults))
  for item in _split_top_level(arg or ""):
    if "=" not in item:
      key = item.strip()
      if key in defaults and isinstance(defaults[key], bool):
        result[key] = True
        continue
      if key in defaults:
        raise ConfigError(f"Experiment argument {key!r} needs a value ({key}=...): only a bool argument may "
                          f"stand alone, and its default is {defaults[key]!r}.")
      raise ConfigError(f"Unknown experiment argument {key!r}.{suggest(key, defaults)} "
                        f"Known arguments: {', '.join(sorted(defaults))}.")
    key, text = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"Unknown experiment argument {key!r}.{suggest(key, defaults)} "
                        f"Known arguments: {', '.join(sorted(defaults))}.")
    result[key] = _coerce(text, defaults[key], f"experiment argument {key!r}")
  return result


def parse_kwargs(text: Optional[str]) -> dict:
  """Parses `"features=(8,16),norm=batch,dropout=0.1"` into a dict of Python literals (strings as is).

  For command-line tools that take constructor keywords without defaults to type them from.
  """
  result = {}
  for item in _split_top_level(text or ""):
    if "=" not in item:
      raise ConfigError(f"Keyword argument {item!r} is not of the form key=value.")
    key, value = (s.strip() for s in item.split("=", 1))
    try:
      result[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      result[key] = value
  return result


def _split_top_level(text: str) -> List[str]:
  """Splits on commas that are not inside (), [] or {}."""
  parts, depth, current = [], 0, []
  for char in text:
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    if char == "," and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(char)
  parts.append("".join(current))
  return [p.strip() for p in parts if p.strip()]


def steps_from(config: mlc.ConfigDict, prefix: str, steps_per_epoch: Optional[int] = None) -> int:
  """Resolves `{prefix}_steps`, or `{prefix}_epochs` * steps_per_epoch, to a number of steps."""
  steps_key, epochs_key = f"{prefix}_steps", f"{prefix}_epochs"
  if config.get(steps_key) is not None:
    return int(config[steps_key])
  if config.get(epochs_key) is not None:
    if steps_per_epoch is None:
      raise ConfigError(f"config.{epochs_key} needs the number of steps per epoch.")
    return int(round(config[epochs_key] * steps_per_epoch))
  raise ConfigError(f"The config sets neither {steps_key} nor {epochs_key}.")


# ---------------------------------------------------------------------------------------------- loading


def load_config(spec: str) -> mlc.ConfigDict:
  """Loads `path/to/experiment.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist (from --config {spec!r}).")
  module_name = "medjax_experiment_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} defines no get_config(arg).")
  config = module.get_config(arg or None)
  if not isinstance(config, mlc.ConfigDict):
    raise ConfigError(f"{path}:get_config returned {type(config).__name__}, not a ConfigDict.")
  return config


def apply_overrides(config: mlc.ConfigDict, overrides: Sequence[str]) -> mlc.ConfigDict:
  """Applies `key.path=value` overrides (as given after `--config.`) to a copy of `config`.

  Only existing keys can be set; a mistyped key fails with the full dotted path and a suggestion. Values
  are typed from the current value (see `parse_arg`). The returned config is locked: later code cannot add
  keys by accident.
  """
  config = mlc.ConfigDict(config.to_dict(), type_safe=False)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override --config.{item} has no '=value'.")
    dotted, text = item.split("=", 1)
    parts = dotted.split(".")
    node = config
    for depth, key in enumerate(parts):
      path = ".".join(parts[:depth + 1])
      if not isinstance(node, (mlc.ConfigDict, dict)) or key not in node:
        siblings = list(node.keys()) if isinstance(node, (mlc.ConfigDict, dict)) else []
        prefix = ".".join(parts[:depth])
        full = [f"{prefix}.{s}" if prefix else s for s in siblings]
        raise ConfigError(f"Unknown config key {path!r} (in --config.{item}).{suggest(path, full)} "
                          f"Keys at this level: {', '.join(sorted(full)) or '(none)'}.")
      if depth == len(parts) - 1:
        node[key] = _coerce(text, node[key], f"config.{path}")
      else:
        node = node[key]
  config.lock()
  return config


# ------------------------------------------------------------------------------------------------ JSON


def to_json(config: mlc.ConfigDict) -> str:
  """Serialises a config to JSON (tuples become lists; `from_json` turns them back)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if isinstance(obj, type):
    return obj.__name__
  raise TypeError(f"Config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable; "
                  "configs hold plain numbers, strings, tuples and dicts.")


def _tuplify(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuplify(v) for k, v in value.items()}
  return value


def from_json(text: str) -> mlc.ConfigDict:
  """Inverse of `to_json`: JSON lists come back as tuples (configs use tuples for shapes)."""
  return mlc.ConfigDict(_tuplify(json.loads(text)))


# ----------------------------------------------------------------------------------------------- plans

PLAN_KEYS = ("patch_size", "batch_size", "features", "kernel_size", "strides", "target_spacing_mm")


def read_plan(path: str) -> dict:
  """Reads a `plan.json` written by `python -m medjax.tools.plan` (plain JSON; no JAX or numpy needed).

  Raises ConfigError naming the file when it is missing, not JSON, or lacks a planned key.
  """
  try:
    with open(path) as f:
      plan = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"Plan file {path!r} not found; write one with `python -m medjax.tools.plan "
                      "--dataset NAME --kwargs ... --out DIR` and pass DIR/plan.json.") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"Plan file {path!r} could not be read as JSON: {e}") from None
  missing = [k for k in PLAN_KEYS if k not in plan]
  if missing:
    raise ConfigError(f"Plan file {path!r} lacks keys {missing}.")
  return plan


def apply_plan(config: mlc.ConfigDict, plan: Mapping[str, Any], *, batch_size: bool = True) -> mlc.ConfigDict:
  """Copies a plan into a U-Net experiment config, in place: the patch size (config.input.patch_size), the
  batch size (unless `batch_size=False`), and the network's per-level `features`, `kernel_size` and
  `strides` (config.model). The target spacing is a dataset setting; experiments pass
  `plan["target_spacing_mm"]` to their dataset themselves. Returns the config for chaining.
  """
  config.input.patch_size = tuple(int(p) for p in plan["patch_size"])
  if batch_size:
    config.input.batch_size = int(plan["batch_size"])
  config.model.features = tuple(int(f) for f in plan["features"])
  config.model.kernel_size = tuple(tuple(int(v) for v in k) for k in plan["kernel_size"])
  config.model.strides = tuple(tuple(int(v) for v in s) for s in plan["strides"])
  return config


def named(value: Any, where: str) -> Tuple[str, dict]:
  """Splits a `"name"` or `dict(name=..., **kwargs)` config entry into (name, kwargs)."""
  if isinstance(value, str):
    return value, {}
  if isinstance(value, (mlc.ConfigDict, Mapping)):
    kwargs = dict(value.items())
    if "name" not in kwargs:
      raise ConfigError(f"config.{where} must name its choice with a 'name' key, got keys {sorted(kwargs)}.")
    return kwargs.pop("name"), kwargs
  raise ConfigError(f"config.{where} must be a name or a dict with 'name', got {value!r}.")
