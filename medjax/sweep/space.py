"""Search spaces: grids of override dicts, random draws, k-fold cross-validation, optuna sampling.

A trial is an override dict: dotted config keys to values, `{"lr": 1e-3, "model.features": (8, 16)}`, applied
as `--config.lr=0.001 --config.model.features="(8, 16)"`. A sweep is either

- a list of override dicts (a grid, random draws, folds, or any list you write out), run by every backend; or
- a search space: a dict of dotted keys to `choice`/`uniform`/`loguniform`/`intuniform` (or a constant),
  sampled by optuna (`--backend optuna`) or drawn at random by `random_draws` for the other backends.

>>> product(lr=[1e-3, 1e-2], **{"model.depth": [2, 3]})          # 4 trials
>>> product(kfold(5), lr=[1e-3, 1e-2])                            # 10 trials: 2 lrs x 5 folds
>>> random_draws({"lr": loguniform(1e-4, 1e-2), "optim.wd": choice([0.0, 1e-4])}, n=8, seed=0)

`plot_axes(sweep)` says how the report plots each key (a log axis for `loguniform`); launchers record it in
sweep.json, since the report reads the trials back from there and the values alone cannot tell.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np

Overrides = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values` (a grid axis, or a categorical parameter for optuna)."""
  values: tuple

  def __post_init__(self):
    if not self.values:
      raise ValueError("choice() needs at least one value.")


@dataclasses.dataclass(frozen=True)
class Uniform:
  """A float drawn uniformly from [lo, hi]."""
  lo: float
  hi: float


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """A float whose logarithm is uniform on [log lo, log hi] (learning rates, weight decays); lo > 0."""
  lo: float
  hi: float


@dataclasses.dataclass(frozen=True)
class IntUniform:
  """An int drawn uniformly from {lo, ..., hi} (both ends included)."""
  lo: int
  hi: int


Distribution = Union[Choice, Uniform, LogUniform, IntUniform]
SearchSpace = Mapping[str, Any]  # dotted key -> Distribution or a constant


def _check_range(kind: str, lo: float, hi: float) -> None:
  if not lo < hi:
    raise ValueError(f"{kind}(lo, hi) needs lo < hi, got lo={lo!r}, hi={hi!r}.")


def choice(values: Sequence[Any]) -> Choice:
  """One value of `values` (a list or tuple; a tuple value such as a feature list must be nested)."""
  return Choice(tuple(values))


def uniform(lo: float, hi: float) -> Uniform:
  _check_range("uniform", lo, hi)
  return Uniform(float(lo), float(hi))


def loguniform(lo: float, hi: float) -> LogUniform:
  _check_range("loguniform", lo, hi)
  if lo <= 0:
    raise ValueError(f"loguniform(lo, hi) needs lo > 0, got lo={lo!r}.")
  return LogUniform(float(lo), float(hi))


def intuniform(lo: int, hi: int) -> IntUniform:
  _check_range("intuniform", lo, hi)
  return IntUniform(int(lo), int(hi))


def _axis_values(key: str, axis: Any) -> tuple:
  if isinstance(axis, Choice):
    return axis.values
  if isinstance(axis, (Uniform, LogUniform, IntUniform)):
    raise ValueError(f"Grid axis {key!r} is a continuous distribution ({axis}); a grid needs a list of "
                     "values. Use random_draws or --backend optuna for distributions.")
  if isinstance(axis, (list, tuple)):
    if not axis:
      raise ValueError(f"Grid axis {key!r} is empty.")
    return tuple(axis)
  return (axis,)  # a constant: one value on every trial


def product(*sweeps: Sequence[Overrides], **axes: Any) -> List[Overrides]:
  """The Cartesian product of sub-sweeps (lists of override dicts) and axes (key -> list of values).

  Keys with dots are passed as `**{"model.depth": [2, 3]}`. The first argument varies slowest, so
  `product(lr=[a, b], wd=[c, d])` gives (a, c), (a, d), (b, c), (b, d). A key set twice is an error.
  """
  factors: List[List[Overrides]] = [list(s) for s in sweeps]
  factors += [[{key: v} for v in _axis_values(key, axis)] for key, axis in axes.items()]
  trials = []
  for combo in itertools.product(*factors):
    merged: Overrides = {}
    for part in combo:
      repeated = set(merged) & set(part)
      if repeated:
        raise ValueError(f"product(): key(s) {sorted(repeated)} are set by two factors of the sweep.")
      merged.update(part)
    trials.append(merged)
  return trials


