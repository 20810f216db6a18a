"""Overlap, boundary and clDice losses: perfect predictions, identities, hand values, signed distance maps."""

import jax
import numpy as np
import pytest

from medjax import losses
from tests.losses.losses_testing import confident_logits
from medjax.data import preprocess


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)])
def test_perfect_prediction_gives_near_zero_region_losses(spatial):
  labels = np.random.default_rng(0).integers(0, 3, size=(2,) + spatial)
  logits = confident_logits(labels, 3, scale=100.0)
  for fn in (losses.soft_dice, losses.tversky, losses.generalized_dice, losses.focal_tversky):
    np.testing.assert_allclose(fn(logits, labels), 0.0, atol=1e-4, err_msg=fn.__name__)
    np.testing.assert_allclose(fn(logits, labels, batch_dice=True), 0.0, atol=1e-4, err_msg=fn.__name__)


def test_tversky_half_half_equals_dice_and_hand_value():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 6, 5))
  np.testing.assert_allclose(losses.tversky(logits, labels, alpha=0.5, beta=0.5), losses.soft_dice(logits, labels),
                             rtol=1e-5)
  # Class 1: TP 2, FP 1, FN 2 -> TI = 2 / (2 + 0.3 * 1 + 0.7 * 2).
  labels = np.array([[1, 1, 1, 1, 0, 0]])
  logits = confident_logits(np.array([[1, 1, 0, 0, 1, 0]]), 2, scale=100.0)
  np.testing.assert_allclose(losses.tversky(logits, labels), [1 - 2 / 3.7], rtol=1e-5)
  np.testing.assert_allclose(losses.focal_tversky(logits, labels, gamma=2.0), [(1 - 2 / 3.7) ** 0.5], rtol=1e-5)
  np.testing.assert_allclose(losses.focal_tversky(logits, labels, gamma=1.0), losses.tversky(logits, labels),
                             rtol=1e-6)


def test_generalized_dice_hand_value_and_absent_class():
  labels = np.array([[1, 1, 1, 1, 0, 0]])
  pred = np.array([[1, 1, 0, 0, 1, 0]])
  # Class 0: V 2, TP 1, P 3; class 1: V 4, TP 2, P 3; w = 1/V^2.
  expected = 1 - 2 * (1 / 4 * 1 + 1 / 16 * 2) / (1 / 4 * 5 + 1 / 16 * 7)
  np.testing.assert_allclose(losses.generalized_dice(confident_logits(pred, 2, scale=100.0), labels, include_background=True),
                             [expected], rtol=1e-5)
  # An absent class 2 that is not predicted changes nothing; predicting it costs at the largest weight.
  np.testing.assert_allclose(losses.generalized_dice(confident_logits(pred, 3, scale=100.0), labels, include_background=True),
                             [expected], rtol=1e-5)
  false_positive = np.array([[1, 1, 0, 0, 1, 2]])
  worse = losses.generalized_dice(confident_logits(false_positive, 3, scale=100.0), labels, include_background=True)
  # Class 0 loses its TP voxel and P (3 -> 2); class 2 gets P 1 at weight 1/4.
  hand = 1 - 2 * (1 / 16 * 2) / (1 / 4 * 4 + 1 / 16 * 7 + 1 / 4 * 1)
  np.testing.assert_allclose(worse, [hand], rtol=1e-5)


def test_signed_distance_maps_anisotropic_hand_case():
  label = np.zeros((3, 5), np.int64)
  label[1, 2] = 1
  maps = preprocess.signed_distance_maps(label, 3, spacing_mm=(2.0, 0.5))
  assert maps.shape == (3, 5, 3) and maps.dtype == np.float32
  fg = maps[..., 1]
  assert fg[1, 2] == pytest.approx(-0.5)  # nearest outside voxel one x-step (0.5 mm) away
  assert fg[1, 0] == pytest.approx(1.0) and fg[0, 2] == pytest.approx(2.0)
  assert fg[0, 0] == pytest.approx(np.sqrt(2.0 ** 2 + 1.0 ** 2))
  bg = maps[..., 0]
  assert bg[1, 2] == pytest.approx(0.5) and bg[0, 2] == pytest.approx(-2.0) and bg[1, 1] == pytest.approx(-0.5)
  assert bg[0, 0] == pytest.approx(-np.sqrt(2.0 ** 2 + 1.0 ** 2))
  assert not maps[..., 2].any()  # absent class
  with pytest.raises(ValueError, match="spacing_mm"):
    preprocess.signed_distance_maps(label, 3, spacing_mm=(1.0, 1.0, 1.0))


