"""What an attribution explains: one scalar score per example, from the model's logits and a target.

Every method of `medjax.interpret` has the signature `(model, variables, images, target, **options) -> maps`
and explains `score(logits, target)`:

  classification  logits (B, K), target (B,) int class indices: score[b] = logits[b, target[b]];
  segmentation    logits (B, *spatial, K), target (B, *spatial) region mask (0/1 or weights) of one class given
                  as `RegionTarget(mask, class_index)`: score[b] = sum over the mask of logits[b, ..., class].

Scores are summed over the batch before differentiation (examples do not interact in eval mode, so each
example's gradient is its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RegionTarget:
  """A segmentation target: the logits of `class_index` summed over `mask` `(B, *spatial)` (Grad-CAM of a class
  region, as MONAI's and the seg-grad-cam literature's)."""
  mask: Any
  class_index: int


Target = Union[jax.Array, RegionTarget]


def scores(logits: jax.Array, target: Target) -> jax.Array:
  """Per-example scores `(B,)` (float32) of `logits` for `target` (module docstring)."""
  logits = logits.astype(jnp.float32)
  if isinstance(target, RegionTarget):
    mask = jnp.asarray(target.mask, jnp.float32)
    if mask.shape != logits.shape[:-1]:
      raise ValueError(f"RegionTarget.mask must have the logits' shape without classes {logits.shape[:-1]}, got "
                       f"{mask.shape}")
    region = logits[..., target.class_index] * mask
    return region.reshape(region.shape[0], -1).sum(axis=1)
  target = jnp.asarray(target)
  if logits.ndim != 2 or target.shape != logits.shape[:1]:
    raise ValueError(f"a class target needs logits (B, K) and target (B,), got logits {logits.shape} and target "
                     f"{target.shape}; for segmentation logits use RegionTarget(mask, class_index)")
  return jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=1)[:, 0]


def score_fn(model: Any, variables: Any, target: Target) -> Callable[[jax.Array], jax.Array]:
  """`f(images) -> (B,)` scores of the model in eval mode (`model.apply(variables, images, train=False)`)."""

  def f(images):
    logits, _ = model.apply(variables, images, train=False)
    return scores(logits, target)

  return f


def split_target(target: Target) -> Tuple[jax.Array, Optional[int]]:
  """(array, class_index) for a jitted method: the array is traced, the class index (None for class targets)
  static, because a RegionTarget holds an array and cannot itself be a static (hashed) argument."""
  if isinstance(target, RegionTarget):
    return jnp.asarray(target.mask, jnp.float32), int(target.class_index)
  return jnp.asarray(target), None


def join_target(array: jax.Array, class_index: Optional[int]) -> Target:
  """The inverse of `split_target`."""
  return array if class_index is None else RegionTarget(array, class_index)
