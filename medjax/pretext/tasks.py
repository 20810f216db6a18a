"""`config.pretext`: a self-supervised task as parts of the ordinary run (model wrapper, objective, evaluator).

  config.model_name, config.model = "resnet18", dict(...)    # the encoder, configured as downstream
  config.pretext = dict(name="simclr", temperature=0.2,      # task name and its options
                        views=dict(flip=True, affine=dict(p=1.0, scale=(1.0, 1.6))))

Tasks ("name") and the options each accepts (defaults are the fields of the model classes in
medjax.pretext.models and the keyword defaults of the objectives and corruptions named here):

  simclr    Contrastive: projection_dim, hidden_dim, projector_layers; temperature; views
  byol      BYOL: momentum, predictor_dim, projection_dim, hidden_dim, projector_layers; views
  moco      MoCo (v3: momentum keys, in-batch negatives): as byol, plus temperature
  rotation  RotationPrediction: no options
  genesis   Restoration (Models Genesis): shuffle_prob, nonlinear_prob, paint_prob, inpaint_rate (the
            corruption chain `corruptions.genesis_corrupt`); loss ("mse" or "l1")
  mae       MaskedImageModel: patch_size, mask_ratio; norm_pix

`views` is an augmentation chain in `medjax.augment`'s format; each of the two views of an image is one
independent draw of it (default `DEFAULT_VIEWS`). The labels of the dataset are never read: pretraining uses
the images only. Validation reports the pretext loss on the evaluation split ("val/pretext_loss", lower is
better), with the same views every time; for contrastive tasks its negatives are the other examples of the
evaluation batch, padding included, so it compares runs with the same eval batch only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import augment, losses
from medjax.config_lib import ConfigError, suggest
from medjax.losses.reconstruction import RESTORATION_KINDS
from medjax.pretext import corruptions, models
from medjax.typing import Array, Batch

LOSS_KEY = "pretext_loss"
# Two views of a grayscale scan: a random zoom-in crop with a small rotation and shift, a flip, and intensity
# jitter (SimCLR's crop and colour distortion, Chen et al. 2020, without the colour channels medical images lack).
DEFAULT_VIEWS = dict(
    flip=dict(p=0.5),
    affine=dict(p=1.0, rotate_deg=20.0, scale=(1.0, 1.75), translate=3.0),
    brightness=dict(p=0.8, range=(0.6, 1.4)),
    contrast=dict(p=0.8, range=(0.6, 1.4)),
    gamma=dict(p=0.5, range=(0.7, 1.5)),
    blur=dict(p=0.5, sigma=(0.1, 1.0)),
    noise=dict(p=0.3, std=(0.0, 0.1)),
)


def _simclr(outputs: Array, aux: Mapping[str, Any], batch: Batch, *, temperature: float = 0.1) -> Array:
  return losses.nt_xent(outputs[:, 0], outputs[:, 1], temperature=temperature)


def _byol(outputs: Array, aux: Mapping[str, Any], batch: Batch) -> Array:
  targets = aux["targets"]
  return losses.byol_loss(outputs[:, 0], targets[:, 1]) + losses.byol_loss(outputs[:, 1], targets[:, 0])


def _moco(outputs: Array, aux: Mapping[str, Any], batch: Batch, *, temperature: float = 0.2) -> Array:
  keys = aux["targets"]
  return (losses.info_nce(outputs[:, 0], keys[:, 1], temperature=temperature)
          + losses.info_nce(outputs[:, 1], keys[:, 0], temperature=temperature))


def _rotation(outputs: Array, aux: Mapping[str, Any], batch: Batch) -> Array:
  return optax.softmax_cross_entropy_with_integer_labels(outputs, aux["rotation"])


def _genesis(outputs: Array, aux: Mapping[str, Any], batch: Batch, *, loss: str = "mse") -> Array:
  return losses.restoration_loss(outputs, batch["image"], kind=loss)


def _mae(outputs: Array, aux: Mapping[str, Any], batch: Batch, *, norm_pix: bool = True) -> Array:
  return losses.masked_patch_loss(outputs, aux["target"], aux["mask"], norm_pix=norm_pix)


@dataclasses.dataclass(frozen=True)
class Task:
  """One pretext task: its model wrapper, objective `(outputs, aux, batch, **options) -> (B,)`, and the random
  transform the wrapper takes ("views": an augmentation chain; "corrupt": the Models Genesis chain)."""
  model: type
  objective: Callable[..., Array]
  transform: Optional[str] = None


TASKS: Dict[str, Task] = {
    "simclr": Task(models.Contrastive, _simclr, "views"),
    "byol": Task(models.BYOL, _byol, "views"),
    "moco": Task(models.MoCo, _moco, "views"),
    "rotation": Task(models.RotationPrediction, _rotation),
    "genesis": Task(models.Restoration, _genesis, "corrupt"),
    "mae": Task(models.MaskedImageModel, _mae),
}
_WRAPPER_FIELDS = ("encoder", "views", "corrupt", "dtype", "parent", "name")


def _keywords(fn: Callable, skip: Tuple[str, ...] = ()) -> Tuple[str, ...]:
  return tuple(name for name, p in inspect.signature(fn).parameters.items()
               if p.kind is p.KEYWORD_ONLY and name not in skip)


def _accepted(task: Task) -> Dict[str, Tuple[str, ...]]:
  model_fields = tuple(f.name for f in dataclasses.fields(task.model) if f.name not in _WRAPPER_FIELDS)
  accepted = {"model": model_fields, "objective": _keywords(task.objective)}
  if task.transform == "views":
    accepted["views"] = ("views",)
  elif task.transform == "corrupt":
    accepted["corrupt"] = _keywords(corruptions.genesis_corrupt)
  return accepted


def parse(options: Any) -> Tuple[str, Task, Dict[str, Dict[str, Any]]]:
  """`config.pretext` (a name or a dict with "name") -> (name, Task, options grouped as "model", "objective",
  "views", "corrupt"). Raises ConfigError naming an unknown task or key, with the keys the task accepts."""
  if isinstance(options, str):
    options = {"name": options}
  options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
  name = options.pop("name", None)
  if name not in TASKS:
    raise ConfigError(f"config.pretext.name: unknown pretext task {name!r}.{suggest(str(name), tuple(TASKS))} "
                      f"Known: {', '.join(TASKS)}.")
  task = TASKS[name]
  accepted = _accepted(task)
  grouped: Dict[str, Dict[str, Any]] = {group: {} for group in accepted}
  for key, value in options.items():
    group = next((g for g, keys in accepted.items() if key in keys), None)
    if group is None:
      known = sorted(k for keys in accepted.values() for k in keys)
      raise ConfigError(f"Unknown key config.pretext.{key} for pretext {name!r}.{suggest(key, known)} Known keys: "
                        f"{', '.join(known) or 'none'}.")
    grouped[group][key] = value
  return name, task, grouped


def _views(options: Mapping[str, Any]) -> models.Views:
  chain = options.get("views", DEFAULT_VIEWS)
  chain = dict(chain.to_dict() if hasattr(chain, "to_dict") else chain)
  try:
    augment_fn = augment.make_augment(chain)
  except ValueError as e:
    raise ConfigError(f"config.pretext.views: {e}") from None
  return lambda key, images: augment_fn(key, {"image": images})["image"]


def wrap(options: Any, encoder: Any) -> Any:
  """The pretext model around `encoder` (a built medjax model, whose dtype the wrapper's heads take)."""
  _, task, grouped = parse(options)
  kwargs = dict(grouped["model"], encoder=encoder, dtype=getattr(encoder, "dtype", jnp.float32))
  if task.transform == "views":
    kwargs["views"] = _views(grouped["views"])
  elif task.transform == "corrupt":
    kwargs["corrupt"] = functools.partial(corruptions.genesis_corrupt, **grouped["corrupt"])
  return task.model(**kwargs)


def objective(options: Any) -> losses.Objective:
  """`objective(outputs, aux, batch) -> (B,)` of the task, with its options bound."""
  _, task, grouped = parse(options)
  return functools.partial(task.objective, **grouped["objective"])


def validate(options: Any) -> None:
  """Every name and key of `config.pretext` resolved, the views chain built (nothing traced)."""
  _, task, grouped = parse(options)
  if task.transform == "views":
    _views(grouped["views"])
  loss = grouped["objective"].get("loss")
  if loss is not None and loss not in RESTORATION_KINDS:
    raise ConfigError(f"config.pretext.loss must be one of {RESTORATION_KINDS}, got {loss!r}.")


class PretextEvaluator:
  """Mean pretext loss of a split ("pretext_loss", lower is better); see the module docstring."""

  def __init__(self, objective_fn: losses.Objective):
    self.objective_fn = objective_fn

  def stats_fn(self, outputs, aux, batch) -> Dict[str, jax.Array]:
    return {LOSS_KEY: self.objective_fn(outputs, aux, batch).astype(jnp.float32)}

  def summarize(self, stats) -> Dict[str, float]:
    values = np.asarray(stats[LOSS_KEY], np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"pretext evaluation: the loss is not finite for {int(np.sum(~np.isfinite(values)))} of "
                       f"{len(values)} cases.")
    return {LOSS_KEY: float(np.mean(values))}

  def report(self, stats, ids, metadata=None, **unused) -> Dict[str, Any]:
    return {"metrics": self.summarize(stats), "num_cases": int(len(stats[LOSS_KEY]))}
