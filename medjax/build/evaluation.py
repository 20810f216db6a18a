"""Config to the evaluation forward passes: whole cases through the planned sliding window (`case_evaluation`), batches
of examples (`eval_apply_fn`), and which of them a run uses (`whole_cases`, `validation_mode`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc

from medjax import inference, sharding
from medjax.build.run_settings import settings
from medjax.config_lib import ConfigError
from medjax.data import datasets, pipeline


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


def _window_predictor(model: Any, variables: Any, flips: Optional[tuple]):
  """Windows (n, *roi, C) -> softmax probabilities (n, *roi, K), flip-TTA averaged when `flips` is set."""
  predict = inference.make_predict_fn(model.apply, variables, output="softmax")
  return inference.flip_tta(predict, flips) if flips else predict


def case_evaluation(model: Any, config: mlc.ConfigDict, stats_fn: Callable, mesh: Any) -> CaseEvaluation:
  """The `CaseEvaluation` of `config.inference` (`inference_options`) with `config.eval_flips` per window;
  windows average softmax probabilities as nnU-Net does (the segmentation evaluator takes their argmax)."""
  options = inference_options(config, mesh)
  flips = settings(config).eval_flips
  place = functools.partial(inference.place_case, roi_size=options["roi_size"], overlap=options["overlap"],
                            window_batch=options["window_batch"], pad_mode=options["pad_mode"],
                            pad_value=options["pad_value"])

  def probabilities(variables, batch):
    probs = inference.sliding_window_planned(
        _window_predictor(model, variables, flips), batch["image"], batch["window_origins"][0],
        batch["window_valid"][0], batch["window_steps"][0],
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
    return inference.sliding_window_inference(_window_predictor(model, variables, flips), images, **options), {}

  return apply