def test_boundary_loss_hand_values():
  label = np.array([[0, 1, 1, 0]])
  distance = preprocess.signed_distance_maps(label, 2, (1.0, 1.0))[None]  # class 1: [1, -1, -1, 1]
  np.testing.assert_allclose(distance[0, 0, :, 1], [1, -1, -1, 1])
  perfect = confident_logits(label[None], 2, scale=100.0)
  np.testing.assert_allclose(losses.boundary_loss(perfect, label[None], distance_map=distance), [-0.5], atol=1e-6)
  everywhere = confident_logits(np.ones((1, 1, 4), np.int64), 2, scale=100.0)
  np.testing.assert_allclose(losses.boundary_loss(everywhere, label[None], distance_map=distance), [0.0], atol=1e-6)
  combo = losses.dice_boundary(perfect, label[None], distance_map=distance, boundary_weight=0.1)
  np.testing.assert_allclose(combo, [-0.05], atol=1e-5)
  with pytest.raises(ValueError, match="distance_map"):
    losses.boundary_loss(perfect, label[None], distance_map=distance[..., :1])


def _tube(shape, axis_slices):
  volume = np.zeros(shape, np.int64)
  volume[axis_slices] = 1
  return volume[None]


@pytest.mark.parametrize("shape,tube,gap", [
    ((9, 9), np.s_[3:6, 1:8], np.s_[:, 4]),
    ((7, 7, 9), np.s_[2:5, 2:5, 1:8], np.s_[:, :, 4]),
])
def test_cldice_on_a_tube(shape, tube, gap):
  labels = _tube(shape, tube)
  skeleton = np.asarray(losses.soft_skeleton(np.eye(2, dtype=np.float32)[labels], iterations=3))[..., 1]
  assert skeleton.max() > 0.99 and np.all(skeleton[labels == 0] == 0)  # a centreline inside the tube
  perfect = confident_logits(labels, 2, scale=100.0)
  np.testing.assert_allclose(losses.soft_cldice(perfect, labels), 0.0, atol=1e-4)
  np.testing.assert_allclose(losses.dice_cldice(perfect, labels), 0.0, atol=1e-4)
  broken = labels.copy()
  broken[(0,) + gap] = 0  # cut the tube: a topology error of a few voxels
  loss = float(losses.soft_cldice(confident_logits(broken, 2, scale=100.0), labels)[0])
  dice = float(losses.soft_dice(confident_logits(broken, 2, scale=100.0), labels)[0])
  assert loss > 0.05 and loss > dice  # clDice weighs the cut more than the voxel count does


# ------------------------------------------------------------------------------------------ class weights, Dice + focal


def _hard_case():
  """Hard predictions on 8 voxels, 3 classes: Dice_1 = 2*2/(3+4) = 4/7, Dice_2 = 2*1/(2+2) = 1/2."""
  labels = np.array([[0, 1, 1, 1, 1, 2, 2, 0]])
  pred = np.array([[0, 1, 1, 0, 2, 2, 1, 0]])
  return confident_logits(pred, 3, scale=100.0), labels


