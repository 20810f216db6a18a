"""The one place a config becomes parts: settings with their defaults, model, dataset, objective, optimizer,
augmentation, evaluator, mesh, and the jitted train step.

  build.validate(config)                       # every name and keyword resolved; nothing loads or compiles
  settings = build.settings(config)            # the run-level keys, each default stated once (below)
  model = build.model(config)                  # with the configured compute dtype
  dataset = build.dataset(config)              # loads data
  evaluator = build.evaluator(config, dataset.info)

`train.main`, `checkpoint.load`, the notebooks and every tool go through these functions, so a run, its
evaluation and its predictions build the same model from the same config. `Settings` holds the defaults of
the run-level keys (`best_mode`, the mesh, the eval batch size, ...); nothing else states them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from medjax import augment, evaluators, inference, losses, models, optim, sharding, steps
from medjax.config_lib import ConfigError, named, suggest
from medjax.data import datasets, pipeline
from medjax.train_state import TrainState

COMPUTE_DTYPES = ("float32", "bfloat16")
# How a run that trains on patches of segmentation cases validates (`validation_mode`).
VALIDATION_MODES = ("whole_case", "patches")
PSEUDO_PREFIX = "pseudo_"  # metric names of the "patches" mode: val/pseudo_dice_mean (nnU-Net's name)
BEST_MODES = ("max", "min")
DEFAULT_MESH = (("data", -1),)  # every device on the data axis


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """`config.checkpoint`: the latest `max_to_keep` steps plus the `keep_best` best by `config.best_metric`
  (0 without one); `async_save` writes in a background thread."""
  max_to_keep: int = 2
  keep_best: int = 1
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run-level config keys with their defaults, resolved once (`settings(config)`).

  Units: `*_steps` in optimizer steps; `None` for `eval_every_steps` / `checkpoint_every_steps` means only at
  the last step. `batch_size` is `config.input.batch_size` (global, over all devices); `eval_batch_size` is
  `config.input.eval_batch_size`, else the training batch size. `validation` applies to runs that train on
  patches of segmentation cases (`validation_mode`).
  """
  batch_size: Optional[int] = None
  eval_batch_size: Optional[int] = None
  seed: int = 0
  best_metric: Optional[str] = None
  best_mode: str = "max"
  mesh: Tuple[Tuple[str, int], ...] = DEFAULT_MESH
  sharding: str = "data_parallel"
  compute_dtype: str = "float32"
  loss: Any = "xent"
  eval_split: str = "val"
  test_split: Optional[str] = None
  ema_decay: float = 0.0
  eval_with_ema: bool = True
  grad_accum_steps: int = 1
  log_every_steps: int = 50
  eval_every_steps: Optional[int] = None
  checkpoint_every_steps: Optional[int] = None
  eval_flips: Optional[Tuple[Tuple[int, ...], ...]] = None
  validation: str = "whole_case"
  checkpoint: CheckpointSettings = CheckpointSettings()

  @property
  def use_ema_for_eval(self) -> bool:
    """Validation, test, `evaluate` and `checkpoint.load` use the EMA weights when the run kept them."""
    return self.ema_decay > 0 and self.eval_with_ema


_SCALAR_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings)
                         if f.name not in ("batch_size", "eval_batch_size", "checkpoint"))


def settings(config: mlc.ConfigDict) -> Settings:
  """The config's run-level settings; keys the config leaves out take `Settings`' defaults."""
  given = {k: config[k] for k in _SCALAR_SETTINGS if k in config and config[k] is not None}
  ckpt = dict(config.get("checkpoint") or {})
  unknown = sorted(set(ckpt) - {f.name for f in dataclasses.fields(CheckpointSettings)})
  if unknown:
    raise ConfigError(f"config.checkpoint: unknown key(s) {unknown}; known keys: max_to_keep, keep_best, "
                      "async_save.")
  if "mesh" in given:
    given["mesh"] = tuple(tuple(entry) for entry in given["mesh"])
  if "eval_flips" in given:
    given["eval_flips"] = tuple(tuple(axes) for axes in given["eval_flips"])
  # A saved config may lack config.input (a model saved for prediction only); validate() requires it.
  input_config = config.get("input") or {}
  batch_size = input_config.get("batch_size")
  eval_batch_size = input_config.get("eval_batch_size") or batch_size
  return Settings(batch_size=batch_size, eval_batch_size=eval_batch_size, checkpoint=CheckpointSettings(**ckpt),
                  **given)


