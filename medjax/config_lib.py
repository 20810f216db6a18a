"""Experiment configs: argument parsing, loading, overrides, JSON round trips and validation.

An experiment is a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`. This module
imports no JAX at module level, so experiment files (which import only `ml_collections` and this module)
load instantly; `validate` imports the registries lazily because they live next to the objects they name.
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


def _suggest(name: str, candidates: Iterable[str]) -> str:
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
  did-you-mean. A tuple default accepts `k=(1,2)`; commas inside brackets do not split arguments.

  >>> parse_arg("dims=2,quick=true", dims=3, quick=False)  # -> dims=2, quick=True
  """
  result = mlc.ConfigDict(dict(defaults))
  for item in _split_top_level(arg or ""):
    if "=" not in item:
      raise ConfigError(f"Experiment argument {item!r} is not of the form key=value "
                        f"(known keys: {', '.join(sorted(defaults))}).")
    key, text = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"Unknown experiment argument {key!r}.{_suggest(key, defaults)} "
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
        raise ConfigError(f"Unknown config key {path!r} (in --config.{item}).{_suggest(path, full)} "
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


# ------------------------------------------------------------------------------------------ validation

PLAN_KEYS = ("patch_size", "batch_size", "features", "kernel_size", "strides", "target_spacing_mm")


def read_plan(path: str) -> dict:
  """Reads a `plan.json` written by `python -m medjax.data.plan` (plain JSON; no JAX or numpy needed).

  Raises ConfigError naming the file when it is missing, not JSON, or lacks a planned key.
  """
  try:
    with open(path) as f:
      plan = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"Plan file {path!r} not found; write one with `python -m medjax.data.plan "
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


_REQUIRED: Tuple[Tuple[str, type], ...] = (
    ("seed", int), ("total_steps", int), ("model_name", str), ("data.name", str),
    ("input.batch_size", int), ("lr", float),
)
_OPTIONAL_TYPES: Tuple[Tuple[str, Any], ...] = (
    ("log_every_steps", int), ("eval_every_steps", int), ("checkpoint_every_steps", int),
    ("grad_accum_steps", int), ("ema_decay", float), ("grad_clip_norm", (float, type(None))),
    ("compute_dtype", str), ("sharding", str), ("best_metric", str), ("best_mode", str),
    ("test_split", str), ("eval_flips", (tuple, list)),
)
COMPUTE_DTYPES = ("float32", "bfloat16")


def _lookup(config: Any, dotted: str) -> Tuple[bool, Any]:
  node = config
  for key in dotted.split("."):
    if not isinstance(node, (mlc.ConfigDict, dict)) or key not in node:
      return False, None
    node = node[key]
  return True, node


def _check_type(dotted: str, value: Any, expected: Any) -> None:
  expected = expected if isinstance(expected, tuple) else (expected,)
  ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in expected)
  if float in expected and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if not ok:
    names = " or ".join(t.__name__ for t in expected)
    raise ConfigError(f"config.{dotted} must be {names}, got {value!r} ({type(value).__name__}).")


_EARLY_STOPPING_KEYS = ("metric", "mode", "patience", "min_delta")


def _check_early_stopping(config: mlc.ConfigDict) -> None:
  """config.early_stopping: dict(metric="val/...", mode="max"|"min", patience>=1, min_delta>=0), all optional
  but the metric, which defaults to config.best_metric; evaluations must be periodic for patience to count."""
  options = config.get("early_stopping")
  if not options:
    return
  if not isinstance(options, (mlc.ConfigDict, Mapping)):
    raise ConfigError(f"config.early_stopping must be a dict({', '.join(_EARLY_STOPPING_KEYS)}), got {options!r}.")
  for key in options.keys():
    if key not in _EARLY_STOPPING_KEYS:
      raise ConfigError(f"Unknown key config.early_stopping.{key}.{_suggest(key, _EARLY_STOPPING_KEYS)} "
                        f"Known keys: {', '.join(_EARLY_STOPPING_KEYS)}.")
  metric = options.get("metric", config.get("best_metric"))
  if not isinstance(metric, str) or not metric.startswith("val/"):
    raise ConfigError(f"config.early_stopping.metric must be a validation metric key 'val/...' (or set "
                      f"config.best_metric), got {metric!r}.")
  for key, expected in (("patience", int), ("min_delta", float), ("mode", str)):
    if key in options:
      _check_type(f"early_stopping.{key}", options[key], expected)
  if options.get("mode", "max") not in ("max", "min"):
    raise ConfigError(f"config.early_stopping.mode must be 'max' or 'min', got {options['mode']!r}.")
  if options.get("patience", 1) < 1 or options.get("min_delta", 0.0) < 0:
    raise ConfigError(f"config.early_stopping needs patience >= 1 and min_delta >= 0, got {dict(options)}.")
  if not config.get("eval_every_steps"):
    raise ConfigError("config.early_stopping counts evaluations: set config.eval_every_steps.")


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


