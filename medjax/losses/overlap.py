"""Region-overlap losses: soft Dice, Dice + cross-entropy, generalized Dice, Tversky, focal Tversky.

All take logits (B, *spatial, K) and labels (B, *spatial) int (or soft targets (B, *spatial, K)), use
softmax probabilities p and one-hot targets y, and return (B,) float32. Per class k, over the kept voxels:
TP_k = sum p_k y_k, FP_k = sum p_k (1 - y_k), FN_k = sum (1 - p_k) y_k.

Smoothing: every ratio is (numerator + smooth) / (denominator + smooth). A class absent from both the
prediction and the label then scores ~1 (no penalty) instead of 0/0; a class present in the label is
barely affected because `smooth` (1e-5) is tiny next to voxel counts.

Background (class 0) is left out of the class mean unless `include_background`. `batch_dice=True` pools
the sums over the batch (nnU-Net's batch Dice) and gives every example the pooled value: per-example
Dice punishes any false positive in a case without the class with a score of ~0, which teaches a network
to under-segment rare classes such as lesions. Under gradient accumulation the pool is the micro-batch.
Masks and `ignore_index` (which multiply) remove voxels from all sums.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from medjax.losses._base import LOSSES, apply_ignore_index, spatial_axes, targets_of
from medjax.losses.voxelwise import softmax_cross_entropy
from medjax.typing import Array


def overlap_sums(logits: Array, labels: Array, mask: Optional[Array], ignore_index: Optional[int],
                 batch_dice: bool) -> Tuple[Array, Array, Array]:
  """(TP, sum p, sum y) per example and class (B, K), or per class (K,) when `batch_dice`."""
  logits = logits.astype(jnp.float32)
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  probs = jax.nn.softmax(logits, axis=-1)
  targets = targets_of(logits, labels)
  if mask is not None:
    weight = jnp.asarray(mask, jnp.float32)[..., None]
    probs, targets = probs * weight, targets * weight
  axes = ((0,) if batch_dice else ()) + spatial_axes(logits)
  return (jnp.sum(probs * targets, axis=axes), jnp.sum(probs, axis=axes), jnp.sum(targets, axis=axes))


def _class_mean_loss(per_class_loss: Array, include_background: bool, batch_size: int) -> Array:
  """Mean over classes (dropping class 0 unless asked), broadcast to (B,)."""
  if not include_background:
    per_class_loss = per_class_loss[..., 1:]
  return jnp.broadcast_to(jnp.mean(per_class_loss, axis=-1), (batch_size,))


@LOSSES.register("dice")
def soft_dice(logits: Array, labels: Array, *, mask: Optional[Array] = None, include_background: bool = False,
              smooth: float = 1e-5, batch_dice: bool = False, ignore_index: Optional[int] = None) -> Array:
  """1 - soft Dice, averaged over classes: Dice_k = (2 TP_k + smooth) / (sum p_k + sum y_k + smooth).

  Smoothing, background, batch Dice, mask and ignore_index: see the module docstring. Returns (B,).
  """
  tp, prob_sum, target_sum = overlap_sums(logits, labels, mask, ignore_index, batch_dice)
  dice = (2.0 * tp + smooth) / (prob_sum + target_sum + smooth)
  return _class_mean_loss(1.0 - dice, include_background, logits.shape[0])


@LOSSES.register("dice_xent")
def dice_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None, dice_weight: float = 1.0,
                       xent_weight: float = 1.0, include_background: bool = False, batch_dice: bool = False,
                       class_weights: Optional[Sequence[float]] = None,
                       ignore_index: Optional[int] = None) -> Array:
  """dice_weight * soft Dice + xent_weight * cross-entropy, the nnU-Net default for segmentation.

  `class_weights` go to the cross-entropy term only. Returns (B,) float32.
  """
  dice = soft_dice(logits, labels, mask=mask, include_background=include_background, batch_dice=batch_dice,
                   ignore_index=ignore_index)
  xent = softmax_cross_entropy(logits, labels, mask=mask, class_weights=class_weights,
                               ignore_index=ignore_index)
  return dice_weight * dice + xent_weight * xent


@LOSSES.register("generalized_dice")
def generalized_dice(logits: Array, labels: Array, *, mask: Optional[Array] = None,
                     include_background: bool = False, smooth: float = 1e-5, batch_dice: bool = False,
                     ignore_index: Optional[int] = None) -> Array:
  """Generalized Dice loss (Sudre et al. 2017, DLMIA): one ratio over all classes, weighted by volume.

  GDL = 1 - (2 sum_k w_k TP_k + smooth) / (sum_k w_k (sum p_k + sum y_k) + smooth), w_k = 1 / V_k^2 with
  V_k = sum y_k the reference volume, so small structures count as much as large ones. The paper leaves
  absent classes (V_k = 0, w_k infinite) open: here they get the largest weight among the present classes
  (their false positives still cost), and weights are normalised to sum to 1 so that `smooth` acts on the
  same scale as in plain Dice. With no class present at all every weight is 1.
  Returns (B,) float32.
  """
  tp, prob_sum, target_sum = overlap_sums(logits, labels, mask, ignore_index, batch_dice)
  if not include_background:
    tp, prob_sum, target_sum = tp[..., 1:], prob_sum[..., 1:], target_sum[..., 1:]
  present = target_sum > 0
  inverse_square = jnp.where(present, 1.0 / jnp.maximum(target_sum, 1e-12) ** 2, 0.0)
  largest = jnp.max(inverse_square, axis=-1, keepdims=True)
  weights = jnp.where(present, inverse_square, jnp.where(largest > 0, largest, 1.0))
  weights = jax.lax.stop_gradient(weights / jnp.sum(weights, axis=-1, keepdims=True))
  numerator = 2.0 * jnp.sum(weights * tp, axis=-1) + smooth
  denominator = jnp.sum(weights * (prob_sum + target_sum), axis=-1) + smooth
  return jnp.broadcast_to(1.0 - numerator / denominator, logits.shape[:1])


def tversky_index(tp: Array, prob_sum: Array, target_sum: Array, alpha: float, beta: float,
                  smooth: float) -> Array:
  """(TP + smooth) / (TP + alpha FP + beta FN + smooth) from the overlap sums."""
  false_pos, false_neg = prob_sum - tp, target_sum - tp
  return (tp + smooth) / (tp + alpha * false_pos + beta * false_neg + smooth)


@LOSSES.register("tversky")
def tversky(logits: Array, labels: Array, *, mask: Optional[Array] = None, alpha: float = 0.3,
            beta: float = 0.7, include_background: bool = False, smooth: float = 1e-5, batch_dice: bool = False,
            ignore_index: Optional[int] = None) -> Array:
  """1 - Tversky index, averaged over classes (Salehi et al. 2017, MLMI).

  TI_k = (TP_k + smooth) / (TP_k + alpha FP_k + beta FN_k + smooth): alpha weighs false positives, beta
  false negatives; beta > alpha favours recall (the paper's best was alpha = 0.3, beta = 0.7). alpha =
  beta = 0.5 is the soft Dice (up to how `smooth` enters). Returns (B,) float32.
  """
  tp, prob_sum, target_sum = overlap_sums(logits, labels, mask, ignore_index, batch_dice)
  index = tversky_index(tp, prob_sum, target_sum, alpha, beta, smooth)
  return _class_mean_loss(1.0 - index, include_background, logits.shape[0])


@LOSSES.register("focal_tversky")
def focal_tversky(logits: Array, labels: Array, *, mask: Optional[Array] = None, alpha: float = 0.3,
                  beta: float = 0.7, gamma: float = 4.0 / 3.0, include_background: bool = False,
                  smooth: float = 1e-5, batch_dice: bool = False, ignore_index: Optional[int] = None) -> Array:
  """Focal Tversky loss (Abraham & Khan 2019, ISBI): mean over classes of (1 - TI_k)^(1 / gamma).

  As in the paper the exponent is 1/gamma, with gamma in [1, 3] and 4/3 recommended: gamma > 1 raises the
  loss (and gradient) of classes that are already fairly well segmented less than of the hard ones.
  alpha / beta weigh FP / FN as in `tversky`; gamma = 1 is the Tversky loss. Returns (B,) float32.
  """
  tp, prob_sum, target_sum = overlap_sums(logits, labels, mask, ignore_index, batch_dice)
  index = tversky_index(tp, prob_sum, target_sum, alpha, beta, smooth)
  # Clamped away from 0: d/dx x^(1/gamma) is infinite at 0 for gamma > 1 (a perfectly segmented class).
  per_class = jnp.maximum(1.0 - index, 1e-7) ** (1.0 / gamma)
  return _class_mean_loss(per_class, include_background, logits.shape[0])
