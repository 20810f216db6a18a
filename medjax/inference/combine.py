"""Prediction functions for `sliding_window_inference`: a model's probabilities, flip TTA, ensembles.

Each builder returns a `jax.tree_util.Partial` mapping `(n, *spatial, C)` to `(n, *spatial, K)`. Its
arguments (network weights) are pytree leaves, so the builders nest (`flip_tta(ensemble([...]))`) and a
compiled sliding window takes the weights as inputs. The callables inside compare by value, so building
the same combination twice reuses the compiled program.

Averaging happens in probability space: flip TTA and ensembling average whatever the inner functions
return, so build the members with `output="softmax"` (the default) or "sigmoid", as nnU-Net averages
softmax outputs over mirrors and folds (Isensee et al., Nature Methods 2021).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from medjax.typing import Array, PyTree

OUTPUTS = ("softmax", "sigmoid", "logits")
Partial = jax.tree_util.Partial


@dataclasses.dataclass(frozen=True)
class _ApplyModel:
  apply_fn: Callable[..., Any]
  output: str

  def __call__(self, variables: PyTree, x: Array) -> Array:
    out = self.apply_fn(variables, x, train=False)
    if isinstance(out, tuple):  # medjax models return (outputs, aux)
      out = out[0]
    out = out.astype(jnp.float32)
    if self.output == "softmax":
      return jax.nn.softmax(out, axis=-1)
    if self.output == "sigmoid":
      return jax.nn.sigmoid(out)
    return out


def make_predict_fn(apply_fn: Callable[..., Any], variables: PyTree, output: str = "softmax") -> Partial:
  """`x (n, *spatial, C) -> (n, *spatial, K)` float32 for a Flax model's `apply` and its variables.

  output: "softmax" (class probabilities), "sigmoid" (independent per-channel probabilities) or "logits".
  The model is called with `train=False`; a `(outputs, aux)` result contributes its outputs.
  """
  if output not in OUTPUTS:
    raise ValueError(f"make_predict_fn: output must be one of {OUTPUTS}, got {output!r}.")
  return Partial(_ApplyModel(apply_fn, output), variables)


def all_flips(spatial_dims: int) -> Tuple[Tuple[int, ...], ...]:
  """All 2^d subsets of the spatial axes (0-based, spatial order), the identity `()` first."""
  axes = range(spatial_dims)
  return tuple(c for k in range(spatial_dims + 1) for c in itertools.combinations(axes, k))


@dataclasses.dataclass(frozen=True)
class _FlipAverage:
  flips: Optional[Tuple[Tuple[int, ...], ...]]

  def __call__(self, predict_fn: Callable[[Array], Array], x: Array) -> Array:
    nd = x.ndim - 2
    flips = all_flips(nd) if self.flips is None else self.flips
    for combo in flips:
      if any(not 0 <= a < nd for a in combo):
        raise ValueError(f"flip_tta: flip {combo} names an axis outside the {nd} spatial axes (0..{nd - 1}).")
    total = None
    for combo in flips:
      axes = tuple(1 + a for a in combo)  # skip the batch axis
      flip = (lambda y: jnp.flip(y, axes)) if axes else (lambda y: y)
      prediction = predict_fn(flip(x)).astype(jnp.float32)
      if prediction.ndim == x.ndim:  # a dense (n, *spatial, K) output is mirrored back; (n, K) is not spatial
        prediction = flip(prediction)
      total = prediction if total is None else total + prediction
    return total / len(flips)


def _checked_flips(flips: Sequence[Sequence[int]], who: str) -> Tuple[Tuple[int, ...], ...]:
  flips = tuple(tuple(sorted(int(a) for a in combo)) for combo in flips)
  if not flips or len(set(flips)) != len(flips):
    raise ValueError(f"{who}: flips must be a non-empty list of distinct axis subsets, got {flips}.")
  return flips


def flip_tta(predict_fn: Callable[[Array], Array],
             flips: Optional[Sequence[Sequence[int]]] = None) -> Partial:
  """Test-time augmentation by mirroring: the mean of `flip(predict_fn(flip(x)))` over `flips`.

  Args:
    predict_fn: `(n, *spatial, C) -> (n, *spatial, K)`, ideally probabilities, or `(n, K)` per image
      (classification), which is averaged as it is.
    flips: subsets of spatial axes to mirror together (0-based, spatial order; `()` is the identity), e.g.
      `[(), (2,), (1, 2)]`. None means all 2^d combinations (8 in 3D, 4 in 2D), as nnU-Net mirrors.
  A network whose output commutes with mirroring (e.g. pointwise) is unchanged by this.
  """
  if flips is not None:
    flips = _checked_flips(flips, "flip_tta")
  if not isinstance(predict_fn, Partial):
    predict_fn = Partial(predict_fn)
  return Partial(_FlipAverage(flips), predict_fn)


@dataclasses.dataclass(frozen=True)
class FlipTTAApply:
  """`model.apply` with flip TTA: `(variables, images, train=False) -> (mean logits, {})`.

  Drops into the places that call a model's apply for evaluation (the training loop's validation, the
  evaluate tool), so their evaluators see logits as usual. Logits are averaged over the mirrors (for a
  softmax, the normalised geometric mean of the probabilities), which keeps the evaluators' activation.
  """
  apply_fn: Callable[..., Any]
  flips: Tuple[Tuple[int, ...], ...]

  def __call__(self, variables: PyTree, images: Array, train: bool = False) -> Tuple[Array, dict]:
    del train
    return flip_tta(make_predict_fn(self.apply_fn, variables, output="logits"), self.flips)(images), {}


def flip_tta_apply(apply_fn: Callable[..., Any], flips: Sequence[Sequence[int]]) -> FlipTTAApply:
  """`FlipTTAApply` for a model's `apply` and flips as in `flip_tta` (e.g. `[(), (1,)]`: the identity and a
  left-right mirror of 2D images (n, H, W, C))."""
  return FlipTTAApply(apply_fn, _checked_flips(flips, "flip_tta_apply"))


@dataclasses.dataclass(frozen=True)
class _Mean:

  def __call__(self, members: Tuple[Callable[[Array], Array], ...], x: Array) -> Array:
    total = members[0](x).astype(jnp.float32)
    for member in members[1:]:
      total = total + member(x).astype(jnp.float32)
    return total / len(members)


def ensemble(predict_fns: Sequence[Callable[[Array], Array]]) -> Partial:
  """The mean of several prediction functions (e.g. the k folds' models), each `(n, *s, C) -> (n, *s, K)`."""
  members = tuple(f if isinstance(f, Partial) else Partial(f) for f in predict_fns)
  if not members:
    raise ValueError("ensemble: needs at least one prediction function.")
  return Partial(_Mean(), members)


def ensemble_of_variables(apply_fn: Callable[..., Any], variables_list: Sequence[PyTree],
                          output: str = "softmax") -> Partial:
  """An ensemble of one architecture under several sets of variables (checkpoints, folds)."""
  return ensemble([make_predict_fn(apply_fn, v, output) for v in variables_list])
