"""Regression losses: L1, L2 (mean squared error) and Huber, one value per example.

Predictions ("logits") are (B, T) (T regression targets) or dense (B, *spatial, T); targets have the same
shape, or one axis fewer when T == 1 (e.g. (B,) for a single score). Values are averaged over targets
(and voxels), restricted to `mask` where given (its missing trailing axes are broadcast).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from medjax.losses._base import LOSSES, mean_per_example
from medjax.typing import Array


def _residual(predictions: Array, targets: Array) -> Array:
  predictions = predictions.astype(jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if targets.ndim == predictions.ndim - 1:
    if predictions.shape[-1] != 1:
      raise ValueError(f"regression loss: targets of shape {targets.shape} need predictions with one output "
                       f"(..., 1), got {predictions.shape}; give targets of shape {predictions.shape}.")
    targets = targets[..., None]
  if targets.shape != predictions.shape:
    raise ValueError(f"regression loss: targets of shape {targets.shape} do not match predictions "
                     f"{predictions.shape}.")
  return predictions - targets


@LOSSES.register("l1")
def l1_loss(logits: Array, labels: Array, *, mask: Optional[Array] = None) -> Array:
  """Mean absolute error |prediction - target|. Returns (B,) float32."""
  return mean_per_example(jnp.abs(_residual(logits, labels)), mask)


@LOSSES.register("l2")
def l2_loss(logits: Array, labels: Array, *, mask: Optional[Array] = None) -> Array:
  """Mean squared error (prediction - target)^2, no 1/2 factor. Also registered as "mse". Returns (B,)."""
  return mean_per_example(jnp.square(_residual(logits, labels)), mask)


LOSSES.add("mse", l2_loss)


@LOSSES.register("huber")
def huber_loss(logits: Array, labels: Array, *, mask: Optional[Array] = None, delta: float = 1.0) -> Array:
  """Huber loss (Huber 1964): r^2 / 2 for |r| <= delta, delta (|r| - delta / 2) beyond; r = pred - target.

  Quadratic near 0 and linear in the tails, so outlier targets pull with bounded force. Returns (B,).
  """
  if delta <= 0:
    raise ValueError(f"huber loss: delta must be > 0, got {delta}.")
  abs_residual = jnp.abs(_residual(logits, labels))
  quadratic = jnp.minimum(abs_residual, delta)
  return mean_per_example(0.5 * quadratic ** 2 + delta * (abs_residual - quadratic), mask)
