"""Metrics against hand-computed values and scipy/numpy references; evaluators on synthetic stats."""

import numpy as np
import pytest

from medjax import metrics
from medjax.data.datasets.base import DatasetInfo
from medjax.evaluators.classification import ClassificationEvaluator
from medjax.evaluators.segmentation import SegmentationEvaluator


def _auc_by_pairs(scores, positives):
  pos, neg = scores[positives], scores[~positives]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pair_counting(seed):
  rng = np.random.default_rng(seed)
  scores = np.round(rng.normal(size=40), 1)  # rounding makes ties
  positives = rng.random(40) < 0.4
  assert metrics.roc_auc(positives, scores) == pytest.approx(_auc_by_pairs(scores, positives))


def test_roc_auc_single_class_is_nan():
  assert np.isnan(metrics.roc_auc(np.zeros(4, bool), np.arange(4.0)))


def test_roc_auc_ovr_macro():
  probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
  labels = np.array([0, 1, 2, 1])
  expected = np.mean([_auc_by_pairs(probs[:, k], labels == k) for k in range(3)])
  assert metrics.roc_auc_ovr(labels, probs) == pytest.approx(expected)
  assert metrics.accuracy(labels, probs) == 0.75


def test_segmentation_counts_and_dice():
  labels = np.array([[[0, 1], [1, 2]]])
  pred = np.array([[[0, 1], [0, 0]]])
  logits = np.eye(3)[pred].astype(np.float32)
  counts = np.asarray(metrics.segmentation_counts(labels, logits))
  assert counts.shape == (1, 3, 3)
  np.testing.assert_array_equal(counts[0, 1], [1, 1, 2])  # class 1: overlap 1, predicted 1, reference 2
  dice = metrics.dice_per_case(counts)
  np.testing.assert_allclose(dice[0, :2], [2 * 1 / 4, 2 * 1 / 3])
  assert dice[0, 2] == 0.0  # present in the reference, not predicted


def test_dice_false_positive_on_empty_reference_scores_zero():
  # Class 1 is absent from the reference but predicted (3 voxels): a false positive scores 0 (nnU-Net's
  # convention; before the empty_score option this case was NaN and never reached the class mean).
  # Class 2 is absent from both: NaN by default, left out of means.
  counts = np.array([[[0, 0, 4], [0, 3, 0], [0, 0, 0]]], np.float32)
  dice = metrics.dice_per_case(counts)
  assert dice[0, 1] == 0.0 and np.isnan(dice[0, 2])
  assert np.isnan(metrics.dice_per_case(counts, false_positive_score="nan")[0, 1])  # MONAI ignore_empty=True
  assert metrics.dice_per_case(counts, empty_score=1.0)[0, 2] == 1.0


def test_segmentation_evaluator_summary():
  info = DatasetInfo(task="segmentation", spatial_dims=2, image_shape=(4, 4), num_channels=1, num_classes=3,
                     class_names=("background", "organ", "lesion"), label_kind="map")
  evaluator = SegmentationEvaluator(info)
  counts = np.array([
      [[10, 10, 10], [4, 4, 4], [0, 0, 0]],      # organ perfect, no lesion in reference or prediction
      [[10, 10, 10], [2, 4, 4], [1, 1, 3]],      # organ 0.5, lesion 0.5
  ], np.float32)
  result = evaluator.summarize({"counts": counts})
  assert result["dice/organ"] == pytest.approx(0.75)
  assert result["dice/lesion"] == pytest.approx(0.5)
  assert result["dice_mean"] == pytest.approx(0.625)
  assert result["dice_case_mean"] == pytest.approx((1.0 + 0.5) / 2)


def test_classification_evaluator_summary():
  info = DatasetInfo(task="classification", spatial_dims=2, image_shape=(4, 4), num_channels=1, num_classes=2,
                     class_names=("no", "yes"), label_kind="class")
  result = ClassificationEvaluator(info).summarize(
      {"probs": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), "label": np.array([0, 1, 1])})
  assert result["accuracy"] == pytest.approx(2 / 3)
  assert result["auc"] == pytest.approx(1.0)
