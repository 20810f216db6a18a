"""Sigmoid Dice and its compounds on overlapping region channels: hand values with and without channel 0."""

import jax
import numpy as np
import pytest

from medjax import losses

SMOOTH = 1e-5


def _regions(spatial):
  """Three nested BraTS-like regions (whole tumour > tumour core > enhancing) and hard, partly wrong logits."""
  rng = np.random.default_rng(len(spatial))
  grade = rng.integers(0, 4, size=(2,) + spatial)
  labels = np.stack([grade >= 1, grade >= 2, grade == 3], -1)
  noisy = np.where(rng.random(grade.shape) < 0.7, grade, rng.integers(0, 4, grade.shape))
  predicted = np.stack([noisy >= 1, noisy >= 2, noisy == 3], -1)
  return labels.astype(np.float32), (200.0 * predicted - 100.0).astype(np.float32), predicted


def _dice_by_hand(labels, predicted, axes):
  tp = np.sum(labels * predicted, axis=axes)
  return (2 * tp + SMOOTH) / (predicted.sum(axis=axes) + labels.sum(axis=axes) + SMOOTH)


@pytest.mark.parametrize("spatial", [(4, 6), (3, 4, 5)])
def test_sigmoid_dice_by_hand_with_and_without_background(spatial):
  labels, logits, predicted = _regions(spatial)
  axes = tuple(range(1, labels.ndim - 1))
  dice = _dice_by_hand(labels, predicted, axes)  # (B, 3): sigmoid(+-100) is exactly 1 / 0 in float32
  pooled = _dice_by_hand(labels, predicted, (0,) + axes)
  weights = np.array([1.0, 2.0, 3.0])

  @jax.jit  # one compilation for all the variants keeps the test fast
  def variants(x, y):
    return (losses.sigmoid_dice(x, y), losses.sigmoid_dice(x, y, include_background=False),
            losses.sigmoid_dice(x, y, class_weights=weights),
            losses.sigmoid_dice(x, y, include_background=False, class_weights=(2.0, 3.0)),
            losses.sigmoid_dice(x, y, batch_dice=True), losses.soft_dice(x, y.argmax(-1)))

  plain, foreground, weighted, weighted_foreground, batch, softmax = variants(logits, labels)
  np.testing.assert_allclose(plain, (1 - dice).mean(1), rtol=1e-5)
  # include_background=False drops channel 0 (MONAI's semantics), here the whole tumour.
  np.testing.assert_allclose(foreground, (1 - dice[:, 1:]).mean(1), rtol=1e-5)
  np.testing.assert_allclose(weighted, (weights * (1 - dice)).mean(1), rtol=1e-5)
  np.testing.assert_allclose(weighted_foreground, (weights[1:] * (1 - dice[:, 1:])).mean(1), rtol=1e-5)
  np.testing.assert_allclose(batch, [(1 - pooled).mean()] * 2, rtol=1e-5)
  # A softmax over the channels would make them compete; here each region is its own sigmoid.
  assert np.all(np.asarray(plain) < np.asarray(softmax))


def test_sigmoid_dice_soft_probabilities_mask_and_single_channel():
  logits = np.array([[[0.0], [2.0], [-1.0], [3.0]]], np.float32)  # (1, 4, 1)
  labels = np.array([[[1.0], [1.0], [0.0], [0.0]]], np.float32)
  p = 1 / (1 + np.exp(-logits[0, :, 0]))
  expected = 1 - (2 * (p[0] + p[1]) + SMOOTH) / (p.sum() + 2 + SMOOTH)
  np.testing.assert_allclose(losses.sigmoid_dice(logits, labels), [expected], rtol=1e-5)
  # One channel is kept even with include_background=False (MONAI ignores it for a single channel), and
  # class-index labels (B, *spatial) are the positive indicator.
  np.testing.assert_allclose(losses.sigmoid_dice(logits, labels, include_background=False), [expected], rtol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_dice(logits, labels[..., 0].astype(np.int32)), [expected], rtol=1e-5)
  mask = np.array([[1, 1, 0, 1]], np.float32)
  kept = 1 - (2 * (p[0] + p[1]) + SMOOTH) / (p[0] + p[1] + p[3] + 2 + SMOOTH)
  np.testing.assert_allclose(losses.sigmoid_dice(logits, labels, mask=mask), [kept], rtol=1e-5)


@pytest.mark.parametrize("include_background", [True, False])
def test_sigmoid_compounds_are_the_sum_of_their_parts(include_background):
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  labels = (rng.random((2, 4, 5, 3)) < 0.4).astype(np.float32)
  mask = (rng.random((2, 4, 5)) > 0.2).astype(np.float32)
  first = 0 if include_background else 1
  weights, pos_weight = np.array([0.5, 2.0, 1.0]), np.array([2.0, 1.0, 3.0])

  @jax.jit  # one compilation for all the terms keeps the test fast
  def terms(x, y, m):
    dice = losses.sigmoid_dice(x, y, mask=m, include_background=include_background, class_weights=weights)
    focal = losses.sigmoid_focal(x[..., first:], y[..., first:], mask=m, gamma=1.0, alpha=0.25,
                                 class_weights=weights[first:])
    combined_focal = losses.sigmoid_dice_focal(x, y, mask=m, include_background=include_background,
                                               class_weights=weights, gamma=1.0, alpha=0.25, dice_weight=0.7,
                                               focal_weight=3.0)
    bce = losses.sigmoid_binary_cross_entropy(x[..., first:], y[..., first:], mask=m, pos_weight=pos_weight[first:])
    combined_bce = losses.sigmoid_dice_bce(x, y, mask=m, include_background=include_background, class_weights=weights,
                                           pos_weight=pos_weight, bce_weight=0.5)
    return dice, focal, combined_focal, bce, combined_bce

  dice, focal, combined_focal, bce, combined_bce = terms(logits, labels, mask)
  np.testing.assert_allclose(combined_focal, 0.7 * dice + 3.0 * focal, rtol=1e-5)
  np.testing.assert_allclose(combined_bce, dice + 0.5 * bce, rtol=1e-5)


def test_sigmoid_focal_class_weights_multiply_each_channel():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
  labels = (rng.random((2, 3, 4, 3)) < 0.4).astype(np.float32)
  weights = np.array([0.5, 2.0, 1.0])
  p = 1 / (1 + np.exp(-logits))
  p_true = np.where(labels == 1, p, 1 - p)
  per_element = -(1 - p_true) * np.log(p_true)  # gamma = 1
  np.testing.assert_allclose(losses.sigmoid_focal(logits, labels, gamma=1.0, class_weights=weights),
                             (per_element * weights).mean((1, 2, 3)), rtol=1e-5)


def test_sigmoid_losses_from_config_jit():
  labels, logits, _ = _regions((4, 6))
  for name in ("sigmoid_dice", "sigmoid_dice_focal", "sigmoid_dice_bce"):
    objective = losses.make_objective(name, {"include_background": False, "class_weights": (1.0, 2.0)})
    value = jax.jit(lambda x, y, objective=objective: objective(x, {}, {"label": y}))(logits, labels)
    assert value.shape == (2,) and np.all(np.isfinite(value)), name
  with pytest.raises(ValueError, match="unknown key 'class_weight' for loss 'sigmoid_dice'"):
    losses.validate_loss_config(dict(name="sigmoid_dice", class_weight=(1.0, 2.0)))