# ------------------------------------------------------------------------------------------------ parts


def model(config: mlc.ConfigDict):
  """The config's model (`config.model_name`, keywords `config.model`) computing in `config.compute_dtype`;
  parameters stay float32."""
  kwargs = dict(config.get("model") or {})
  if "dtype" in kwargs:
    raise ConfigError("Set the compute dtype with config.compute_dtype, not config.model.dtype.")
  kwargs["dtype"] = jnp.dtype(settings(config).compute_dtype)
  return models.build_model(config.model_name, kwargs)


def dataset(config: mlc.ConfigDict) -> datasets.Dataset:
  """`config.data` built (this reads or generates the data)."""
  return datasets.build_dataset(*named(config.data, "data"))


def split_source(data: datasets.Dataset, split: str, where: str):
  """The dataset's `split`, or a ConfigError naming the config key `where` and the splits there are."""
  try:
    return data.source(split)
  except KeyError:
    raise ConfigError(f"{where}: the dataset has no split {split!r}; it has "
                      f"{', '.join(map(repr, data.splits))}.") from None


def objective(config: mlc.ConfigDict) -> losses.Objective:
  """`config.loss` (a name or a dict with terms, deep supervision, tasks) as one objective."""
  return losses.make_objective(*named(settings(config).loss, "loss"))


def optimizer(config: mlc.ConfigDict):
  """`(tx, schedule_fn)` from config.optim / lr / schedule / total_steps / grad_clip_norm."""
  return optim.make_optimizer(config)


def augment_fn(config: mlc.ConfigDict) -> Optional[Callable]:
  """The on-device augmentation chain of `config.augment`; None without one."""
  options = config.get("augment")
  if not options:
    return None
  return augment.make_augment(options.to_dict() if hasattr(options, "to_dict") else dict(options))


def evaluator(config: mlc.ConfigDict, info: datasets.DatasetInfo, **overrides: Any):
  """`config.evaluator` (default: the evaluator of the dataset's task) for `info`; `overrides` set keywords
  the evaluator accepts and leaves the others alone (e.g. the evaluate tool's `surface_metrics`)."""
  name, kwargs = named(config.get("evaluator", info.task), "evaluator")
  accepted = evaluators.EVALUATORS.accepted_kwargs(name) or ()
  kwargs.update({k: v for k, v in overrides.items() if k in accepted})
  return evaluators.EVALUATORS.get(name)(info=info, **kwargs)


def mesh(config: mlc.ConfigDict, *, fallback: bool = False):
  """The config's device mesh. With `fallback`, a machine that cannot build it (a run trained on 8 devices,
  evaluated on 1) gets every device on the data axis."""
  spec = settings(config).mesh
  try:
    return sharding.make_mesh(spec)
  except ValueError:
    if not fallback:
      raise
    return sharding.make_mesh(DEFAULT_MESH)


