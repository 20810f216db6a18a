"""From a loss config to `objective(outputs, aux, batch) -> (B,)`: deep supervision and multi-task sums.

Config shape (every key but `name` optional):

  config.loss = dict(
      name="dice_xent", batch_dice=True,           # the main loss and its keyword arguments
      weight=1.0,                                  # weight of the main term
      target="label",                              # batch key of its labels
      mask="mask",                                 # batch key of its mask (None: no mask)
      deep_supervision=dict(weights="exponential"),  # or True, or weights=(w0, w1, ...)
      tasks=dict(                                  # extra terms on aux outputs, keyed by the aux key
          head_logits=dict(name="xent", weight=0.5, target="class_label", label_smoothing=0.1)))

Reserved keys: `weight`, `target`, `mask` (main term and tasks), `deep_supervision` and `tasks` (main term
only); every other key goes to the loss function. "mask" and "distance_map" are never config keys: the
objective passes batch entries under those names to losses that take them. The main term's mask is used
when the batch has one; a mask key configured explicitly (or on a task) must be in the batch. The total is
weight * main + sum_t weight_t * task_t, per example.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

from medjax.losses._base import BATCH_INPUTS, LOSSES
from medjax.typing import Array, Batch, PyTree

Objective = Callable[[Array, Mapping[str, PyTree], Batch], Array]

TERM_KEYS = ("weight", "target", "mask")
MAIN_KEYS = TERM_KEYS + ("deep_supervision", "tasks")
DEEP_SUPERVISION_KEYS = ("weights",)
DEEP_SUPERVISION_SCHEMES = ("exponential", "uniform")
_DEFAULT_MASK = object()  # main term: use batch["mask"] when present


# ------------------------------------------------------------------------------------ deep supervision

def deep_supervision_weights(num_outputs: int,
                             weights: Union[str, Sequence[float]] = "exponential") -> np.ndarray:
  """Weights of the main output and the deep-supervision heads (highest resolution first), summing to 1.

  Args:
    num_outputs: 1 (main output) + number of heads.
    weights: "exponential": w_i = 1 / 2^i, so each coarser output counts half the previous (nnU-Net,
      Isensee et al. 2021, Nature Methods); "uniform": all equal; or `num_outputs` non-negative relative
      weights (main output first).
  Returns: (num_outputs,) float64 normalised to sum to 1.
  """
  if num_outputs < 1:
    raise ValueError(f"deep supervision needs at least one output, got num_outputs={num_outputs}.")
  if isinstance(weights, str):
    if weights not in DEEP_SUPERVISION_SCHEMES:
      raise ValueError(f"deep_supervision weights {weights!r} must be one of {DEEP_SUPERVISION_SCHEMES} or a "
                       "sequence of numbers.")
    raw = 0.5 ** np.arange(num_outputs) if weights == "exponential" else np.ones(num_outputs)
  else:
    raw = np.asarray(weights, np.float64)
    if raw.shape != (num_outputs,) or np.any(raw < 0) or raw.sum() <= 0:
      raise ValueError(f"deep_supervision weights {tuple(weights)} must be {num_outputs} non-negative numbers "
                       f"(main output first, then each head), not all zero.")
  return raw / raw.sum()


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output position when resampling an axis from `size_in` to `size_out` voxels.

  Rule: output voxel i takes input voxel floor((i + 1/2) * size_in / size_out), the voxel under its centre.
  For an integer factor f = size_in / size_out that is i * f + f // 2 (stride 2: 1, 3, 5, ...), the centre of
  a stride-f 'SAME' convolution on even sizes; f = 1 (an axis not downsampled) keeps every voxel. The
  factor comes from the shapes, so anisotropic strides (e.g. (1, 2, 2)) and odd sizes need no setting.
  """
  return np.minimum((2 * np.arange(size_out) + 1) * size_in // (2 * size_out), size_in - 1)


def downsample_nearest(x: Array, spatial_shape: Sequence[int]) -> Array:
  """Nearest-neighbour resampling of the spatial axes 1..n of `x` (B, *spatial, ...) to `spatial_shape`."""
  x = jnp.asarray(x)
  for axis, size_out in enumerate(spatial_shape, start=1):
    size_in = x.shape[axis]
    if size_in == size_out:
      continue
    if size_in % size_out == 0:  # a strided slice, cheaper to compile than a gather
      factor = size_in // size_out
      index = [slice(None)] * x.ndim
      index[axis] = slice(factor // 2, size_in, factor)
      x = x[tuple(index)]
    else:
      x = jnp.take(x, nearest_indices(size_in, size_out), axis=axis)
  return x


# ------------------------------------------------------------------------------------------ objective

@dataclasses.dataclass(frozen=True)
class _Term:
  """One weighted loss on one output: the loss, its kwargs and where its inputs live in the batch."""
  where: str
  loss_fn: Callable[..., Array]
  kwargs: Dict[str, Any]
  weight: float
  target: str
  mask: Optional[str]
  mask_required: bool
  extra_inputs: Tuple[str, ...]  # batch-fed keyword arguments other than the mask

  def batch_keys(self, batch: Batch) -> Tuple[str, ...]:
    keys = [self.target, *self.extra_inputs]
    if self.mask is not None and (self.mask_required or self.mask in batch):
      keys.append(self.mask)
    for key in keys:
      if key not in batch:
        raise KeyError(f"{self.where}: the batch has no {key!r} entry (batch keys: {sorted(batch)}).")
    return tuple(keys)

  def __call__(self, logits: Array, batch: Batch) -> Array:
    self.batch_keys(batch)
    mask = batch.get(self.mask) if self.mask is not None else None
    extra = {name: batch[name] for name in self.extra_inputs}
    return self.loss_fn(logits, batch[self.target], mask=mask, **extra, **self.kwargs)


def _plain(value: Any) -> Any:
  """ConfigDicts / mappings to plain dicts, recursively (lists and tuples kept as given)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _loss_keywords(name: str) -> Tuple[str, ...]:
  """Keyword arguments the loss registered as `name` takes after (logits, labels)."""
  parameters = list(inspect.signature(LOSSES.get(name)).parameters.values())[2:]
  return tuple(p.name for p in parameters)


def _build_term(name: str, kwargs: Dict[str, Any], where: str, main: bool) -> _Term:
  keywords = _loss_keywords(name)
  loss_kwargs = {k: v for k, v in kwargs.items() if k not in MAIN_KEYS and k != "name"}
  mask = kwargs.get("mask", _DEFAULT_MASK if main else None)
  return _Term(where=where, loss_fn=LOSSES.get(name), kwargs=loss_kwargs, weight=float(kwargs.get("weight", 1.0)),
               target=kwargs.get("target", "label"), mask="mask" if mask is _DEFAULT_MASK else mask,
               mask_required=mask is not _DEFAULT_MASK and mask is not None,
               extra_inputs=tuple(k for k in BATCH_INPUTS if k != "mask" and k in keywords))


def _deep_supervised(term: _Term, weights: Union[str, Sequence[float]], outputs: Array,
                     heads: Sequence[Array], batch: Batch) -> Array:
  """Weighted sum of `term` on the main output and on each head against nearest-downsampled inputs."""
  factors = deep_supervision_weights(1 + len(heads), weights)
  total = factors[0] * term(outputs, batch)
  full_spatial = outputs.shape[1:-1]
  for factor, head in zip(factors[1:], heads):
    small = {}
    for key in term.batch_keys(batch):
      value = batch[key]
      if tuple(value.shape[1:1 + len(full_spatial)]) != tuple(full_spatial):
        raise ValueError(f"{term.where}.deep_supervision: batch[{key!r}] of shape {value.shape} does not have "
                         f"the outputs' spatial shape {tuple(full_spatial)} after the batch axis.")
      small[key] = downsample_nearest(value, head.shape[1:-1])
    total = total + factor * term(head, small)
  return total


def make_objective(name: str, kwargs: Mapping) -> Objective:
  """Binds a loss config to the batch layout: `objective(outputs, aux, batch) -> (B,)` float32.

  Args:
    name: registered loss name of the main term.
    kwargs: the rest of the loss config: loss keyword arguments plus the reserved keys of the module
      docstring (deep supervision over aux["deep_supervision"], tasks on other aux outputs).
  Raises ValueError / KeyError for a config mistake (see `validate_loss_config`), and at trace time when
  the model's aux or the batch lacks what the config asks for.
  """
  kwargs = _plain(dict(kwargs))
  validate_loss_config(dict(kwargs, name=name))
  main = _build_term(name, kwargs, "config.loss", main=True)
  deep_supervision = _deep_supervision_weights_setting(kwargs.get("deep_supervision"))
  tasks = {key: _build_term(task["name"], task, f"config.loss.tasks.{key}", main=False)
           for key, task in (kwargs.get("tasks") or {}).items()}

  def objective(outputs: Array, aux: Mapping[str, PyTree], batch: Batch) -> Array:
    if deep_supervision is None:
      total = main(outputs, batch)
    else:
      if "deep_supervision" not in aux:
        raise ValueError("config.loss.deep_supervision is set but the model returns no aux['deep_supervision'] "
                         f"(aux keys: {sorted(aux)}); enable the model's deep-supervision heads.")
      total = _deep_supervised(main, deep_supervision, outputs, aux["deep_supervision"], batch)
    total = main.weight * total
    for key, term in tasks.items():
      if key not in aux:
        raise ValueError(f"config.loss.tasks.{key}: the model returns no aux[{key!r}] (aux keys: {sorted(aux)}).")
      total = total + term.weight * term(aux[key], batch)
    return total

  return objective


def _deep_supervision_weights_setting(value: Any) -> Optional[Union[str, Sequence[float]]]:
  """The weights setting of a validated `deep_supervision` entry, or None when it is off."""
  if value is None or value is False:
    return None
  if value is True:
    return "exponential"
  return value.get("weights", "exponential")


# ----------------------------------------------------------------------------------------- validation

def _unknown_key(where: str, key: str, name: str, accepted: Sequence[str]) -> ValueError:
  close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.5)
  hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
  return ValueError(f"{where}: unknown key {key!r} for loss {name!r}.{hint} "
                    f"Accepted keys: {', '.join(sorted(accepted))}.")


def _check_term(name: Any, kwargs: Mapping[str, Any], where: str, reserved: Sequence[str]) -> None:
  if name not in LOSSES:
    raise ValueError(f"{where}: {LOSSES.unknown_message(name)}")
  keywords = _loss_keywords(name)
  accepted = [k for k in keywords if k not in BATCH_INPUTS] + list(reserved)
  for key in kwargs:
    if key in BATCH_INPUTS and key not in reserved:
      raise ValueError(f"{where}: {key!r} is not a config key; loss {name!r} reads it from batch[{key!r}].")
    if key not in accepted:
      raise _unknown_key(where, key, name, accepted)
  weight = kwargs.get("weight", 1.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    raise ValueError(f"{where}.weight must be a number, got {weight!r}.")
  if not isinstance(kwargs.get("target", "label"), str):
    raise ValueError(f"{where}.target must be a batch key (str), got {kwargs['target']!r}.")
  mask = kwargs.get("mask")
  if mask is not None and not isinstance(mask, str):
    raise ValueError(f"{where}.mask must be a batch key (str) or None, got {mask!r}.")


def _check_deep_supervision(value: Any, where: str) -> None:
  if value is None or isinstance(value, bool):
    return
  if not isinstance(value, Mapping):
    raise ValueError(f"{where} must be True/False or a dict with key 'weights', got {value!r}.")
  for key in value:
    if key not in DEEP_SUPERVISION_KEYS:
      close = difflib.get_close_matches(key, DEEP_SUPERVISION_KEYS, n=1, cutoff=0.5)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{where}: unknown key {key!r}.{hint} Accepted keys: {', '.join(DEEP_SUPERVISION_KEYS)}.")
  weights = value.get("weights", "exponential")
  if isinstance(weights, str):
    if weights not in DEEP_SUPERVISION_SCHEMES:
      close = difflib.get_close_matches(weights, DEEP_SUPERVISION_SCHEMES, n=1, cutoff=0.5)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{where}.weights: unknown scheme {weights!r}.{hint} Use one of "
                       f"{DEEP_SUPERVISION_SCHEMES} or a sequence of numbers (main output first).")
    return
  try:
    deep_supervision_weights(len(weights), weights)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}.weights: {e}") from None


def validate_loss_config(loss_config: Any, where: str = "config.loss") -> None:
  """Checks a loss config (a name or a dict with "name") before anything compiles.

  Checks the loss names (main and tasks), that every key is a keyword argument of its loss or a reserved
  key (module docstring), and the form of `weight`, `target`, `mask`, `deep_supervision` and `tasks`.
  Raises ValueError naming the key path, e.g. "config.loss.tasks.head_logits: unknown key 'wieght' for
  loss 'xent'. Did you mean 'weight'? ...".
  """
  loss_config = _plain(loss_config)
  if isinstance(loss_config, str):
    name, kwargs = loss_config, {}
  elif isinstance(loss_config, Mapping):
    if "name" not in loss_config:
      raise ValueError(f"{where} must name its loss with a 'name' key, got keys {sorted(loss_config)}.")
    kwargs = dict(loss_config)
    name = kwargs.pop("name")
  else:
    raise ValueError(f"{where} must be a loss name or a dict with 'name', got {loss_config!r}.")
  _check_term(name, kwargs, where, MAIN_KEYS)
  _check_deep_supervision(kwargs.get("deep_supervision"), f"{where}.deep_supervision")
  tasks = kwargs.get("tasks") or {}
  if not isinstance(tasks, Mapping):
    raise ValueError(f"{where}.tasks must map an aux output key to a loss dict, got {tasks!r}.")
  for key, task in tasks.items():
    task_where = f"{where}.tasks.{key}"
    if not isinstance(task, Mapping) or "name" not in task:
      raise ValueError(f"{task_where} must be a dict with a 'name' key (and 'target', 'weight', ...), "
                       f"got {task!r}.")
    task = dict(task)
    _check_term(task.pop("name"), task, task_where, TERM_KEYS)
    if "target" not in task:
      raise ValueError(f"{task_where}: needs 'target', the batch key of its labels (e.g. 'class_label').")