def kfold(k: int, *, fold_key: str = "data.fold", num_folds_key: str = "data.num_folds") -> List[Overrides]:
  """k-fold cross-validation as a sweep: trial i sets data.fold=i and data.num_folds=k.

  Combine with a grid through `product(kfold(5), lr=[...])`; the report groups trials that differ only in
  the fold and gives the mean and standard deviation over folds per configuration.
  """
  if k < 2:
    raise ValueError(f"kfold(k) needs k >= 2, got {k}.")
  return [{fold_key: i, num_folds_key: k} for i in range(k)]


def is_space(sweep: Any) -> bool:
  """True for a search space (a mapping of keys to distributions), False for a list of override dicts."""
  return isinstance(sweep, Mapping)


def _draw(key: str, dist: Any, rng: np.random.Generator) -> Any:
  if isinstance(dist, Choice):
    return dist.values[int(rng.integers(len(dist.values)))]
  if isinstance(dist, Uniform):
    return float(rng.uniform(dist.lo, dist.hi))
  if isinstance(dist, LogUniform):
    return float(math.exp(rng.uniform(math.log(dist.lo), math.log(dist.hi))))
  if isinstance(dist, IntUniform):
    return int(rng.integers(dist.lo, dist.hi + 1))
  if isinstance(dist, (list, tuple)):
    raise ValueError(f"Search space key {key!r} is a list; wrap it in choice([...]).")
  return dist


def random_draws(space: SearchSpace, n: int, seed: int = 0) -> List[Overrides]:
  """`n` independent draws from `space`, the same for the same seed (floats rounded to 4 significant digits
  so trial names stay short)."""
  rng = np.random.default_rng(seed)
  trials = []
  for _ in range(n):
    trial = {}
    for key, dist in space.items():
      value = _draw(key, dist, rng)
      trial[key] = float(f"{value:.4g}") if isinstance(value, float) else value
    trials.append(trial)
  return trials


def plot_axes(sweep: Union[SearchSpace, Sequence[Overrides]]) -> Dict[str, Dict[str, Any]]:
  """How the report plots each swept key, from the sweep's own description (never from the values drawn).

  `{"lr": {"scale": "log", "range": [1e-4, 1e-2]}, "model.depth": {"scale": "categorical"}}`: a
  `loguniform` gives a log axis over its range, `uniform` and `intuniform` a linear one, `choice` a
  categorical one. A list of override dicts (a grid, folds, trials written out) gives every key as
  categorical: each axis is a list of values, i.e. a choice. Constants of a space are left out (one value,
  nothing to plot).
  """
  if not is_space(sweep):
    keys: List[str] = []
    for trial in sweep:
      keys += [k for k in trial if k not in keys]
    return {key: dict(scale="categorical") for key in keys}
  axes: Dict[str, Dict[str, Any]] = {}
  for key, dist in sweep.items():
    if isinstance(dist, LogUniform):
      axes[key] = dict(scale="log", range=[dist.lo, dist.hi])
    elif isinstance(dist, (Uniform, IntUniform)):
      axes[key] = dict(scale="linear", range=[dist.lo, dist.hi])
    elif isinstance(dist, Choice):
      axes[key] = dict(scale="categorical")
  return axes


def suggest(trial, space: SearchSpace) -> Overrides:
  """Samples `space` with an optuna trial (parameter names are the dotted keys)."""
  overrides = {}
  for key, dist in space.items():
    if isinstance(dist, Choice):
      # Optuna's categorical values must be None/bool/int/float/str: index tuples and other values.
      plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in dist.values)
      if plain:
        overrides[key] = trial.suggest_categorical(key, list(dist.values))
      else:
        labels = [repr(v) for v in dist.values]
        overrides[key] = dist.values[labels.index(trial.suggest_categorical(key, labels))]
    elif isinstance(dist, Uniform):
      overrides[key] = trial.suggest_float(key, dist.lo, dist.hi)
    elif isinstance(dist, LogUniform):
      overrides[key] = trial.suggest_float(key, dist.lo, dist.hi, log=True)
    elif isinstance(dist, IntUniform):
      overrides[key] = trial.suggest_int(key, dist.lo, dist.hi)
    else:
      overrides[key] = _draw(key, dist, np.random.default_rng(0))  # constants (lists raise there)
  return overrides
