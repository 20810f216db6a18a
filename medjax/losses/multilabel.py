"""Overlap losses on sigmoid outputs, for overlapping multi-label regions: sigmoid Dice and its compounds.

BraTS-style targets are nested regions (whole tumour, tumour core, enhancing tumour) given as one binary
channel each, labels (B, *spatial, K); a voxel may belong to several channels, so each channel gets its
own sigmoid instead of a softmax over classes (Isensee et al. 2021, nnU-Net's region-based training;
MONAI's DiceLoss(sigmoid=True)). Class-index labels (B, *spatial) are read as one-vs-rest channels
(K = 1: the positive indicator), as by the "bce" loss.

Per channel k, with p = sigmoid(logit) and y the target, over the kept voxels: TP_k = sum p_k y_k and
Dice_k = (2 TP_k + smooth) / (sum p_k + sum y_k + smooth); smoothing, `batch_dice`, masks and
`ignore_index` work as in `medjax.losses.overlap`.

`include_background` follows MONAI: when False, channel 0 is left out of every term (a channel-0
"background" output); with a single channel it is ignored. The default is True, unlike the softmax "dice",
because region channels (BraTS) have no background channel and dropping channel 0 would drop a region.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from medjax.losses._base import (LOSSES, apply_ignore_index, broadcast_mask, label_weight_vector,
                                 overlap_class_weights, spatial_axes)
from medjax.losses.overlap import class_mean_loss
from medjax.losses.voxelwise import binary_targets, sigmoid_binary_cross_entropy, sigmoid_focal
from medjax.typing import Array

Weights = Union[float, Sequence[float], None]


def _prepared(logits: Array, labels: Array, mask: Optional[Array],
              ignore_index: Optional[int]) -> Tuple[Array, Array, Optional[Array]]:
  """(float32 logits, float32 0/1 targets shaped like the logits, mask) with the ignore label folded in."""
  logits = logits.astype(jnp.float32)
  labels, mask = apply_ignore_index(logits, labels, mask, ignore_index)
  return logits, binary_targets(logits, labels), mask


def _keeps_background(include_background: bool, logits: Array) -> bool:
  return include_background or logits.shape[-1] == 1


def sigmoid_overlap_sums(logits: Array, targets: Array, mask: Optional[Array],
                         batch_dice: bool) -> Tuple[Array, Array, Array]:
  """(TP, sum p, sum y) per example and channel (B, K), or per channel (K,) when `batch_dice`.

  logits, targets: (B, *spatial, K) float32; mask: None, (B, *spatial) or the logits' shape.
  """
  probs = jax.nn.sigmoid(logits)
  if mask is not None:
    weight = broadcast_mask(mask, probs)
    probs, targets = probs * weight, targets * weight
  axes = ((0,) if batch_dice else ()) + spatial_axes(logits)
  return jnp.sum(probs * targets, axis=axes), jnp.sum(probs, axis=axes), jnp.sum(targets, axis=axes)


def _sigmoid_dice(logits, targets, mask, include_background, smooth, batch_dice, class_weights) -> Array:
  keep = _keeps_background(include_background, logits)
  tp, prob_sum, target_sum = sigmoid_overlap_sums(logits, targets, mask, batch_dice)
  dice = (2.0 * tp + smooth) / (prob_sum + target_sum + smooth)
  weights = overlap_class_weights(class_weights, logits.shape[-1], keep, "sigmoid_dice class_weights")
  return class_mean_loss(1.0 - dice, keep, logits.shape[0], weights)


@LOSSES.register("sigmoid_dice")
def sigmoid_dice(logits: Array, labels: Array, *, mask: Optional[Array] = None, include_background: bool = True,
                 smooth: float = 1e-5, batch_dice: bool = False, class_weights: Weights = None,
                 ignore_index: Optional[int] = None) -> Array:
  """1 - soft Dice of per-channel sigmoid probabilities, averaged over channels (MONAI's DiceLoss(sigmoid=True)).

  Args:
    logits: (B, *spatial, K) one logit per region channel.
    labels: (B, *spatial, K) binary region masks (or class indices, module docstring).
    mask: optional (B, *spatial) voxel weights (0 = ignored).
    include_background: keep channel 0 (default True; module docstring).
    smooth, batch_dice, ignore_index: as for "dice".
    class_weights: None, one number, K numbers, or (channel 0 excluded) the K - 1 weights of the kept
      channels; the loss is mean_k w_k (1 - Dice_k).
  Returns: (B,) float32.
  """
  logits, targets, mask = _prepared(logits, labels, mask, ignore_index)
  return _sigmoid_dice(logits, targets, mask, include_background, smooth, batch_dice, class_weights)


def _kept_channels(include_background: bool, logits: Array, targets: Array, class_weights: Weights, what: str):
  """(logits, targets, per-channel weights) of the channels the voxel-wise term covers."""
  keep = _keeps_background(include_background, logits)
  num_channels = logits.shape[-1]
  weights = overlap_class_weights(class_weights, num_channels, keep, what)
  if not keep:
    logits, targets = logits[..., 1:], targets[..., 1:]
  return logits, targets, weights


@LOSSES.register("sigmoid_dice_focal")
def sigmoid_dice_focal(logits: Array, labels: Array, *, mask: Optional[Array] = None, dice_weight: float = 1.0,
                       focal_weight: float = 1.0, gamma: float = 2.0, alpha: Optional[float] = None,
                       include_background: bool = True, smooth: float = 1e-5, batch_dice: bool = False,
                       class_weights: Weights = None, ignore_index: Optional[int] = None) -> Array:
  """dice_weight * sigmoid Dice + focal_weight * sigmoid focal loss: MONAI's DiceFocalLoss(sigmoid=True)
  (lambda_dice, lambda_focal, gamma, alpha, weight).

  The focal term ("sigmoid_focal", Lin et al. 2017) is the mean over the kept channels and voxels of
  w_k a_t (1 - p_t)^gamma BCE; `class_weights` weight both terms per channel, `alpha` balances positives
  against negatives in the focal term. Channel 0 is left out of both terms unless `include_background`.
  Other arguments as for "sigmoid_dice". Returns (B,) float32.
  """
  logits, targets, mask = _prepared(logits, labels, mask, ignore_index)
  dice = _sigmoid_dice(logits, targets, mask, include_background, smooth, batch_dice, class_weights)
  kept_logits, kept_targets, weights = _kept_channels(include_background, logits, targets, class_weights,
                                                      "sigmoid_dice_focal class_weights")
  focal = sigmoid_focal(kept_logits, kept_targets, mask=mask, gamma=gamma, alpha=alpha, class_weights=weights)
  return dice_weight * dice + focal_weight * focal


@LOSSES.register("sigmoid_dice_bce")
def sigmoid_dice_bce(logits: Array, labels: Array, *, mask: Optional[Array] = None, dice_weight: float = 1.0,
                     bce_weight: float = 1.0, include_background: bool = True, smooth: float = 1e-5,
                     batch_dice: bool = False, class_weights: Weights = None, pos_weight: Weights = None,
                     ignore_index: Optional[int] = None) -> Array:
  """dice_weight * sigmoid Dice + bce_weight * binary cross-entropy, nnU-Net's loss for region-based training
  (its DC_and_BCE_loss).

  The BCE is the mean over the kept channels and voxels; `class_weights` weight the channels' Dice losses,
  `pos_weight` (one number, or one per channel, K) the positive BCE terms as in "bce". Channel 0 is left
  out of both terms unless `include_background`. Other arguments as for "sigmoid_dice".
  Returns (B,) float32.
  """
  logits, targets, mask = _prepared(logits, labels, mask, ignore_index)
  dice = _sigmoid_dice(logits, targets, mask, include_background, smooth, batch_dice, class_weights)
  positive = label_weight_vector(pos_weight, logits.shape[-1], "sigmoid_dice_bce pos_weight")
  kept_logits, kept_targets, _ = _kept_channels(include_background, logits, targets, None, "")
  if positive is not None and positive.ndim == 1 and kept_logits.shape[-1] != logits.shape[-1]:
    positive = positive[1:]
  bce = sigmoid_binary_cross_entropy(kept_logits, kept_targets, mask=mask, pos_weight=positive)
  return dice_weight * dice + bce_weight * bce