def validate(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """Checks a config end to end before any data loads or anything compiles.

  Resolves every registry name (model, dataset, loss, optimizer, schedule, sharding preset, evaluator),
  checks that sub-dicts only use keyword names their constructor accepts, checks scalar types, and checks
  the batch against gradient accumulation. Raises `ConfigError` (or KeyError with a did-you-mean from a
  registry) naming the offending key. Returns the config unchanged for chaining.
  """
  # Imported here: the registries live beside the objects (JAX code), and experiment files must load
  # without importing JAX.
  from medjax import evaluators, losses, models, optim, sharding
  from medjax.data import datasets

  for dotted, expected in _REQUIRED:
    found, value = _lookup(config, dotted)
    if not found:
      raise ConfigError(f"config.{dotted} is required (expected {expected.__name__}).")
    _check_type(dotted, value, expected)
  for dotted, expected in _OPTIONAL_TYPES:
    found, value = _lookup(config, dotted)
    if found:
      _check_type(dotted, value, expected)

  def resolve(registry, name: str, where: str):
    if name not in registry:
      raise ConfigError(f"config.{where}: {registry.unknown_message(name)}")
    return registry.get(name)

  def resolve_with_kwargs(registry, name: str, kwargs: Iterable[str], where: str, kwargs_where: str):
    resolve(registry, name, where)
    try:
      registry.check_kwargs(name, kwargs, where=f"config.{kwargs_where}")
    except ValueError as e:
      raise ConfigError(str(e)) from None

  resolve_with_kwargs(models.MODELS, config.model_name, config.get("model", {}).keys(), "model_name", "model")
  data_name, data_kwargs = named(config.data, "data")
  resolve(datasets.DATASETS, data_name, "data.name")
  try:
    data_kwargs, _ = datasets.split_fold_keys(data_name, data_kwargs)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  resolve_with_kwargs(datasets.DATASETS, data_name, data_kwargs, "data.name", "data")
  try:
    from medjax.data import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.input_options(config.input)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    losses.validate_loss_config(config.get("loss", "xent"))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  optim.validate_optim_config(config)
  resolve(sharding.SHARDING_PRESETS, config.get("sharding", "data_parallel"), "sharding")
  sharding.check_mesh_spec(config.get("mesh", (("data", -1),)))
  if "evaluator" in config:
    eval_name, eval_kwargs = named(config.evaluator, "evaluator")
    resolve_with_kwargs(evaluators.EVALUATORS, eval_name, eval_kwargs, "evaluator.name", "evaluator")
  if config.get("augment"):
    from medjax import augment  # pylint: disable=import-outside-toplevel
    try:
      augment.make_augment(config.augment.to_dict() if hasattr(config.augment, "to_dict") else config.augment)
    except ValueError as e:
      raise ConfigError(f"config.augment: {e}") from None
  if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
    raise ConfigError(f"config.compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r}.")
  _check_early_stopping(config)
  if config.get("best_mode", "max") not in ("max", "min"):
    raise ConfigError(f"config.best_mode must be 'max' or 'min', got {config.best_mode!r}.")
  accum = config.get("grad_accum_steps", 1)
  if accum < 1 or config.input.batch_size % accum:
    raise ConfigError(f"config.input.batch_size={config.input.batch_size} must be a positive multiple of "
                      f"config.grad_accum_steps={accum}.")
  if config.total_steps < 1:
    raise ConfigError(f"config.total_steps must be >= 1, got {config.total_steps}.")
  return config