def eval_batch_size(config: mlc.ConfigDict, mesh: Any, *, round_up: bool = False) -> int:
  """The eval batch size, checked against the data axis; `round_up` rounds it to a multiple instead (for
  tools that run on another machine than the training)."""
  batch = settings(config).eval_batch_size
  if round_up:
    n = sharding.data_axis_size(mesh) * jax.process_count()
    return -(-batch // n) * n
  sharding.check_batch_size(batch, mesh, what="config.input.eval_batch_size")
  return batch


def whole_cases(config: mlc.ConfigDict, info: datasets.DatasetInfo) -> bool:
  """True when the run trains on patches cut from segmentation cases of varying size: validation, test and
  `evaluate` then predict each whole case with a sliding window (one case per batch)."""
  return pipeline.input_options(config.input)["patch_size"] is not None and info.label_kind == "map"


def validation_mode(config: mlc.ConfigDict, info: datasets.DatasetInfo) -> Optional[str]:
  """How the run validates: "whole_case" (the default for `whole_cases` runs: a sliding window over every
  validation case, the score `evaluate` gives), "patches" (`config.validation="patches"`: one foreground-
  centred training-size patch per case, cheaper but optimistic, logged as val/pseudo_dice_mean), or None
  (the examples as they are: fixed-size images or classification)."""
  return settings(config).validation if whole_cases(config, info) else None


def inference_options(config: mlc.ConfigDict, mesh: Any = None) -> dict:
  """`config.inference` checked and completed: every keyword of `inference.sliding_window_inference` but the
  image, the prediction function and the mesh. roi_size defaults to the training patch (config.input.
  patch_size), window_batch to the eval batch size rounded up to the mesh's data axis; the others take the
  function's own defaults."""
  parameters = inspect.signature(inference.sliding_window_inference).parameters
  accepted = set(parameters) - {"predict_fn", "image", "mesh"}
  options = dict(config.get("inference") or {})
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ConfigError(f"config.inference: unknown key(s) {unknown}; accepted: {', '.join(sorted(accepted))}.")
  patch = pipeline.input_options(config.input)["patch_size"] if "input" in config else None
  roi = options.get("roi_size") or patch
  if not roi:
    raise ConfigError("config.inference.roi_size is needed for sliding-window inference (it defaults to "
                      "config.input.patch_size, which is unset).")
  options["roi_size"] = tuple(int(r) for r in roi)
  if "window_batch" not in options:
    n = sharding.data_axis_size(mesh) if mesh is not None else 1
    options["window_batch"] = -(-int(settings(config).eval_batch_size or 1) // n) * n
  defaults = {k: p.default for k, p in parameters.items() if k in accepted and p.default is not p.empty}
  return {**defaults, **options}


@dataclasses.dataclass(frozen=True)
class CaseEvaluation:
  """Whole cases through the sliding window, for `whole_cases` runs (validation, test and `evaluate`).

  `place(example)` puts a case on its canvas with its window plan (host side, `inference.place_case`);
  `step(variables, batch)` is the evaluator's per-case statistics, jitted: one program per canvas shape,
  which most cases of a dataset share; `predict(variables, batch)` is the (1, *canvas) argmax, background
  outside the case (crop with `inference.crop_to_case(prediction, batch["mask"][0])`).
  """
  place: Callable[[dict], dict]
  step: Callable[..., Any]
  predict: Callable[..., Any]


def case_evaluation(model: Any, config: mlc.ConfigDict, stats_fn: Callable, mesh: Any) -> CaseEvaluation:
  """The `CaseEvaluation` of `config.inference` (`inference_options`) with `config.eval_flips` per window;
  windows average softmax probabilities as nnU-Net does (the segmentation evaluator takes their argmax)."""
  options = inference_options(config, mesh)
  flips = settings(config).eval_flips
  place = functools.partial(inference.place_case, roi_size=options["roi_size"], overlap=options["overlap"],
                            window_batch=options["window_batch"], pad_mode=options["pad_mode"],
                            pad_value=options["pad_value"])

  def probabilities(variables, batch):
    predict = inference.make_predict_fn(model.apply, variables, output="softmax")
    if flips:
      predict = inference.flip_tta(predict, flips)
    probs = inference.sliding_window_planned(
        predict, batch["image"], batch["window_origins"][0], batch["window_valid"][0], batch["window_steps"][0],
        roi_size=options["roi_size"], mode=options["mode"], sigma_scale=options["sigma_scale"], mesh=mesh)
    # The canvas around the case is certain background, so it adds nothing to the foreground classes.
    background = jax.nn.one_hot(0, probs.shape[-1], dtype=probs.dtype)
    return jnp.where(batch["mask"][..., None], probs, background)

  step = jax.jit(lambda variables, batch: stats_fn(probabilities(variables, batch), {}, batch))
  predict = jax.jit(lambda variables, batch: jnp.argmax(probabilities(variables, batch), axis=-1))
  return CaseEvaluation(place=place, step=step, predict=predict)


def eval_apply_fn(model: Any, config: mlc.ConfigDict, *, sliding_window: bool = False) -> Callable[..., Any]:
  """The forward pass of validation, test and `medjax.tools.evaluate` on batches of examples (whole cases:
  `case_evaluation`): `apply(variables, images, train=False) -> (outputs, aux)`.

  `model.apply`, or with `config.eval_flips` (mirrors, e.g. ((), (1,)) for 2D left-right) the flip-TTA
  average of its logits. With `sliding_window` (fixed-size images larger than the network's input): a sliding
  window (`inference_options`) averaging softmax probabilities, flip TTA per window, `aux` empty.
  """
  flips = settings(config).eval_flips
  if not sliding_window:
    return inference.flip_tta_apply(model.apply, flips) if flips else model.apply
  options = inference_options(config)

  def apply(variables, images, train: bool = False):
    del train
    predict = inference.make_predict_fn(model.apply, variables, output="softmax")
    if flips:
      predict = inference.flip_tta(predict, flips)
    return inference.sliding_window_inference(predict, images, **options), {}

  return apply


def init_state_fn(model: Any, tx: Any, example_image: np.ndarray, use_ema: bool):
  """Returns `init(rng) -> TrainState` for a batch-1 dummy input shaped like `example_image` (*spatial, C)."""

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1,) + tuple(example_image.shape), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    return TrainState.create(variables=variables, tx=tx, rng=state_rng, use_ema=use_ema)

  return init


def jit_train_step(model: Any, objective: Any, tx: Any, mesh: Any, state_sharding: Any, *,
                   accum_steps: int = 1, ema_decay: float = 0.0, augment_fn: Optional[Callable] = None):
  """`steps.train_step` bound to its hyperparameters and jitted over `mesh`, the state donated.

  Batches come in split over the data axis; metrics come out replicated.
  """
  return jax.jit(
      functools.partial(steps.train_step, apply_fn=model.apply, objective=objective, tx=tx,
                        accum_steps=accum_steps, ema_decay=ema_decay, augment_fn=augment_fn),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))


