"""Voxel counts (masked, jitted, argmax and thresholded sigmoid), Dice / IoU / generalized Dice from counts."""

import jax
import numpy as np
import pytest
import sklearn.metrics as skm

from medjax import metrics


def _one_hot(labels, k):
  return np.eye(k, dtype=np.float32)[labels]


@pytest.mark.parametrize("spatial", [(4, 7), (3, 4, 5)])
def test_masked_counts_count_only_masked_voxels_and_jit(spatial):
  rng = np.random.default_rng(len(spatial))
  labels = rng.integers(0, 3, size=(2,) + spatial)
  pred = rng.integers(0, 3, size=(2,) + spatial)
  mask = rng.random((2,) + spatial) < 0.6
  counts = np.asarray(jax.jit(metrics.segmentation_counts)(labels, _one_hot(pred, 3), mask))
  for b in range(2):
    cm = skm.confusion_matrix(labels[b][mask[b]], pred[b][mask[b]], labels=range(3))
    np.testing.assert_array_equal(counts[b], np.stack([np.diag(cm), cm.sum(0), cm.sum(1)], -1))
  # 0/1 floats work as a mask too; without a mask every voxel counts.
  np.testing.assert_array_equal(metrics.segmentation_counts(labels, _one_hot(pred, 3), mask.astype(np.float32)),
                                counts)
  assert float(np.asarray(metrics.segmentation_counts(labels, _one_hot(pred, 3)))[0, :, 2].sum()) == np.prod(spatial)


def test_padded_case_counts_equal_the_unpadded_case():
  labels, pred = np.array([[[0, 1, 1], [2, 2, 0]]]), np.array([[[0, 1, 2], [2, 0, 0]]])
  padded_labels = np.pad(labels, ((0, 0), (0, 2), (1, 1)), constant_values=-1)  # padding label outside [0, K)
  padded_pred = np.pad(pred, ((0, 0), (0, 2), (1, 1)), constant_values=1)
  mask = np.pad(np.ones_like(labels, bool), ((0, 0), (0, 2), (1, 1)))
  np.testing.assert_array_equal(metrics.segmentation_counts(padded_labels, _one_hot(padded_pred, 3), mask),
                                metrics.segmentation_counts(labels, _one_hot(pred, 3)))
  with pytest.raises(ValueError, match=r"mask must be \(B, \*spatial\) \(1, 2, 3\), got \(1, 2\)"):
    metrics.segmentation_counts(labels, _one_hot(pred, 3), np.ones((1, 2), bool))


def test_multilabel_counts_threshold_sigmoid_per_channel():
  # Two overlapping regions on a 2 x 3 image: channel 0 (whole) contains channel 1 (core).
  y_true = np.zeros((1, 2, 3, 2), bool)
  y_true[0, :, :2, 0] = True       # whole: 4 voxels
  y_true[0, 0, :1, 1] = True       # core: 1 voxel
  logits = np.full((1, 2, 3, 2), -3.0, np.float32)
  logits[0, 0, :, 0] = 3.0         # whole predicted on row 0: 3 voxels, 2 right
  logits[0, 0, :2, 1] = 0.2        # core: sigmoid(0.2) = 0.55 >= 0.5 on 2 voxels, 1 right
  counts = np.asarray(jax.jit(metrics.multilabel_segmentation_counts)(y_true, logits))
  np.testing.assert_array_equal(counts[0], [[2, 3, 4], [1, 2, 1]])
  np.testing.assert_allclose(metrics.dice_per_case(counts)[0], [2 * 2 / 7, 2 * 1 / 3])
  high = np.asarray(metrics.multilabel_segmentation_counts(y_true, logits, threshold=0.6))  # sigmoid(0.2) < 0.6
  np.testing.assert_array_equal(high[0, 1], [0, 0, 1])
  mask = np.zeros((1, 2, 3), bool)
  mask[0, 0] = True  # only row 0 counts
  np.testing.assert_array_equal(np.asarray(metrics.multilabel_segmentation_counts(y_true, logits, mask=mask))[0],
                                [[2, 3, 2], [1, 2, 1]])
  with pytest.raises(ValueError, match="threshold must lie in"):
    metrics.multilabel_segmentation_counts(y_true, logits, threshold=1.0)


def test_iou_per_case_matches_sklearn_jaccard():
  labels = np.array([[0, 1, 1, 2, 2, 2, 0, 1]])
  pred = np.array([[0, 1, 2, 2, 2, 0, 0, 1]])
  counts = np.asarray(metrics.segmentation_counts(labels, _one_hot(pred, 3)))
  np.testing.assert_allclose(metrics.iou_per_case(counts)[0],
                             skm.jaccard_score(labels[0], pred[0], labels=range(3), average=None))


def test_generalized_dice_score_by_hand():
  counts = np.array([
      [[9, 9, 9], [2, 3, 4], [1, 2, 2], [0, 0, 0]],   # class 3 absent from both
      [[9, 9, 9], [2, 3, 4], [1, 2, 2], [0, 1, 0]],   # class 3 predicted on an empty reference
      [[9, 9, 9], [0, 0, 0], [0, 0, 0], [0, 0, 0]],   # no foreground at all
      [[9, 9, 9], [0, 2, 0], [0, 0, 0], [0, 0, 0]],   # foreground predicted, none in the reference
  ], np.float64)
  w1, w2 = 1 / 4**2, 1 / 2**2  # w_k = 1 / |R_k|^2
  first = 2 * (w1 * 2 + w2 * 1) / (w1 * 7 + w2 * 4)
  # The absent class 3 takes the largest weight of the present classes (w2), so its false positive costs.
  second = 2 * (w1 * 2 + w2 * 1) / (w1 * 7 + w2 * 4 + w2 * 1)
  np.testing.assert_allclose(metrics.generalized_dice_score(counts), [first, second, np.nan, 0.0])
  np.testing.assert_allclose(metrics.generalized_dice_score(counts, empty_score=1.0)[2:], [1.0, 0.0])
  with_background = 2 * (9 / 81 + w1 * 2 + w2 * 1) / (18 / 81 + w1 * 7 + w2 * 4)
  assert metrics.generalized_dice_score(counts[:1], include_background=True)[0] == pytest.approx(with_background)
  # One class: the generalized Dice is that class's Dice.
  assert metrics.generalized_dice_score(counts[:1, :2])[0] == pytest.approx(metrics.dice_per_case(counts)[0, 1])
