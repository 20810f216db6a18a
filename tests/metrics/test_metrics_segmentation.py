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
  # A false positive on an empty reference scores Dice 0 (it was NaN before the empty_score option).
  assert case["dice"][2] == 0.0 and np.isnan(case["recall"][2]) and case["precision"][2] == 0.0
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


# ------------------------------------------------------------------------------------------ normalized surface Dice


def _line_pair(dims):
  """A reference line of 6 voxels and a predicted one shifted by one voxel across (y in 2D, z in 3D) and by two
  along x. Spacing is anisotropic, so the across-shift costs 3 mm in 2D and 2.5 mm in 3D, an x-step 1 mm."""
  if dims == 2:
    shape, spacing, across = (4, 9), (3.0, 1.0), 3.0
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    ref[1, 1:7], pred[2, 3:9] = True, True
  else:
    shape, spacing, across = (3, 4, 9), (2.5, 3.0, 1.0), 2.5
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    ref[1, 1, 1:7], pred[2, 1, 3:9] = True, True
  return ref, pred, spacing, across


@pytest.mark.parametrize("dims", [2, 3])
def test_nsd_by_hand_with_anisotropic_spacing(dims):
  ref, pred, spacing, across = _line_pair(dims)
  # A one-voxel-thick line is all surface. Each line has 4 voxels straight across from the other (distance
  # `across`) and 2 overhanging ones at sqrt(across^2 + 1) and sqrt(across^2 + 4) mm: 12 surface voxels.
  near, far = np.sqrt(across**2 + 1), np.sqrt(across**2 + 4)
  cases = {across - 0.1: 0 / 12, across: 8 / 12, near: 10 / 12, (near + far) / 2: 10 / 12, far: 12 / 12}
  for tolerance, expected in cases.items():
    assert metrics.normalized_surface_dice(ref, pred, spacing, tolerance) == pytest.approx(expected), tolerance
    assert metrics.normalized_surface_dice(pred, ref, spacing, tolerance) == pytest.approx(expected)  # symmetric
  # With the same voxels at isotropic 1 mm the across-distance is 1 mm: spacing is honoured.
  assert metrics.normalized_surface_dice(ref, pred, (1.0,) * dims, 1.0) == pytest.approx(8 / 12)
  pred_to_ref, ref_to_pred = metrics.surface_distances(ref, pred, spacing)
  np.testing.assert_allclose(np.sort(pred_to_ref), [across] * 4 + [near, far])
  np.testing.assert_allclose(np.sort(ref_to_pred), [across] * 4 + [near, far])


def test_nsd_matches_monai_unit_test_case():
  # Project-MONAI/MONAI tests/metrics/test_surface_dice.py::test_tolerance_all_distances (euclidean part):
  # 10 x 10 image, prediction a vertical 3-voxel line at column 1, reference one at column 6, background
  # included. MONAI's expected values at class thresholds [0, 0], [2.8, 5.5] and [3, 6].
  pred_label, ref_label = np.zeros((10, 10), int), np.zeros((10, 10), int)
  pred_label[1:4, 1] = 1
  ref_label[5:8, 6] = 1
  expected = {(0.0, 0.0): (1 - (8 + 4) / (36 * 2 + 8 + 4), 0.0), (2.8, 5.5): (1 - 3 / (36 * 2 + 8 + 4), 1 - 4 / 6),
              (3.0, 6.0): (1 - 1 / (36 * 2 + 8 + 4), 1 - 2 / 6)}
  for tolerances, values in expected.items():
    for k in range(2):
      nsd = metrics.normalized_surface_dice(ref_label == k, pred_label == k, (1.0, 1.0), tolerances[k])
      assert nsd == pytest.approx(values[k]), (tolerances, k)
    case = metrics.segmentation_case_metrics(ref_label, pred_label, 2, (1.0, 1.0), nsd_tolerance_mm=tolerances)
    np.testing.assert_allclose(case["nsd"], values)


def test_nsd_bad_tolerance_raises():
  mask = _square((5, 6), (1, 1), 2)
  with pytest.raises(ValueError, match="tolerance_mm must be a finite number >= 0"):
    metrics.normalized_surface_dice(mask, mask, (1.0, 1.0), -1.0)
  with pytest.raises(ValueError, match=r"nsd_tolerance_mm must be one number or one per class \(3\)"):
    metrics.segmentation_case_metrics(mask.astype(int), mask.astype(int), 3, (1.0, 1.0), nsd_tolerance_mm=(1, 2))


# ------------------------------------------------------------------------------------------ empty-mask conventions

_EMPTY, _BLOB = np.zeros((5, 7), bool), _square((5, 7), (1, 2), 3)
_SITUATIONS = {"both_empty": (_EMPTY, _EMPTY), "false_positive": (_EMPTY, _BLOB), "missed": (_BLOB, _EMPTY)}


