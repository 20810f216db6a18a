"""`validate(config)`: every name and keyword of a config resolved before anything loads or compiles."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

from medjax import evaluators, losses, models, optim, pretext, privacy, sharding, transfer
from medjax.build.evaluation import inference_options
from medjax.build.parts import augment_fn, domain_adversarial_options, model
from medjax.build.run_settings import (BEST_MODES, COMPUTE_DTYPES, INIT_SOURCES, INIT_STEPS, PSEUDO_PREFIX,
                                       VALIDATION_MODES, Settings, init_from, settings)
from medjax.compress import distillation, pruning, quantize
from medjax.config_lib import ConfigError, named, suggest
from medjax.data import datasets, pipeline


_REQUIRED: Tuple[Tuple[str, type], ...] = (
    ("seed", int), ("total_steps", int), ("model_name", str), ("data.name", str),
    ("input.batch_size", int), ("lr", float),
)
_OPTIONAL_TYPES: Tuple[Tuple[str, Any], ...] = (
    ("log_every_steps", int), ("eval_every_steps", (int, type(None))),
    ("checkpoint_every_steps", (int, type(None))), ("grad_accum_steps", int), ("ema_decay", float),
    ("grad_clip_norm", (float, type(None))), ("compute_dtype", str), ("sharding", str),
    ("best_metric", (str, type(None))), ("best_mode", str), ("test_split", (str, type(None))),
    ("train_split", str), ("extra_test_splits", (tuple, list)),
    ("eval_split", str), ("eval_flips", (tuple, list, type(None))), ("eval_with_ema", bool),
    ("validation", str), ("freeze_batch_stats", bool), ("init_from", (str, dict, mlc.ConfigDict, type(None))),
    ("pretext", (str, dict, mlc.ConfigDict, type(None))), ("privacy", (dict, mlc.ConfigDict, type(None))),
    ("federated", (dict, mlc.ConfigDict, type(None))), ("domain_adversarial", (dict, mlc.ConfigDict, type(None))),
    ("distillation", (dict, mlc.ConfigDict, type(None))), ("pruning", (dict, mlc.ConfigDict, type(None))),
    ("quantization", (dict, mlc.ConfigDict, type(None))),
)
_EARLY_STOPPING_KEYS = ("metric", "mode", "patience", "min_delta")


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
    names = " or ".join("None" if t is type(None) else t.__name__ for t in expected)
    raise ConfigError(f"config.{dotted} must be {names}, got {value!r} ({type(value).__name__}).")


def early_stopping_options(config: mlc.ConfigDict) -> Optional[dict]:
  """`config.early_stopping` checked, with its metric and mode defaulting to the best-checkpoint ones; None
  when unset. Keys: metric ("val/..."), mode ("max"|"min"), patience (>= 1 evaluations), min_delta (>= 0)."""
  options = config.get("early_stopping")
  if not options:
    return None
  if not isinstance(options, (mlc.ConfigDict, Mapping)):
    raise ConfigError(f"config.early_stopping must be a dict({', '.join(_EARLY_STOPPING_KEYS)}), got {options!r}.")
  for key in options:
    if key not in _EARLY_STOPPING_KEYS:
      raise ConfigError(f"Unknown key config.early_stopping.{key}.{suggest(key, _EARLY_STOPPING_KEYS)} "
                        f"Known keys: {', '.join(_EARLY_STOPPING_KEYS)}.")
  run = settings(config)
  kwargs = dict(options)
  if "metric" not in kwargs:
    kwargs["metric"] = run.best_metric
    kwargs.setdefault("mode", run.best_mode)
  if not isinstance(kwargs["metric"], str) or not kwargs["metric"].startswith("val/"):
    raise ConfigError(f"config.early_stopping.metric must be a validation metric key 'val/...' (or set "
                      f"config.best_metric), got {kwargs['metric']!r}.")
  for key, expected in (("patience", int), ("min_delta", float), ("mode", str)):
    if key in kwargs:
      _check_type(f"early_stopping.{key}", kwargs[key], expected)
  if kwargs.get("mode", BEST_MODES[0]) not in BEST_MODES:
    raise ConfigError(f"config.early_stopping.mode must be 'max' or 'min', got {kwargs['mode']!r}.")
  if kwargs.get("patience", 1) < 1 or kwargs.get("min_delta", 0.0) < 0:
    raise ConfigError(f"config.early_stopping needs patience >= 1 and min_delta >= 0, got {dict(options)}.")
  if not run.eval_every_steps:
    raise ConfigError("config.early_stopping counts evaluations: set config.eval_every_steps.")
  return kwargs


def _resolve(registry, name: str, where: str) -> None:
  if name not in registry:
    raise ConfigError(f"config.{where}: {registry.unknown_message(name)}")


def _resolve_with_kwargs(registry, name: str, kwargs: Iterable[str], where: str, kwargs_where: str) -> None:
  _resolve(registry, name, where)
  try:
    registry.check_kwargs(name, kwargs, where=f"config.{kwargs_where}")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _as_config_error(fn: Callable[[], Any], where: str = "") -> Any:
  try:
    return fn()
  except (ValueError, KeyError, TypeError) as e:
    message = str(e.args[0]) if e.args else str(e)
    raise ConfigError(f"{where}{message}") from None


def _check_model_shapes(config: mlc.ConfigDict) -> None:
  """Traces the model's init with `jax.eval_shape` on a one-channel batch of the training patch, when the
  config states it, so a rank or size mismatch fails here and not in the first compile."""
  patch = pipeline.input_options(config.input)["patch_size"]
  if patch is None:
    return
  net = model(config)
  dummy = jax.ShapeDtypeStruct((1,) + tuple(int(p) for p in patch) + (1,), jnp.float32)
  try:
    jax.eval_shape(lambda x: net.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, x,
                                      train=False), dummy)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model ({config.model_name}) does not accept config.input.patch_size="
                      f"{tuple(patch)}: {e}") from None


def _check_validation(config: mlc.ConfigDict, run: Settings) -> None:
  if run.validation not in VALIDATION_MODES:
    raise ConfigError(f"config.validation must be one of {VALIDATION_MODES}, got {run.validation!r}."
                      f"{suggest(str(run.validation), VALIDATION_MODES)}")
  if "inference" in config:
    _as_config_error(lambda: inference_options(config))
  if run.validation != "patches":
    return
  options = early_stopping_options(config) or {}
  for key, metric in (("best_metric", run.best_metric), ("early_stopping.metric", options.get("metric"))):
    if metric and metric.startswith("val/") and not metric.startswith("val/" + PSEUDO_PREFIX):
      raise ConfigError(f"config.{key}={metric!r}: with config.validation='patches' the validation metrics are "
                        f"named val/{PSEUDO_PREFIX}..., e.g. 'val/{PSEUDO_PREFIX}{metric[4:]}'.")


def _check_init_from(config: mlc.ConfigDict) -> None:
  """`config.init_from`: known keys and values (nothing is read here). A missing path is an error only when a
  run starts (`checkpoint.initial_variables`): a resumed run never reads it, so it may be gone by then."""
  options = init_from(config)
  if options is None:
    return
  path = os.path.expanduser(options.path)
  if os.path.isfile(path) and not path.lower().endswith(transfer.SUFFIXES):
    raise ConfigError(f"config.init_from.path: {options.path!r} is neither a workdir nor a weight file "
                      f"({', '.join(transfer.SUFFIXES)}).")
  if options.source not in INIT_SOURCES:
    raise ConfigError(f"config.init_from.source must be one of {INIT_SOURCES}, got {options.source!r}."
                      f"{suggest(str(options.source), INIT_SOURCES)}")
  if not (options.step in INIT_STEPS or (isinstance(options.step, int) and not isinstance(options.step, bool)
                                          and options.step >= 0)):
    raise ConfigError(f"config.init_from.step must be 'best', 'latest' or a step number, got {options.step!r}.")
  if options.inflate is not None and options.inflate not in transfer.INFLATE_MODES:
    raise ConfigError(f"config.init_from.inflate must be None or one of {transfer.INFLATE_MODES}, got "
                      f"{options.inflate!r}.")
  if options.model_name is not None:
    _resolve(models.MODELS, options.model_name, "init_from.model_name")


MULTIMODAL_MODELS = ("fusion",)  # models whose input is a multimodal example's dict (medjax.models.fusion)


def check_model_inputs(config: mlc.ConfigDict, info: datasets.DatasetInfo) -> None:
  """Raises ConfigError when the model and the data disagree on what an example holds: a multimodal dataset
  with a one-image model (or the reverse), or a fusion model whose modalities, numeric columns or categorical
  vocabulary sizes are not the dataset's (`info.multimodal`); the message names the key and both values."""
  multimodal = info.multimodal
  takes_dict = config.model_name in MULTIMODAL_MODELS
  if multimodal is None and takes_dict:
    raise ConfigError(f"config.model_name={config.model_name!r} fuses named modalities, but config.data holds one "
                      "image per example; use a multimodal dataset (e.g. 'synthetic_multimodal').")
  if multimodal is not None and not takes_dict:
    raise ConfigError(f"config.data holds multimodal examples (modalities {multimodal.modalities}, tabular columns "
                      f"{multimodal.numeric + multimodal.categorical}); config.model_name={config.model_name!r} "
                      f"takes one image: use one of {MULTIMODAL_MODELS}.")
  if multimodal is None:
    return
  if (config.get("input") or {}).get("patch_size"):
    raise ConfigError("config.input.patch_size: patches are not cut from multimodal cases (each modality comes at "
                      "its own fixed shape from the dataset: set the dataset's patch_size instead).")
  model = config.get("model") or {}
  unknown = [m for m in model.get("modalities", ()) if m not in multimodal.modalities]
  if unknown:
    raise ConfigError(f"config.model.modalities: {unknown} not among the dataset's modalities "
                      f"{multimodal.modalities}.")
  numeric, sizes = int(model.get("num_numeric", 0)), tuple(model.get("categorical_sizes", ()))
  if numeric not in (0, len(multimodal.numeric)):
    raise ConfigError(f"config.model.num_numeric={numeric}, but the dataset has {len(multimodal.numeric)} numeric "
                      f"columns {multimodal.numeric} (0 ignores them).")
  if sizes not in ((), tuple(multimodal.categorical_sizes)):
    raise ConfigError(f"config.model.categorical_sizes={sizes}, but the dataset's categorical columns "
                      f"{multimodal.categorical} have {tuple(multimodal.categorical_sizes)} indices (vocabulary + 1 "
                      "for unknown) fitted on its training split (() ignores them).")


