"""Shared pieces of the losses: the registry and the mask / ignore-label / class-vector helpers."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medjax.registry import Registry
from medjax.typing import Array

LOSSES = Registry("loss")

# Keyword arguments of a loss that the objective fills from the batch; a config never sets them.
BATCH_INPUTS = ("mask", "distance_map")


def spatial_axes(logits: Array) -> tuple:
  """Axes between the batch and class axes (empty for classification logits)."""
  return tuple(range(1, logits.ndim - 1))


def broadcast_mask(mask: Array, values: Array) -> Array:
  """float32 `mask` with trailing singleton axes added until it broadcasts against `values`."""
  mask = jnp.asarray(mask, jnp.float32)
  return mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))


def mean_per_example(values: Array, mask: Optional[Array]) -> Array:
  """Mean over all non-batch axes of `values` (B, ...), restricted to `mask` where given.

  `mask` may have fewer axes than `values` (e.g. (B, *spatial) against per-label values (B, *spatial, K));
  it is broadcast over the missing trailing axes. An example with an empty mask gets 0, not NaN.
  """
  axes = tuple(range(1, values.ndim))
  if mask is None:
    return jnp.mean(values, axis=axes) if axes else values
  weight = jnp.broadcast_to(broadcast_mask(mask, values), values.shape)
  return jnp.sum(values * weight, axis=axes) / jnp.maximum(jnp.sum(weight, axis=axes), 1.0)


def apply_ignore_index(logits: Array, labels: Array, mask: Optional[Array],
                       ignore_index: Optional[int]) -> Tuple[Array, Optional[Array]]:
  """Folds the ignore label into the mask: returns (labels with ignored voxels set to 0, mask).

  A voxel counts only if it is kept by `mask` (nonzero) AND its label is not `ignore_index`; the two
  multiply. The ignored voxels' labels are replaced by class 0 so the one-hot stays well defined; their
  mask weight is 0, so that class never sees them. Needs integer class-index labels.
  """
  if ignore_index is None:
    return labels, mask
  if labels.ndim == logits.ndim:
    raise ValueError("ignore_index needs integer class-index labels (B, *spatial); got soft / multi-label "
                     f"targets of shape {labels.shape}. Use a mask instead.")
  valid = labels != ignore_index
  labels = jnp.where(valid, labels, 0)
  valid = valid.astype(jnp.float32)
  return labels, valid if mask is None else valid * jnp.asarray(mask, jnp.float32)


def targets_of(logits: Array, labels: Array) -> Array:
  """float32 targets with the logits' shape: one-hot of class indices, or soft targets passed through."""
  if labels.ndim == logits.ndim:
    return labels.astype(jnp.float32)
  return jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)


def class_vector(values: Union[float, Sequence[float], None], num_classes: int, what: str) -> Optional[Array]:
  """A per-class float32 vector (K,) from a tuple of K numbers (None passes through)."""
  if values is None:
    return None
  vector = jnp.asarray(values, jnp.float32)
  if vector.ndim != 1 or vector.shape[0] != num_classes:
    raise ValueError(f"{what} must hold one number per class ({num_classes}), got {values!r}.")
  return vector


def label_weight_vector(values: Union[float, Sequence[float], None], num_labels: int,
                        what: str) -> Optional[Array]:
  """A scalar, or a per-label vector (K,), for sigmoid losses (None passes through)."""
  if values is None:
    return None
  vector = jnp.asarray(values, jnp.float32)
  if vector.ndim == 0:
    return vector
  return class_vector(values, num_labels, what)


def overlap_class_weights(values: Union[float, Sequence[float], None], num_classes: int, include_background: bool,
                          what: str) -> Optional[Array]:
  """Per-class weights of an overlap (Dice) term over the classes it averages, float32 (K,) or (K - 1,).

  `values` is one number (every class), K numbers (one per class; class 0's is dropped when the background is
  excluded, as MONAI's DiceCELoss passes `weight[1:]` to its Dice) or, when the background is excluded, the
  K - 1 foreground weights (as MONAI's DiceLoss(weight=) takes them). Weights must be >= 0. None passes.
  """
  if values is None:
    return None
  array = np.asarray(values, np.float64)
  if np.any(array < 0) or not np.all(np.isfinite(array)):
    raise ValueError(f"{what} must be finite and >= 0, got {values!r}.")
  kept = num_classes if include_background else num_classes - 1
  if array.ndim == 0:
    return jnp.full((kept,), float(array), jnp.float32)
  if array.ndim == 1 and array.shape[0] == num_classes:
    return jnp.asarray(array if include_background else array[1:], jnp.float32)
  if array.ndim == 1 and array.shape[0] == kept:
    return jnp.asarray(array, jnp.float32)
  foreground = "" if include_background else f" or one per foreground class ({kept})"
  raise ValueError(f"{what} must be one number, one per class ({num_classes}){foreground}, got {values!r}.")
