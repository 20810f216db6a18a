"""Overlap metrics for segmentation.

Convention (as MONAI's `ignore_empty=True`): a class absent from a case's reference is left out of that
case's Dice (NaN), so cases without a lesion neither reward nor punish the lesion class; a class present in
the reference but not predicted scores 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax.typing import Array


def segmentation_counts(logits: Array, labels: Array) -> Array:
  """Per-example, per-class voxel counts of the argmax prediction (jittable).

  Args:
    logits: (B, *spatial, K).
    labels: (B, *spatial) integer classes.
  Returns:
    (B, K, 3) float32: [intersection, predicted voxels, reference voxels] for each class.
  """
  num_classes = logits.shape[-1]
  axes = tuple(range(1, logits.ndim - 1))
  pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.float32)
  ref = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.stack([jnp.sum(pred * ref, axis=axes), jnp.sum(pred, axis=axes), jnp.sum(ref, axis=axes)], -1)


def dice_per_case(counts: np.ndarray) -> np.ndarray:
  """Dice per case and class from `segmentation_counts` output (N, K, 3) -> (N, K), NaN where the
  reference is empty."""
  counts = np.asarray(counts, np.float64)
  intersection, predicted, reference = counts[..., 0], counts[..., 1], counts[..., 2]
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = 2.0 * intersection / (predicted + reference)
  return np.where(reference > 0, dice, np.nan)