def validate(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """Checks a config end to end before any data loads or anything compiles.

  Resolves every registry name (model, dataset, loss, optimizer, schedule, sharding preset, evaluator),
  checks that sub-dicts only use keyword names their constructor accepts, checks scalar types, builds the
  augmentation and the optimizer (pure Python), checks the batch against gradient accumulation and, when the
  config sets a patch size, traces the model with `jax.eval_shape`. Raises `ConfigError` naming the offending
  key. Returns the config unchanged for chaining.
  """
  for dotted, expected in _REQUIRED:
    found, value = _lookup(config, dotted)
    if not found:
      raise ConfigError(f"config.{dotted} is required (expected {expected.__name__}).")
    _check_type(dotted, value, expected)
  for dotted, expected in _OPTIONAL_TYPES:
    found, value = _lookup(config, dotted)
    if found:
      _check_type(dotted, value, expected)
  run = settings(config)

  _resolve_with_kwargs(models.MODELS, config.model_name, (config.get("model") or {}).keys(), "model_name", "model")
  data_name, data_kwargs = named(config.data, "data")
  _resolve(datasets.DATASETS, data_name, "data.name")
  data_kwargs, _ = _as_config_error(lambda: datasets.split_fold_keys(data_name, data_kwargs))
  _resolve_with_kwargs(datasets.DATASETS, data_name, data_kwargs, "data.name", "data")
  _as_config_error(lambda: pipeline.input_options(config.input))
  if config.get("pretext"):
    pretext.tasks.validate(config.pretext)
    for key in ("loss", "evaluator"):
      if key in config:
        raise ConfigError(f"config.{key} and config.pretext are exclusive: a pretext run trains and evaluates "
                          f"with its task's loss (remove config.{key}).")
  else:
    _as_config_error(lambda: losses.validate_loss_config(run.loss))
  _as_config_error(lambda: optim.validate_optim_config(config))
  if config.get("domain_adversarial"):
    domain_adversarial_options(config)
  if config.get("distillation"):  # the teacher workdir is read when the model is built (at run start)
    distillation.check_config(config)
  if config.get("quantization"):
    mode = _as_config_error(lambda: quantize.parse(config.quantization))["mode"]
    for key in ("privacy", "federated", "pretext"):
      if mode == "qat" and config.get(key):
        raise ConfigError(f"config.quantization.mode='qat' cannot be combined with config.{key}.")
  if config.get("pruning"):
    _as_config_error(lambda: pruning.parse(config.pruning))
    if run.ema_decay > 0:
      raise ConfigError("config.pruning with config.ema_decay > 0: the average of a pruned weight is not zero; set "
                        "ema_decay to 0 (or prune without an EMA and fine-tune after).")
    if config.get("federated") or config.get("pretext"):
      raise ConfigError(f"config.pruning cannot be combined with config."
                        f"{'federated' if config.get('federated') else 'pretext'}.")
  if config.model_name in MULTIMODAL_MODELS:
    for key in ("privacy", "federated", "pretext", "distillation", "domain_adversarial", "quantization",
                "eval_flips"):
      if config.get(key):
        raise ConfigError(f"config.{key} is not supported with the multimodal model {config.model_name!r} yet "
                          "(its input is a dict of modalities, presence flags and a record, not one image).")
  if config.get("privacy"):
    _as_config_error(lambda: privacy.options.parse(config.privacy))
    _as_config_error(lambda: privacy.options.check_config(config, run.grad_accum_steps))
    norm = (config.get("model") or {}).get("norm", getattr(models.MODELS.get(config.model_name), "norm", None))
    if norm == "batch":
      _as_config_error(lambda: privacy.options.check_model({"batch_stats": {}}, config.model_name))
  _resolve(sharding.SHARDING_PRESETS, run.sharding, "sharding")
  _as_config_error(lambda: sharding.check_mesh_spec(run.mesh))
  if "evaluator" in config:
    eval_name, eval_kwargs = named(config.evaluator, "evaluator")
    _resolve_with_kwargs(evaluators.EVALUATORS, eval_name, eval_kwargs, "evaluator.name", "evaluator")
  _as_config_error(lambda: augment_fn(config), "config.augment: ")
  if run.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.compute_dtype must be one of {COMPUTE_DTYPES}, got {run.compute_dtype!r}.")
  early_stopping_options(config)
  _check_validation(config, run)
  _as_config_error(lambda: _check_init_from(config))
  if run.best_mode not in BEST_MODES:
    raise ConfigError(f"config.best_mode must be 'max' or 'min', got {run.best_mode!r}.")
  if run.grad_accum_steps < 1 or run.batch_size % run.grad_accum_steps:
    raise ConfigError(f"config.input.batch_size={run.batch_size} must be a positive multiple of "
                      f"config.grad_accum_steps={run.grad_accum_steps}.")
  if config.total_steps < 1:
    raise ConfigError(f"config.total_steps must be >= 1, got {config.total_steps}.")
  _check_model_shapes(config)
  return config
