"""Overlap and surface-distance metrics: shapes with known answers, an all-pairs brute force with
anisotropic spacing, and the empty-mask conventions."""

import itertools

import numpy as np
import pytest

from medjax import metrics


def _square(shape, corner, side):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(c, c + side) for c in corner)] = True
  return mask


def _surface_by_neighbours(mask):
  """Surface voxels written independently: in the mask with a face neighbour outside it or the image."""
  padded = np.pad(mask, 1, constant_values=False)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  surface = np.zeros_like(mask)
  for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
    surface |= mask & ~np.roll(padded, step, axis=axis)[inner]
  return surface


def _brute_force(pred, ref, spacing):
  pred_points = np.argwhere(_surface_by_neighbours(pred)) * spacing
  ref_points = np.argwhere(_surface_by_neighbours(ref)) * spacing
  pairwise = np.linalg.norm(pred_points[:, None] - ref_points[None], axis=-1)
  pred_to_ref, ref_to_pred = pairwise.min(1), pairwise.min(0)
  hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
  hd100 = max(pred_to_ref.max(), ref_to_pred.max())
  assd = np.concatenate([pred_to_ref, ref_to_pred]).mean()
  return hd95, hd100, assd


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_offset_squares_known_answers(dims, offset):
  side, spacing = 5, (0.7, 1.3, 2.0)[-dims:]
  shape = (9, 10, 14)[-dims:]
  ref = _square(shape, (2,) * dims, side)
  pred = _square(shape, (2,) * (dims - 1) + (2 + offset,), side)  # shifted along the last axis
  case = metrics.segmentation_case_metrics(ref.astype(int), pred.astype(int), 2, spacing)
  assert case["dice"][1] == pytest.approx((side - offset) / side)
  assert case["iou"][1] == pytest.approx((side - offset) / (side + offset))
  assert case["precision"][1] == case["recall"][1] == pytest.approx((side - offset) / side)
  assert case["volume_diff_ml"][1] == pytest.approx(0.0)
  # The faces across the shift are `offset` voxels apart along the last axis; no surface point is farther.
  assert metrics.hausdorff_distance(ref, pred, spacing, percentile=100) == pytest.approx(offset * spacing[-1])
  assert 0 < metrics.average_surface_distance(ref, pred, spacing) < offset * spacing[-1]


def test_single_voxels_distance_is_the_spacing_scaled_offset():
  pred, ref = np.zeros((6, 5, 7), bool), np.zeros((6, 5, 7), bool)
  pred[1, 1, 1], ref[4, 2, 5] = True, True
  spacing = np.array([2.5, 0.8, 1.1])
  expected = np.linalg.norm(np.array([3, 1, 4]) * spacing)
  assert metrics.hausdorff_distance(ref, pred, spacing) == pytest.approx(expected)
  assert metrics.average_surface_distance(ref, pred, spacing) == pytest.approx(expected)


def test_identical_masks_have_zero_distance():
  mask = _square((8, 9), (1, 2), 4)
  assert metrics.hausdorff_distance(mask, mask, (1.0, 2.0)) == 0.0
  assert metrics.average_surface_distance(mask, mask, (1.0, 2.0)) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_surface_distances_match_all_pairs_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = ((5, 6, 7), (9, 11))[seed % 2]
  spacing = rng.uniform(0.4, 3.0, size=len(shape))  # anisotropic
  pred, ref = rng.random(shape) < 0.35, rng.random(shape) < 0.35
  hd95, hd100, assd = _brute_force(pred, ref, spacing)
  assert metrics.hausdorff_distance(ref, pred, spacing) == pytest.approx(hd95, rel=1e-9)
  assert metrics.hausdorff_distance(ref, pred, spacing, percentile=100) == pytest.approx(hd100, rel=1e-9)
  assert metrics.average_surface_distance(ref, pred, spacing) == pytest.approx(assd, rel=1e-9)