def test_dice_class_weights_by_hand():
  logits, labels = _hard_case()
  losses_k = np.array([1 - 4 / 7, 1 - 1 / 2])
  np.testing.assert_allclose(losses.soft_dice(logits, labels), [losses_k.mean()], rtol=1e-5)
  # MONAI's DiceLoss(weight=): mean_k w_k (1 - Dice_k), not renormalised; K weights drop class 0's when the
  # background is excluded, K - 1 weights are the foreground's.
  expected = np.mean([2.0 * losses_k[0], 0.5 * losses_k[1]])
  for weights in ((9.0, 2.0, 0.5), (2.0, 0.5)):
    np.testing.assert_allclose(losses.soft_dice(logits, labels, class_weights=weights), [expected], rtol=1e-5)
  np.testing.assert_allclose(losses.soft_dice(logits, labels, class_weights=3.0), [3 * losses_k.mean()], rtol=1e-5)
  dice_0 = 2 * 2 / (2 + 3)  # class 0: reference voxels 0 and 7, predicted 0, 3 and 7
  with_background = np.mean([4.0 * (1 - dice_0), 2.0 * losses_k[0], 0.5 * losses_k[1]])
  np.testing.assert_allclose(losses.soft_dice(logits, labels, include_background=True, class_weights=(4.0, 2.0, 0.5)),
                             [with_background], rtol=1e-5)
  with pytest.raises(ValueError, match=r"one per class \(3\) or one per foreground class \(2\)"):
    losses.soft_dice(logits, labels, class_weights=(1.0,) * 4)
  with pytest.raises(ValueError, match=r"must be finite and >= 0"):
    losses.soft_dice(logits, labels, class_weights=(1.0, -1.0))
  with pytest.raises(ValueError, match=r"one per class \(3\), got \(2.0, 0.5\)"):
    losses.soft_dice(logits, labels, include_background=True, class_weights=(2.0, 0.5))


@pytest.mark.parametrize("spatial", [(4, 5), (2, 3, 4)])
def test_dice_compounds_are_the_sum_of_their_weighted_parts(spatial):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2,) + spatial + (3,)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2,) + spatial)
  mask = (rng.random((2,) + spatial) > 0.2).astype(np.float32)
  distance = rng.normal(size=(2,) + spatial + (3,)).astype(np.float32)
  weights = (0.5, 2.0, 1.5)
  common = dict(batch_dice=True, class_weights=weights)

  @jax.jit  # one compilation for all the terms keeps the test fast
  def terms(x, y, m, d):
    return dict(
        dice=losses.soft_dice(x, y, mask=m, **common),
        focal=losses.softmax_focal(x, y, mask=m, gamma=1.5, alpha=weights),
        dice_focal=losses.dice_focal(x, y, mask=m, dice_weight=0.3, focal_weight=2.0, gamma=1.5, **common),
        # gamma = 0 without weights: the focal term is the cross-entropy, so Dice + focal is Dice + CE.
        dice_focal_0=losses.dice_focal(x, y, gamma=0.0), dice_xent_plain=losses.dice_cross_entropy(x, y),
        xent=losses.softmax_cross_entropy(x, y, mask=m, class_weights=weights),
        dice_xent=losses.dice_cross_entropy(x, y, mask=m, xent_weight=0.5, **common),
        objective=losses.make_objective("dice_focal", {"gamma": 1.5, **common})(x, {}, {"label": y, "mask": m}),
        boundary=losses.boundary_loss(x, y, distance_map=d, mask=m),
        dice_boundary=losses.dice_boundary(x, y, distance_map=d, mask=m, boundary_weight=0.1, **common))

  t = terms(logits, labels, mask, distance)
  np.testing.assert_allclose(t["dice_focal"], 0.3 * t["dice"] + 2.0 * t["focal"], rtol=1e-5)
  np.testing.assert_allclose(t["dice_focal_0"], t["dice_xent_plain"], rtol=1e-5)
  # dice_xent's class weights weight both terms, as MONAI's DiceCELoss(weight=).
  np.testing.assert_allclose(t["dice_xent"], t["dice"] + 0.5 * t["xent"], rtol=1e-5)
  np.testing.assert_allclose(t["objective"], t["dice"] + t["focal"], rtol=1e-5)
  np.testing.assert_allclose(t["dice_boundary"], t["dice"] + 0.1 * t["boundary"], rtol=1e-5)
  with pytest.raises(ValueError, match=r"dice_focal class_weights must hold one number per class \(3\)"):
    losses.dice_focal(logits, labels, class_weights=(1.0, 2.0))
