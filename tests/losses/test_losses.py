"""Losses: known values, masks, batch Dice."""

import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses
from tests.losses.losses_testing import confident_logits


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)])
def test_perfect_prediction_has_near_zero_dice_and_xent(spatial):
  labels = np.random.default_rng(0).integers(0, 3, size=(2,) + spatial)
  logits = confident_logits(labels, 3, scale=50.0)
  assert np.allclose(losses.soft_dice(logits, labels), 0.0, atol=1e-6)
  assert np.allclose(losses.softmax_cross_entropy(logits, labels), 0.0, atol=1e-6)


def test_uniform_logits_cross_entropy_is_log_k():
  labels = np.zeros((3, 4, 6), np.int32)
  out = losses.softmax_cross_entropy(np.zeros((3, 4, 6, 5), np.float32), labels)
  np.testing.assert_allclose(out, np.log(5.0), rtol=1e-6)


def test_cross_entropy_matches_gather_formula_and_label_smoothing():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 2])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), -logp[np.arange(4), labels], rtol=1e-5)
  smoothed = losses.softmax_cross_entropy(logits, labels, label_smoothing=0.3)
  targets = np.eye(3)[labels] * 0.7 + 0.1
  np.testing.assert_allclose(smoothed, -(targets * logp).sum(-1), rtol=1e-5)


def test_mask_ignores_voxels():
  labels = np.array([[0, 1, 1, 0]])
  logits = confident_logits(labels, 2, scale=50.0)
  logits[0, 0] = [-50, 50]  # wrong at voxel 0
  mask = np.array([[0, 1, 1, 1]], np.float32)
  assert float(losses.softmax_cross_entropy(logits, labels, mask=mask)[0]) < 1e-6
  assert float(losses.softmax_cross_entropy(logits, labels)[0]) > 10


def test_dice_known_value():
  # Hard probabilities: prediction covers 2 voxels of class 1, reference 4 of which 2 overlap -> Dice 2*2/(2+4).
  labels = np.array([[1, 1, 1, 1, 0, 0]])
  pred = np.array([[1, 1, 0, 0, 0, 0]])
  logits = confident_logits(pred, 2, scale=100.0)
  np.testing.assert_allclose(losses.soft_dice(logits, labels), 1 - 4 / 6, rtol=1e-5)


def test_batch_dice_pools_examples():
  labels = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
  pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])  # one false-positive voxel in the empty case
  logits = confident_logits(pred, 2, scale=100.0)
  per_case = np.asarray(losses.soft_dice(logits, labels))
  assert per_case[0] < 1e-5 and per_case[1] > 0.99  # the empty case is punished fully
  pooled = np.asarray(losses.soft_dice(logits, labels, batch_dice=True))
  np.testing.assert_allclose(pooled, [1 - 4 / 5] * 2, rtol=1e-5)


def test_bce_matches_formula():
  logits = np.array([[2.0, -1.0], [0.5, 0.0]], np.float32)
  labels = np.array([[1, 0], [0, 1]], np.float32)
  p = 1 / (1 + np.exp(-logits))
  expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(-1)
  np.testing.assert_allclose(losses.sigmoid_binary_cross_entropy(logits, labels), expected, rtol=1e-5)


def test_make_objective_reads_batch():
  objective = losses.make_objective("xent", {"label_smoothing": 0.0})
  batch = {"label": jnp.array([1, 0])}
  out = objective(jnp.array([[0.0, 5.0], [5.0, 0.0]]), {}, batch)
  assert out.shape == (2,) and float(out.max()) < 0.01


def test_cross_entropy_accepts_soft_targets():
  logits = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
  soft = np.array([[0.7, 0.3], [0.0, 1.0]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, soft), -(soft * logp).sum(-1), rtol=1e-6)
  hard = losses.softmax_cross_entropy(logits, np.array([0, 1]))
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, np.eye(2, dtype=np.float32)), hard, rtol=1e-6)
