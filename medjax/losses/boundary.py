"""Boundary loss (Kervadec et al. 2019, MIDL / MedIA 2021) and the host-side signed distance maps it needs.

The loss integrates the softmax probabilities against a precomputed signed distance map (SDM) of the
reference: probability inside the object earns negative distance, probability outside costs its distance
to the object, so the minimum is reached by covering exactly the object. SDMs are computed on the host
per case, in mm (`medjax.data.preprocess.signed_distance_maps`), and arrive in the batch as "distance_map".
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from medjax.losses._base import LOSSES, apply_ignore_index, mean_per_example
from medjax.losses.overlap import soft_dice
from medjax.typing import Array


@LOSSES.register("boundary")
def boundary_loss(logits: Array, labels: Array, *, distance_map: Array, mask: Optional[Array] = None,
                  include_background: bool = False, ignore_index: Optional[int] = None) -> Array:
  """Boundary loss: mean over the kept voxels of sum_k phi_k p_k (mm), over foreground classes.

  Args:
    logits: (B, *spatial, K).
    labels: (B, *spatial) int; used only for `ignore_index` (the geometry comes from `distance_map`).
    distance_map: (B, *spatial, K) float32 signed distance maps, batch["distance_map"] (see
      `medjax.data.preprocess.signed_distance_maps`).
    mask / ignore_index: voxels left out of the mean (they multiply).
    include_background: also integrate class 0 (Kervadec et al. use foreground classes only).
  Returns: (B,) float32, negative at a good prediction; its minimum is not 0, so it is usually added to a
  region loss with a small weight that grows over training ("dice_boundary").
  """
  logits = logits.astype(jnp.float32)
  if distance_map.shape != logits.shape:
    raise ValueError(f"boundary loss: batch['distance_map'] has shape {distance_map.shape}, expected the "
                     f"logits' shape {logits.shape} (one signed distance map per class).")
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  per_class = jax.nn.softmax(logits, axis=-1) * distance_map.astype(jnp.float32)
  if not include_background:
    per_class = per_class[..., 1:]
  return mean_per_example(jnp.sum(per_class, axis=-1), mask)


@LOSSES.register("dice_boundary")
def dice_boundary(logits: Array, labels: Array, *, distance_map: Array, mask: Optional[Array] = None,
                  boundary_weight: float = 0.01, include_background: bool = False, batch_dice: bool = False,
                  class_weights: Union[float, Sequence[float], None] = None,
                  ignore_index: Optional[int] = None) -> Array:
  """soft Dice + boundary_weight * boundary loss (Kervadec et al. start at 0.01 and raise it over training).

  `include_background` applies to both terms; `class_weights` weight the Dice term's classes as in "dice".
  Returns (B,) float32.
  """
  dice = soft_dice(logits, labels, mask=mask, include_background=include_background, batch_dice=batch_dice,
                   class_weights=class_weights, ignore_index=ignore_index)
  boundary = boundary_loss(logits, labels, distance_map=distance_map, mask=mask,
                           include_background=include_background, ignore_index=ignore_index)
  return dice + boundary_weight * boundary