# ------------------------------------------------------------------------------------------ validation

_REQUIRED: Tuple[Tuple[str, type], ...] = (
    ("seed", int), ("total_steps", int), ("model_name", str), ("data.name", str),
    ("input.batch_size", int), ("lr", float),
)
_OPTIONAL_TYPES: Tuple[Tuple[str, Any], ...] = (
    ("log_every_steps", int), ("eval_every_steps", (int, type(None))),
    ("checkpoint_every_steps", (int, type(None))), ("grad_accum_steps", int), ("ema_decay", float),
    ("grad_clip_norm", (float, type(None))), ("compute_dtype", str), ("sharding", str),
    ("best_metric", (str, type(None))), ("best_mode", str), ("test_split", (str, type(None))),
    ("eval_split", str), ("eval_flips", (tuple, list, type(None))), ("eval_with_ema", bool),
    ("validation", str),
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
  _as_config_error(lambda: losses.validate_loss_config(run.loss))
  _as_config_error(lambda: optim.validate_optim_config(config))
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
  if run.best_mode not in BEST_MODES:
    raise ConfigError(f"config.best_mode must be 'max' or 'min', got {run.best_mode!r}.")
  if run.grad_accum_steps < 1 or run.batch_size % run.grad_accum_steps:
    raise ConfigError(f"config.input.batch_size={run.batch_size} must be a positive multiple of "
                      f"config.grad_accum_steps={run.grad_accum_steps}.")
  if config.total_steps < 1:
    raise ConfigError(f"config.total_steps must be >= 1, got {config.total_steps}.")
  _check_model_shapes(config)
  return config