@pytest.mark.parametrize("situation,options,expected", [
    # (reference, prediction) situation, options, expected (dice, nsd, hd95)
    ("both_empty", {}, (np.nan, np.nan, np.nan)),
    ("both_empty", {"empty_score": 1.0}, (1.0, 1.0, np.nan)),
    ("both_empty", {"empty_score": 0.0}, (0.0, 0.0, np.nan)),
    ("both_empty", {"empty_distance": "inf"}, (np.nan, np.nan, np.nan)),
    ("false_positive", {}, (0.0, 0.0, np.nan)),
    ("false_positive", {"empty_score": 1.0}, (0.0, 0.0, np.nan)),
    ("false_positive", {"false_positive_score": "nan"}, (np.nan, np.nan, np.nan)),
    ("false_positive", {"empty_distance": "inf"}, (0.0, 0.0, np.inf)),
    ("missed", {}, (0.0, 0.0, np.nan)),
    ("missed", {"empty_score": 1.0, "false_positive_score": "nan"}, (0.0, 0.0, np.nan)),
    ("missed", {"empty_distance": "inf"}, (0.0, 0.0, np.inf)),
])
def test_empty_score_table(situation, options, expected):
  ref, pred = _SITUATIONS[situation]
  overlap_options = {k: v for k, v in options.items() if k != "empty_distance"}
  counts = np.array([[[np.sum(ref & pred), pred.sum(), ref.sum()]]], np.float64)
  dice = metrics.dice_per_case(counts, **overlap_options)[0, 0]
  iou = metrics.iou_per_case(counts, **overlap_options)[0, 0]
  nsd = metrics.normalized_surface_dice(ref, pred, (1.0, 2.0), 1.0, **overlap_options)
  hd95 = metrics.hausdorff_distance(ref, pred, (1.0, 2.0), empty_distance=options.get("empty_distance", "nan"))
  assd = metrics.average_surface_distance(ref, pred, (1.0, 2.0), empty_distance=options.get("empty_distance", "nan"))
  np.testing.assert_array_equal([dice, iou, nsd, hd95, assd], [*expected[:2], expected[1], expected[2], expected[2]])
  case = metrics.binary_case_metrics(ref, pred, (1.0, 2.0), nsd_tolerance_mm=1.0, **options)
  np.testing.assert_array_equal([case["dice"], case["iou"], case["nsd"], case["hd95"], case["assd"]],
                                [expected[0], expected[0], expected[1], expected[2], expected[2]])


def test_empty_options_are_checked():
  counts = np.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="empty_score must be 'nan', 0.0 or 1.0"):
    metrics.dice_per_case(counts, empty_score=0.5)
  with pytest.raises(ValueError, match="false_positive_score must be 0.0 or 'nan'"):
    metrics.dice_per_case(counts, false_positive_score=1.0)
  with pytest.raises(ValueError, match="empty_distance must be 'nan' or 'inf'"):
    metrics.hausdorff_distance(_BLOB, _EMPTY, (1.0, 1.0), empty_distance=0.0)
  assert np.isnan(metrics.dice_per_case(counts, empty_score=float("nan"))).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_case_metrics_with_a_voxel_mask_equal_the_unpadded_case(dims):
  rng = np.random.default_rng(dims)
  shape = (5, 6, 4)[-dims:]
  ref_label = rng.integers(0, 3, size=shape)
  ref_label[(0,) * dims] = 0
  pred_label = np.where(rng.random(shape) < 0.7, ref_label, rng.integers(0, 3, shape))
  spacing = (1.5, 0.7, 2.0)[-dims:]
  # Pad with garbage (labels out of range in the reference, class 2 predicted) that the mask removes.
  pad = [(1, 2)] * dims
  ref_padded = np.pad(ref_label, pad, constant_values=7)
  pred_padded = np.pad(pred_label, pad, constant_values=2)
  mask = np.pad(np.ones(shape, bool), pad, constant_values=False)
  options = dict(nsd_tolerance_mm=(1.0, 1.5, 2.0))
  plain = metrics.segmentation_case_metrics(ref_label, pred_label, 3, spacing, **options)
  masked = metrics.segmentation_case_metrics(ref_padded, pred_padded, 3, spacing, mask=mask, **options)
  assert plain.keys() == masked.keys()
  for key in plain:
    np.testing.assert_allclose(masked[key], plain[key], err_msg=key)
  regions = lambda label: np.stack([label >= 1, label == 2], -1)
  plain = metrics.multilabel_case_metrics(regions(ref_label), regions(pred_label), spacing,
                                          nsd_tolerance_mm=(1.0, 1.5))
  masked = metrics.multilabel_case_metrics(regions(ref_padded), regions(pred_padded), spacing, mask=mask,
                                           nsd_tolerance_mm=(1.0, 1.5))
  for key in plain:
    np.testing.assert_allclose(masked[key], plain[key], err_msg=key)
  assert plain["nsd"][1] == pytest.approx(metrics.normalized_surface_dice(ref_label == 2, pred_label == 2, spacing,
                                                                          1.5))
