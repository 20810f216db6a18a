"""Region-overlap losses: soft Dice, Dice + cross-entropy, Dice + focal, generalized Dice, Tversky, focal Tversky.

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

Class weights (MONAI's DiceLoss `weight=`): the per-class Dice losses are multiplied by `class_weights` before
the mean over classes, mean_k w_k (1 - Dice_k), not renormalised, so weights summing to the number of
classes keep the loss on its usual scale. See `_base.overlap_class_weights` for the accepted lengths.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medjax.losses._base import LOSSES, apply_ignore_index, overlap_class_weights, spatial_axes, targets_of
from medjax.losses.voxelwise import softmax_cross_entropy, softmax_focal
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


def class_mean_loss(per_class_loss: Array, include_background: bool, batch_size: int,
                    weights: Optional[Array] = None) -> Array:
  """Mean over classes of weights * per-class loss (dropping class 0 unless asked), broadcast to (B,).

  `weights`: None or the (K,) / (K - 1,) vector of `overlap_class_weights`, over the kept classes.
  """
  if not include_background:
    per_class_loss = per_class_loss[..., 1:]
  if weights is not None:
    per_class_loss = per_class_loss * weights
  return jnp.broadcast_to(jnp.mean(per_class_loss, axis=-1), (batch_size,))



@LOSSES.register("dice")
def soft_dice(logits: Array, labels: Array, *, mask: Optional[Array] = None, include_background: bool = False,
              smooth: float = 1e-5, batch_dice: bool = False,
              class_weights: Union[float, Sequence[float], None] = None, ignore_index: Optional[int] = None) -> Array:
  """1 - soft Dice, averaged over classes: Dice_k = (2 TP_k + smooth) / (sum p_k + sum y_k + smooth).

  Args:
    logits: (B, *spatial, K); labels: (B, *spatial) class indices or soft targets (B, *spatial, K).
    class_weights: None, one number, K numbers, or (background excluded) the K - 1 foreground weights; the
      loss is mean_k w_k (1 - Dice_k) (module docstring).
    Smoothing, background, batch Dice, mask and ignore_index: see the module docstring.
  Returns (B,) float32.
  """
  tp, prob_sum, target_sum = overlap_sums(logits, labels, mask, ignore_index, batch_dice)
  dice = (2.0 * tp + smooth) / (prob_sum + target_sum + smooth)
  weights = overlap_class_weights(class_weights, logits.shape[-1], include_background, "dice class_weights")
  return class_mean_loss(1.0 - dice, include_background, logits.shape[0], weights)


def _compound_class_weights(class_weights, num_classes: int, what: str) -> Optional[np.ndarray]:
  """Class weights that a compound passes to both of its terms: K numbers, one per class. Checked as numpy
  constants, since a jnp array made here would be a tracer under jit."""
  if class_weights is None:
    return None
  weights = np.asarray(class_weights, np.float64)
  if weights.shape != (num_classes,):
    raise ValueError(f"{what} must hold one number per class ({num_classes}), got {class_weights!r}.")
  return weights


@LOSSES.register("dice_xent")
def dice_cross_entropy(logits: Array, labels: Array, *, mask: Optional[Array] = None, dice_weight: float = 1.0,
                       xent_weight: float = 1.0, include_background: bool = False, batch_dice: bool = False,
                       class_weights: Optional[Sequence[float]] = None,
                       ignore_index: Optional[int] = None) -> Array:
  """dice_weight * soft Dice + xent_weight * cross-entropy, the nnU-Net default for segmentation.

  `class_weights` (K numbers, one per class) weight both terms, as MONAI's DiceCELoss(weight=): each voxel's
  cross-entropy by its class's weight, and the per-class Dice losses by theirs (class 0's dropped unless
  `include_background`). Returns (B,) float32.
  """
  weights = _compound_class_weights(class_weights, logits.shape[-1], "dice_xent class_weights")
  dice = soft_dice(logits, labels, mask=mask, include_background=include_background, batch_dice=batch_dice,
                   class_weights=weights, ignore_index=ignore_index)
  xent = softmax_cross_entropy(logits, labels, mask=mask, class_weights=weights, ignore_index=ignore_index)
  return dice_weight * dice + xent_weight * xent


@LOSSES.register("dice_focal")
def dice_focal(logits: Array, labels: Array, *, mask: Optional[Array] = None, dice_weight: float = 1.0,
               focal_weight: float = 1.0, gamma: float = 2.0, include_background: bool = False,
               smooth: float = 1e-5, batch_dice: bool = False, class_weights: Optional[Sequence[float]] = None,
               ignore_index: Optional[int] = None) -> Array:
  """dice_weight * soft Dice + focal_weight * softmax focal loss, as MONAI's DiceFocalLoss (its lambda_dice,
  lambda_focal) with softmax Dice.

  The focal term is medjax's "focal" loss (Lin et al. 2017, softmax form): per voxel -sum_k w_k (1 - p_k)^gamma
  y_k log p_k over all classes, averaged over voxels, so gamma = 0 without weights is the cross-entropy and
  this loss is then "dice_xent". MONAI's FocalLoss is the sigmoid form averaged over channels as well, which
  differs by about a factor K; for sigmoid outputs use "sigmoid_dice_focal".

  Args:
    dice_weight, focal_weight: the two terms' weights (>= 0).
    gamma: focusing exponent >= 0 (2 in the paper).
    class_weights: K numbers, one per class: the Dice losses' weights (class 0's dropped unless
      `include_background`) and the focal loss's per-class alpha, as MONAI's DiceFocalLoss(weight=).
    include_background, smooth, batch_dice, mask, ignore_index: as for "dice" (the focal term always covers
      every class).
  Returns (B,) float32.
  """
  weights = _compound_class_weights(class_weights, logits.shape[-1], "dice_focal class_weights")
  dice = soft_dice(logits, labels, mask=mask, include_background=include_background, smooth=smooth,
                   batch_dice=batch_dice, class_weights=weights, ignore_index=ignore_index)
  focal = softmax_focal(logits, labels, mask=mask, gamma=gamma, alpha=weights, ignore_index=ignore_index)
  return dice_weight * dice + focal_weight * focal


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
  return class_mean_loss(1.0 - index, include_background, logits.shape[0])


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
  return class_mean_loss(per_class, include_background, logits.shape[0])
