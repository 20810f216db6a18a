"""Voxel-wise (and per-example classification) losses: cross-entropy, binary cross-entropy, focal.

Segmentation: logits (B, *spatial, K), labels (B, *spatial) int class indices. Classification: logits
(B, K), labels (B,). Values are averaged over the voxels a `mask` keeps (and, with `ignore_index`, whose
label is not the ignore label), giving one value per example. Labels enter through a one-hot product,
not a gather: gathering along a 3D label map made XLA compile 7x slower on GPU (PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from medjax.losses._base import (LOSSES, apply_ignore_index, class_vector, label_weight_vector,
                                 mean_per_example, targets_of)
from medjax.typing import Array

# (1 - p)^gamma is clamped here: at p == 1 exactly its derivative is infinite for gamma < 1.
_FOCAL_EPS = 1e-7


@LOSSES.register("xent")
def softmax_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None,
                          label_smoothing: float = 0.0, class_weights: Optional[Sequence[float]] = None,
                          ignore_index: Optional[int] = None) -> Array:
  """Softmax cross-entropy averaged over voxels (or one value per example for classification).

  Args:
    logits: (B, *spatial, K) or (B, K).
    labels: (B, *spatial) or (B,) integer classes in [0, K), or float soft targets with the logits' shape
      (e.g. mixup / cutmix targets from `medjax.augment`).
    mask: optional (B, *spatial) weights, 0 to ignore a voxel.
    label_smoothing: mass moved uniformly to all classes (0 = none).
    class_weights: optional K numbers; each voxel's cross-entropy is multiplied by the weight of its
      (unsmoothed) target class, sum_k y_k w_k for soft targets. The mean stays over the kept voxels, not
      divided by the summed weights, so the weights also scale the loss (and a classification example
      keeps its weight; dividing per example would cancel it).
    ignore_index: label value whose voxels are left out; multiplies with `mask` (a voxel counts only if
      both keep it). Needs integer labels.
  Returns: (B,) float32.
  """
  logits = logits.astype(jnp.float32)
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  num_classes = logits.shape[-1]
  targets = targets_of(logits, labels)
  weights = class_vector(class_weights, num_classes, "xent class_weights")
  voxel_weight = None if weights is None else jnp.sum(targets * weights, axis=-1)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_voxel = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  if voxel_weight is not None:
    per_voxel = per_voxel * voxel_weight
  return mean_per_example(per_voxel, mask)


def binary_targets(logits: Array, labels: Array) -> Array:
  """float32 0/1 targets shaped like `logits` for the sigmoid losses.

  labels with the logits' shape are multi-label targets; class indices (one axis fewer) become the K
  one-vs-rest indicators, or the positive indicator itself when K == 1.
  """
  if labels.ndim == logits.ndim:
    return labels.astype(jnp.float32)
  if logits.shape[-1] == 1:
    return labels.astype(jnp.float32)[..., None]
  return jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)


def _sigmoid_cross_entropy(logits: Array, targets: Array, pos_weight: Optional[Array]) -> Array:
  """Element-wise -(w y log s(x) + (1 - y) log(1 - s(x))), via softplus for stability."""
  positive = jax.nn.softplus(-logits)  # -log s(x)
  negative = jax.nn.softplus(logits)   # -log(1 - s(x))
  if pos_weight is not None:
    positive = positive * pos_weight
  return targets * positive + (1.0 - targets) * negative


@LOSSES.register("bce")
def sigmoid_binary_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None,
                                 pos_weight: Union[float, Sequence[float], None] = None,
                                 ignore_index: Optional[int] = None) -> Array:
  """Binary cross-entropy per label, mean over labels (and voxels): multi-label or binary tasks.

  Args:
    logits: (B, K) or (B, *spatial, K).
    labels: same shape as logits in {0, 1} (multi-label), or class indices with one axis fewer (K == 1:
      the 0/1 positive indicator; K > 1: one-vs-rest of each class).
    mask: optional weights, (B,) / (B, *spatial) or with the logits' shape.
    pos_weight: multiplies the positive term, a scalar or one number per label (> 1 raises recall; e.g.
      negatives / positives for a rare label).
    ignore_index: label value left out (class-index labels only); multiplies with `mask`.
  Returns: (B,) float32.
  """
  logits = logits.astype(jnp.float32)
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  targets = binary_targets(logits, labels)
  weight = label_weight_vector(pos_weight, logits.shape[-1], "bce pos_weight")
  return mean_per_example(_sigmoid_cross_entropy(logits, targets, weight), mask)


def _modulation(one_minus_p: Array, gamma: float) -> Array:
  if gamma == 0:
    return jnp.ones_like(one_minus_p)
  return jnp.maximum(one_minus_p, _FOCAL_EPS) ** gamma


@LOSSES.register("focal")
def softmax_focal(logits: Array, labels: Array, *, mask: Optional[Array] = None, gamma: float = 2.0,
                  alpha: Optional[Sequence[float]] = None, ignore_index: Optional[int] = None) -> Array:
  """Multi-class focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"), softmax form.

  Per voxel: -sum_k alpha_k (1 - p_k)^gamma y_k log p_k, averaged like `softmax_cross_entropy`; gamma = 0
  with alpha = None is exactly the cross-entropy. Down-weights voxels that are already well classified.

  Args:
    logits: (B, *spatial, K) or (B, K); labels: class indices or soft targets (see cross-entropy).
    gamma: focusing exponent >= 0 (2 in the paper).
    alpha: optional K per-class weights (the multi-class form of the paper's balancing factor).
    mask / ignore_index: as for `softmax_cross_entropy`.
  Returns: (B,) float32.
  """
  logits = logits.astype(jnp.float32)
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  targets = targets_of(logits, labels)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_class = -targets * _modulation(1.0 - jnp.exp(log_probs), gamma) * log_probs
  weights = class_vector(alpha, logits.shape[-1], "focal alpha")
  if weights is not None:
    per_class = per_class * weights
  return mean_per_example(jnp.sum(per_class, axis=-1), mask)


@LOSSES.register("sigmoid_focal")
def sigmoid_focal(logits: Array, labels: Array, *, mask: Optional[Array] = None, gamma: float = 2.0,
                  alpha: Optional[float] = None, class_weights: Union[float, Sequence[float], None] = None,
                  ignore_index: Optional[int] = None) -> Array:
  """Binary / multi-label focal loss (Lin et al. 2017), sigmoid form, mean over labels (and voxels).

  Per element: a_t (1 - p_t)^gamma BCE with p_t = p if y = 1 else 1 - p, and a_t = alpha for positives,
  1 - alpha for negatives (alpha = 0.25 in the paper; None = no balancing). gamma = 0, alpha = None is
  exactly `sigmoid_binary_cross_entropy`. Labels and mask as for that loss. `class_weights` (a scalar or one
  number per label) multiply each label's term before the mean, as MONAI's FocalLoss(weight=).
  Returns: (B,) float32.
  """
  logits = logits.astype(jnp.float32)
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  targets = binary_targets(logits, labels)
  probs = jax.nn.sigmoid(logits)
  p_true = targets * probs + (1.0 - targets) * (1.0 - probs)
  per_label = _modulation(1.0 - p_true, gamma) * _sigmoid_cross_entropy(logits, targets, None)
  if alpha is not None:
    per_label = per_label * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
  weights = label_weight_vector(class_weights, logits.shape[-1], "sigmoid_focal class_weights")
  if weights is not None:
    per_label = per_label * weights
  return mean_per_example(per_label, mask)
