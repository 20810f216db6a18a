"""Voxel-wise losses and regression: class weights, ignore_index, focal identities, pos_weight, hand values."""

import numpy as np
import pytest

from medjax import losses


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_class_weights_hand_checked_segmentation_and_classification():
  logits = np.array([[[2.0, 0.0], [0.5, 1.0], [-1.0, 1.0]]], np.float32)  # (1, 3 voxels, 2)
  labels = np.array([[0, 1, 1]])
  ce = -_log_softmax(logits)[0, np.arange(3), labels[0]]
  weighted = losses.softmax_cross_entropy(logits, labels, class_weights=(1.0, 3.0))
  np.testing.assert_allclose(weighted, [(ce[0] + 3 * ce[1] + 3 * ce[2]) / 3], rtol=1e-5)
  cls_logits = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  cls_ce = -_log_softmax(cls_logits)[[0, 1], [0, 1]]
  np.testing.assert_allclose(losses.softmax_cross_entropy(cls_logits, np.array([0, 1]), class_weights=(2.0, 0.5)),
                             [2 * cls_ce[0], 0.5 * cls_ce[1]], rtol=1e-5)
  with pytest.raises(ValueError, match="one number per class"):
    losses.softmax_cross_entropy(cls_logits, np.array([0, 1]), class_weights=(1.0, 2.0, 3.0))


def test_ignore_index_excludes_voxels_and_multiplies_with_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 3)).astype(np.float32)
  labels = np.array([[0, 255, 1, 2, 255], [1, 1, 255, 0, 2]])
  valid = (labels != 255).astype(np.float32)
  clean = np.where(labels == 255, 0, labels)
  for fn in (losses.softmax_cross_entropy, losses.soft_dice, losses.softmax_focal, losses.tversky,
             losses.generalized_dice):
    np.testing.assert_allclose(fn(logits, labels, ignore_index=255), fn(logits, clean, mask=valid), rtol=1e-5,
                               err_msg=fn.__name__)
  mask = np.array([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], np.float32)
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels, mask=mask, ignore_index=255),
                             losses.softmax_cross_entropy(logits, clean, mask=mask * valid), rtol=1e-5)
  # A wrong prediction on an ignored voxel costs nothing.
  perfect = 50 * (np.eye(3)[clean] * 2 - 1).astype(np.float32)
  perfect[0, 1] = [-50, -50, 50]
  assert float(losses.softmax_cross_entropy(perfect, labels, ignore_index=255)[0]) < 1e-6
  with pytest.raises(ValueError, match="integer class-index labels"):
    losses.softmax_cross_entropy(logits, np.eye(3, dtype=np.float32)[clean], ignore_index=255)


@pytest.mark.parametrize("soft", [False, True])
def test_focal_with_gamma_zero_equals_cross_entropy(soft):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 4, 3))
  if soft:
    labels = rng.dirichlet(np.ones(3), size=(2, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.softmax_focal(logits, labels, gamma=0.0),
                             losses.softmax_cross_entropy(logits, labels), rtol=1e-6)
  binary = rng.integers(0, 2, size=(2, 4, 3, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.sigmoid_focal(logits, binary, gamma=0.0),
                             losses.sigmoid_binary_cross_entropy(logits, binary), rtol=1e-6)


def test_focal_hand_values():
  logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.array([0, 1])
  logp = _log_softmax(logits)[[0, 1], [0, 1]]
  p = np.exp(logp)
  alpha = np.array([0.5, 2.0, 1.0])
  expected = -alpha[labels] * (1 - p) ** 2 * logp
  np.testing.assert_allclose(losses.softmax_focal(logits, labels, gamma=2.0, alpha=tuple(alpha)), expected,
                             rtol=1e-5)
  x = np.array([[1.5, -0.5]], np.float32)
  y = np.array([[1.0, 0.0]], np.float32)
  s = 1 / (1 + np.exp(-x))
  p_t = np.where(y == 1, s, 1 - s)
  a_t = np.where(y == 1, 0.25, 0.75)
  expected = (-a_t * (1 - p_t) ** 2 * np.log(p_t)).mean(-1)
  np.testing.assert_allclose(losses.sigmoid_focal(x, y, gamma=2.0, alpha=0.25), expected, rtol=1e-5)


def test_bce_pos_weight_and_class_index_labels():
  x = np.array([[2.0, -1.0], [0.5, 0.0]], np.float32)
  y = np.array([[1, 0], [1, 1]], np.float32)
  s = 1 / (1 + np.exp(-x))
  w = np.array([3.0, 1.0])
  expected = -(w * y * np.log(s) + (1 - y) * np.log(1 - s)).mean(-1)
  np.testing.assert_allclose(losses.sigmoid_binary_cross_entropy(x, y, pos_weight=(3.0, 1.0)), expected, rtol=1e-5)
  # Binary segmentation with one output channel and 0/1 label maps; the ignore label is left out.
  seg_logits = np.array([[[1.0], [-2.0], [4.0]]], np.float32)
  seg_labels = np.array([[1, 0, 255]])
  s = 1 / (1 + np.exp(-np.array([1.0, -2.0])))
  np.testing.assert_allclose(losses.sigmoid_binary_cross_entropy(seg_logits, seg_labels, ignore_index=255),
                             [-(np.log(s[0]) + np.log(1 - s[1])) / 2], rtol=1e-5)


def test_regression_losses_hand_checked():
  pred = np.array([[1.0, 2.0], [0.0, -1.0]], np.float32)
  target = np.array([[1.5, 0.0], [3.0, -1.0]], np.float32)
  np.testing.assert_allclose(losses.l1_loss(pred, target), [(0.5 + 2.0) / 2, 3.0 / 2], rtol=1e-6)
  np.testing.assert_allclose(losses.l2_loss(pred, target), [(0.25 + 4.0) / 2, 9.0 / 2], rtol=1e-6)
  # Huber, delta 1: 0.5 r^2 inside, |r| - 0.5 outside.
  np.testing.assert_allclose(losses.huber_loss(pred, target), [(0.125 + 1.5) / 2, 2.5 / 2], rtol=1e-6)
  np.testing.assert_allclose(losses.huber_loss(pred, target, delta=2.0), [(0.125 + 2.0) / 2, 2 * 2.0 / 2],
                             rtol=1e-6)
  # (B,) targets against (B, 1) predictions, and a per-target mask.
  np.testing.assert_allclose(losses.l2_loss(np.array([[1.0], [2.0]]), np.array([3.0, 2.0])), [4.0, 0.0])
  np.testing.assert_allclose(losses.l1_loss(pred, target, mask=np.array([[1, 0], [0, 1]])), [0.5, 0.0])
  assert losses.LOSSES.get("mse") is losses.l2_loss
  with pytest.raises(ValueError, match="one output"):
    losses.l1_loss(pred, np.array([1.0, 2.0]))
