"""Per-example losses, selectable by name from a config (`loss = "dice_xent"` or `dict(name=..., **kw)`).

Every loss maps `(logits, labels)` to one value per example, shape (B,); the train step averages them.
Segmentation: logits (B, *spatial, K) float, labels (B, *spatial) int class indices. Classification:
logits (B, K), labels (B,). All arithmetic runs in float32 whatever the compute dtype of the model.
Labels enter through a one-hot product, not a gather: gathering along a 3D label map made XLA compile
7x slower on GPU for no runtime gain (PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from medjax.registry import Registry
from medjax.typing import Array, Batch, PyTree

LOSSES = Registry("loss")


def _spatial_axes(logits: Array) -> tuple:
  """Axes between the batch and class axes (empty for classification logits)."""
  return tuple(range(1, logits.ndim - 1))


def _mean_per_example(values: Array, mask: Optional[Array]) -> Array:
  """Mean over all non-batch axes of `values` (B, ...), restricted to `mask` where given."""
  axes = tuple(range(1, values.ndim))
  if mask is None:
    return jnp.mean(values, axis=axes) if axes else values
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


@LOSSES.register("xent")
def softmax_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None,
                          label_smoothing: float = 0.0) -> Array:
  """Softmax cross-entropy averaged over voxels (or one value per example for classification).

  Args:
    logits: (B, *spatial, K) or (B, K).
    labels: (B, *spatial) or (B,) integer classes in [0, K), or float soft targets with the logits' shape
      (e.g. mixup / cutmix targets from `medjax.augment`).
    mask: optional (B, *spatial) weights, 0 to ignore a voxel.
    label_smoothing: mass moved uniformly to all classes (0 = none).
  Returns: (B,) float32.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if labels.ndim == logits.ndim:  # soft targets
    targets = labels.astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_voxel = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return _mean_per_example(per_voxel, mask)


@LOSSES.register("bce")
def sigmoid_binary_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None) -> Array:
  """Multi-label binary cross-entropy: logits (B, K), labels (B, K) in {0, 1}; mean over labels."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  per_label = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return _mean_per_example(per_label, mask)


@LOSSES.register("dice")
def soft_dice(logits: Array, labels: Array, *, mask: Optional[Array] = None, include_background: bool = False,
              smooth: float = 1e-5, batch_dice: bool = False) -> Array:
  """1 - soft Dice per example, averaged over classes.

  Dice_k = (2 sum(p_k y_k) + smooth) / (sum p_k + sum y_k + smooth) with softmax probabilities p. The
  small `smooth` keeps a class that is absent from both prediction and label at Dice ~1 (no penalty) and
  avoids 0/0. Background (class 0) is left out unless `include_background`.

  `batch_dice=True` pools the sums over the whole batch (nnU-Net's batch Dice) and gives every example
  that one value. Per-example Dice punishes any false positive in a case without the class with a Dice of
  ~0, which teaches a network to under-segment rare classes such as lesions; pooling avoids that. Under
  gradient accumulation the pool is the micro-batch.

  Returns: (B,) float32.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mask is not None:
    weight = mask.astype(jnp.float32)[..., None]
    probs, targets = probs * weight, targets * weight
  axes = _spatial_axes(logits)
  if batch_dice:
    axes = (0,) + axes
  intersection = jnp.sum(probs * targets, axis=axes)
  denominator = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
  dice = (2.0 * intersection + smooth) / (denominator + smooth)  # (B, K), or (K,) for batch Dice
  if not include_background:
    dice = dice[..., 1:]
  loss = 1.0 - jnp.mean(dice, axis=-1)
  return jnp.broadcast_to(loss, logits.shape[:1])


@LOSSES.register("dice_xent")
def dice_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None, dice_weight: float = 1.0,
                       xent_weight: float = 1.0, include_background: bool = False,
                       batch_dice: bool = False) -> Array:
  """Soft Dice + cross-entropy, the nnU-Net default for segmentation. Returns (B,) float32."""
  return (dice_weight * soft_dice(logits, labels, mask=mask, include_background=include_background,
                                  batch_dice=batch_dice)
          + xent_weight * softmax_cross_entropy(logits, labels, mask=mask))


Objective = Callable[[Array, Mapping[str, PyTree], Batch], Array]


def make_objective(name: str, kwargs: Mapping) -> Objective:
  """Binds a registered loss to the batch layout: `objective(outputs, aux, batch) -> (B,)`.

  The batch provides "label" and optionally "mask" (voxels to ignore). `aux` is accepted so that
  auxiliary terms (deep supervision, multi-task heads) can be added here without touching the step.
  """
  loss_fn = LOSSES.get(name)
  kwargs = dict(kwargs)

  def objective(outputs: Array, aux: Mapping[str, PyTree], batch: Batch) -> Array:
    del aux
    return loss_fn(outputs, batch["label"], mask=batch.get("mask"), **kwargs)

  return objective