def test_compact_blobs_away_from_border_match_brute_force():
  # Masks that leave the image border untouched exercise the bounding-box crop with a background margin.
  shape, spacing = (12, 13, 11), np.array([3.0, 0.9, 1.2])
  grid = np.indices(shape)
  ref = ((grid - np.array([6, 6, 5])[:, None, None, None]) ** 2).sum(0) <= 8
  pred = ((grid - np.array([5, 7, 5])[:, None, None, None]) ** 2 * np.array([1, 2, 1])[:, None, None, None]
          ).sum(0) <= 9
  hd95, _, assd = _brute_force(pred, ref, spacing)
  assert metrics.hausdorff_distance(ref, pred, spacing) == pytest.approx(hd95, rel=1e-9)
  assert metrics.average_surface_distance(ref, pred, spacing) == pytest.approx(assd, rel=1e-9)


def test_empty_mask_conventions():
  empty, blob = np.zeros((6, 7), bool), _square((6, 7), (1, 1), 3)
  for pred, ref in [(empty, empty), (blob, empty), (empty, blob)]:
    assert np.isnan(metrics.hausdorff_distance(ref, pred, (1.0, 1.0)))
    assert np.isnan(metrics.average_surface_distance(ref, pred, (1.0, 1.0)))
  # Class 1: reference only (missed). Class 2: prediction only (false positive). Class 3: absent from both.
  ref_label, pred_label = np.zeros((6, 7), int), np.zeros((6, 7), int)
  ref_label[1:3, 1:3] = 1
  pred_label[4:6, 4:7] = 2
  case = metrics.segmentation_case_metrics(ref_label, pred_label, 4, (2.0, 5.0))
  assert case["dice"][1] == 0.0 and case["recall"][1] == 0.0 and np.isnan(case["precision"][1])
  assert np.isnan(case["dice"][2]) and np.isnan(case["recall"][2]) and case["precision"][2] == 0.0
  assert np.all(np.isnan([case[name][3] for name in ("dice", "iou", "precision", "recall", "hd95", "assd")]))
  assert np.all(np.isnan(case["hd95"][1:])) and np.all(np.isnan(case["assd"][1:]))
  np.testing.assert_allclose(case["volume_diff_ml"], np.array([-2, -4, 6, 0]) * 10.0 / 1000)


def test_case_metrics_agree_with_device_counts_and_distance_functions():
  rng = np.random.default_rng(3)
  ref_label = rng.integers(0, 3, size=(7, 8, 6))
  pred_label = np.where(rng.random(ref_label.shape) < 0.8, ref_label, rng.integers(0, 3, ref_label.shape))
  spacing = (2.0, 0.5, 1.5)
  case = metrics.segmentation_case_metrics(ref_label, pred_label, 3, spacing)
  counts = np.asarray(metrics.segmentation_counts(ref_label[None], np.eye(3, dtype=np.float32)[pred_label][None]))
  np.testing.assert_allclose(case["dice"], metrics.dice_per_case(counts)[0])
  for k in range(3):
    pred, ref = pred_label == k, ref_label == k
    assert case["hd95"][k] == pytest.approx(metrics.hausdorff_distance(ref, pred, spacing))
    assert case["assd"][k] == pytest.approx(metrics.average_surface_distance(ref, pred, spacing))
    assert case["volume_diff_ml"][k] == pytest.approx((pred.sum() - ref.sum()) * 1.5 / 1000)


def test_bad_segmentation_inputs_raise():
  with pytest.raises(ValueError, match="same shape"):
    metrics.segmentation_case_metrics(np.zeros((4, 5), int), np.zeros((5, 4), int), 2, (1.0, 1.0))
  with pytest.raises(ValueError, match=r"y_true.*\[0, 2\)"):
    metrics.segmentation_case_metrics(np.full((4, 5), 2), np.zeros((4, 5), int), 2, (1.0, 1.0))
  with pytest.raises(ValueError, match="spacing_mm must hold 2"):
    metrics.hausdorff_distance(np.ones((4, 5), bool), np.ones((4, 5), bool), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="percentile"):
    metrics.hausdorff_distance(np.ones((4, 5), bool), np.ones((4, 5), bool), (1.0, 1.0), percentile=101)
