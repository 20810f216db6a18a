"""Tests for medjax/data/preprocess.py: resampling, cropping, intensity normalisation, CLAHE, disk cache."""

import os

import numpy as np
import pytest

from medjax.data import preprocess as P  # noqa: N812  (P, as jax.sharding.PartitionSpec is written)

# (spacing, target): isotropic, mild up/down, and thick-slice (max/min > 3) cases; 2D and 3D.
SPACINGS = [
  ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5)),
  ((2.0, 0.7, 0.9), (1.0, 1.0, 1.0)),
  ((5.0, 0.8, 0.8), (1.0, 1.0, 1.0)),   # thick z, source anisotropic
  ((0.8, 0.8, 4.0), (0.5, 1.2, 1.0)),   # thick x
  ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)),   # target anisotropic
  ((0.6, 1.3), (1.0, 1.0)),
]


def _random_labels(rng, shape, values):
  # Smooth blobs, not white noise, so linear one-hot resampling has real boundaries to blend.
  field = rng.normal(size=shape + (len(values),))
  for axis in range(len(shape)):
    field = np.cumsum(field, axis=axis)
  return np.asarray(values, np.int32)[field.argmax(-1)]


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("spacing,target", SPACINGS)
def test_resample_label_never_creates_labels(spacing, target, mode):
  rng = np.random.default_rng(0)
  shape = (9, 14, 11)[:len(spacing)]
  for values in ([0, 1, 2], [0, 3, 7, 9]):  # non-contiguous labels: 4..6, 8 must not appear
    label = _random_labels(rng, shape, values)
    out = P.resample_label(label, spacing, target, mode=mode)
    assert out.dtype == label.dtype
    assert out.shape == P.resampled_shape(shape, spacing, target)
    assert set(np.unique(out)) <= set(np.unique(label))


def test_resample_label_linear_keeps_a_thin_structure_and_values():
  label = np.zeros((6, 20, 20), np.int16)
  label[:, 5:15, 5:15] = 4
  out = P.resample_label(label, (1, 1, 1), (1, 0.5, 0.5), mode="linear")
  assert out.shape == (6, 40, 40)
  np.testing.assert_array_equal(out[:, 12:28, 12:28], 4)
  np.testing.assert_array_equal(out[:, :8], 0)


@pytest.mark.parametrize("order", [3, 1])
@pytest.mark.parametrize("shape,spacing", [((8, 12, 10), (2.5, 0.7, 0.7)), ((16, 20), (0.5, 0.9))])
def test_resample_same_spacing_is_identity(shape, spacing, order):
  image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  np.testing.assert_array_equal(P.resample(image, spacing, spacing, order=order), image)
  label = (image > 0).astype(np.uint8)
  np.testing.assert_array_equal(P.resample_label(label, spacing, spacing, mode="linear"), label)


@pytest.mark.parametrize("spacing,target", SPACINGS)
def test_resample_shape_rule(spacing, target):
  shape = (9, 14, 11)[:len(spacing)]
  image = np.random.default_rng(2).normal(size=shape + (2,))  # trailing channels are kept
  out = P.resample(image, spacing, target, order=3)
  expected = tuple(int(round(n * s / t)) for n, s, t in zip(shape, spacing, target))
  assert out.shape == expected + (2,)
  assert out.dtype == np.float32


def test_resample_linear_preserves_constant_and_linear_ramp():
  image = np.full((6, 10, 8), 3.5, np.float32)
  np.testing.assert_allclose(P.resample(image, (1, 1, 1), (0.5, 2, 1), order=3), 3.5, rtol=1e-6)
  # Downsampling a ramp by 2 with linear, edge-aligned grids averages neighbour pairs exactly.
  ramp = np.arange(16, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
  out = P.resample(ramp, (1.0, 1.0), (2.0, 1.0), order=1)
  np.testing.assert_allclose(out[:, 0], np.arange(8) * 2 + 0.5, atol=1e-5)


def test_anisotropy_rule_uses_nearest_on_the_thick_axis():
  assert P.thick_axis((5.0, 0.8, 0.8)) == 0
  assert P.thick_axis((0.8, 0.8, 4.0)) == 2
  assert P.thick_axis((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0  # target spacing checked second
  assert P.thick_axis((2.0, 1.0, 1.0)) is None
  assert P.thick_axis((4.0, 4.0, 1.0)) is None  # two thick axes: nothing to treat separately
  assert P.thick_axis((5.0, 1.0)) is None  # 2D is never split
  # Upsampling the thick axis by 2 repeats slices exactly instead of interpolating between them.
  image = np.random.default_rng(3).normal(size=(4, 6, 6)).astype(np.float32)
  out = P.resample(image, (5.0, 1.0, 1.0), (2.5, 1.0, 1.0), order=3)
  assert out.shape == (8, 6, 6)
  np.testing.assert_array_equal(out[0::2], image)
  np.testing.assert_array_equal(out[1::2], image)


def test_resize_shapes_and_dtypes():
  label = np.arange(12, dtype=np.int32).reshape(3, 4)
  out = P.resize(label, (6, 8), order=0)
  assert out.dtype == np.int32 and out.shape == (6, 8)
  np.testing.assert_array_equal(out[::2, ::2], label)
  img = np.ones((5, 7, 3), np.uint8)
  out = P.resize(img, (10, 3), order=1)
  assert out.shape == (10, 3, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_resample_errors():
  with pytest.raises(ValueError, match="spacing"):
    P.resample(np.zeros((4, 4, 4)), (1, 1), (1, 1, 1))
  with pytest.raises(ValueError, match="target_spacing_mm"):
    P.resample(np.zeros((4, 4, 4)), (1, 1, 1), (1, 0, 1))
  with pytest.raises(ValueError, match="NaN/inf"):
    P.resample(np.array([[0.0, np.nan], [1.0, 2.0]]), (1, 1), (2, 2))
  with pytest.raises(ValueError, match="integer"):
    P.resample_label(np.zeros((4, 4), np.float32), (1, 1), (2, 2))
  with pytest.raises(ValueError, match="mode"):
    P.resample_label(np.zeros((4, 4), np.int32), (1, 1), (2, 2), mode="cubic")


@pytest.mark.parametrize("shape", [(10, 12, 9), (11, 16)])
@pytest.mark.parametrize("margin", [0, 2])
def test_crop_uncrop_round_trip(shape, margin):
  rng = np.random.default_rng(4)
  image = np.zeros(shape, np.float32)
  box = tuple(slice(2, n - 3) for n in shape)
  image[box] = rng.uniform(1, 2, size=image[box].shape)
  label = (image > 1.5).astype(np.int32)
  cropped, cropped_label, bbox = P.crop_to_nonzero(image, label, margin=margin)
  assert bbox == tuple((max(0, 2 - margin), min(n, n - 3 + margin)) for n in shape)
  assert cropped.shape == cropped_label.shape == tuple(b - a for a, b in bbox)
  np.testing.assert_array_equal(P.uncrop(cropped, bbox, shape), image)
  np.testing.assert_array_equal(P.uncrop(cropped_label, bbox, shape), label)
  only_image, bbox2 = P.crop_to_nonzero(image, margin=margin)
  assert bbox2 == bbox
  np.testing.assert_array_equal(only_image, cropped)


def test_crop_multichannel_and_empty():
  image = np.zeros((8, 9, 2), np.float32)
  image[3, 4, 1] = 1.0  # nonzero in one channel only still counts
  label = np.zeros((8, 9), np.int32)
  cropped, _, bbox = P.crop_to_nonzero(image, label)
  assert bbox == ((3, 4), (4, 5)) and cropped.shape == (1, 1, 2)
  full = P.uncrop(cropped, bbox, (8, 9), fill=-1.0)
  assert full.shape == (8, 9, 2) and full[0, 0, 0] == -1.0 and full[3, 4, 1] == 1.0
  _, bbox = P.crop_to_nonzero(np.zeros((5, 6)))
  assert bbox == ((0, 5), (0, 6))  # all-zero: no crop rather than an empty array
  with pytest.raises(ValueError, match="label shape"):
    P.crop_to_nonzero(np.zeros((5, 6)), np.zeros((5, 7), np.int32))
  with pytest.raises(ValueError, match="does not fit"):
    P.uncrop(np.zeros((2, 2)), ((0, 3), (0, 2)), (5, 5))


def test_window_presets_hand_computed():
  assert P.CT_WINDOWS == {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "abdomen": (40.0, 400.0),
                          "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
  hu = np.array([-2000.0, -1350.0, -600.0, 0.0, 150.0, 3000.0])
  # lung: [-1350, 150] -> [0, 1]
  np.testing.assert_allclose(P.window(hu, "lung"), [0, 0, 0.5, 0.9, 1, 1], atol=1e-7)
  # brain: [0, 80]
  np.testing.assert_allclose(P.window(np.array([-5.0, 0.0, 20.0, 40.0, 80.0, 100.0]), "brain"),
                             [0, 0, 0.25, 0.5, 1, 1], atol=1e-7)
  # abdomen: [-160, 240]; bone: [-500, 1300]; mediastinum: [-125, 225]
  np.testing.assert_allclose(P.window(np.array([-160.0, 40.0, 140.0]), "abdomen"), [0, 0.5, 0.75], atol=1e-7)
  np.testing.assert_allclose(P.window(np.array([-500.0, 400.0, 850.0]), "bone"), [0, 0.5, 0.75], atol=1e-7)
  np.testing.assert_allclose(P.window(np.array([-125.0, 50.0, 225.0]), "mediastinum"), [0, 0.5, 1], atol=1e-7)
  np.testing.assert_allclose(P.window(np.array([10.0, 15.0]), (10.0, 20.0)), [0.5, 0.75])
  assert P.window(hu, "lung").dtype == np.float32
  with pytest.raises(ValueError, match="known.*abdomen"):
    P.window(hu, "liver")
  with pytest.raises(ValueError, match="width"):
    P.window(hu, (0.0, 0.0))


def test_ct_normalize_hand_computed():
  hu = np.array([-1500.0, -100.0, 0.0, 100.0, 2000.0])
  out = P.ct_normalize(hu, p005=-1000.0, p995=1000.0, mean=100.0, std=50.0)
  np.testing.assert_allclose(out, [-22.0, -4.0, -2.0, 0.0, 18.0])
  assert out.dtype == np.float32
  with pytest.raises(ValueError, match="p005"):
    P.ct_normalize(hu, 10.0, -10.0, 0.0, 1.0)
  with pytest.raises(ValueError, match="NaN/inf"):
    P.ct_normalize(np.array([np.inf]), -1.0, 1.0, 0.0, 1.0)


def test_zscore_within_mask():
  rng = np.random.default_rng(5)
  image = np.zeros((6, 10, 8), np.float32)
  image[1:5, 2:8, 2:6] = rng.normal(300.0, 40.0, size=(4, 6, 4))
  out = P.zscore(image)
  mask = image != 0
  assert abs(out[mask].mean()) < 1e-5 and abs(out[mask].std() - 1) < 1e-5
  np.testing.assert_array_equal(out[~mask], 0.0)
  # Explicit mask and per-channel normalisation.
  two = np.stack([image, 2 * image + 7 * mask], axis=-1)
  out2 = P.zscore(two, mask)
  for c in range(2):
    assert abs(out2[..., c][mask].mean()) < 1e-5 and abs(out2[..., c][mask].std() - 1) < 1e-5
    np.testing.assert_array_equal(out2[..., c][~mask], 0.0)
  np.testing.assert_array_equal(P.zscore(np.zeros((3, 3))), 0.0)
  with pytest.raises(ValueError, match="mask shape"):
    P.zscore(image, np.ones((6, 9), bool))


def test_minmax():
  np.testing.assert_allclose(P.minmax(np.array([[2.0, 4.0], [6.0, 10.0]])), [[0, 0.25], [0.5, 1]])
  np.testing.assert_array_equal(P.minmax(np.full((3, 3), 5.0)), 0.0)


def test_histogram_equalize_ramp_monotone():
  ramp = np.tile(np.linspace(-100.0, 300.0, 32), (20, 1))
  out = P.histogram_equalize(ramp)
  assert out.shape == ramp.shape and out.dtype == np.float32
  assert out.min() == 0.0 and out.max() == 1.0
  assert np.all(np.diff(out, axis=1) >= 0)
  # Skewed intensities get spread out: equalised output of a uniform-rank image is ~uniform.
  skewed = (np.linspace(0, 1, 400) ** 2).reshape(20, 20)
  assert np.median(P.minmax(skewed)) < 0.3
  assert abs(np.median(P.histogram_equalize(skewed)) - 0.5) < 0.05
  np.testing.assert_array_equal(P.histogram_equalize(np.ones((4, 4))), 0.0)
  assert P.histogram_equalize(ramp[..., None]).shape == (20, 32, 1)
  with pytest.raises(ValueError, match="2D"):
    P.histogram_equalize(np.zeros((4, 4, 4)))


@pytest.mark.parametrize("tiles", [(4, 4), (3, 5), (1, 1)])
def test_clahe_range_and_ramp(tiles):
  ramp = np.tile(np.linspace(0.0, 1000.0, 32), (24, 1))
  out = P.clahe(ramp, clip_limit=2.0, tiles=tiles)
  assert out.shape == ramp.shape and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.corrcoef(out.ravel(), ramp.ravel())[0, 1] > 0.95
  assert np.all(np.diff(out, axis=1) >= -1e-6)  # a low clip limit keeps a ramp monotone
  # Rows of a horizontal ramp are identical: no seams from the vertical tiling.
  np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-6)


def test_clahe_boosts_local_contrast_and_errors():
  rng = np.random.default_rng(6)
  # Left half dark and low-contrast, right half bright: CLAHE stretches the dark half's detail.
  image = np.concatenate([rng.uniform(0, 10, (32, 16)), rng.uniform(900, 1000, (32, 16))], axis=1)
  out = P.clahe(image, clip_limit=40.0, tiles=(2, 2))
  assert out[:, :8].std() > 3 * P.minmax(image)[:, :8].std()
  with pytest.raises(ValueError, match="tiles"):
    P.clahe(np.zeros((4, 4)), tiles=(8, 8))
  with pytest.raises(ValueError, match="clip_limit"):
    P.clahe(np.zeros((4, 4)), clip_limit=0.0, tiles=(2, 2))


def test_config_hash_canonical():
  a = P.preprocess_config_hash({"spacing_mm": (1.0, 1.0, 2.5), "window": "lung"})
  b = P.preprocess_config_hash({"window": "lung", "spacing_mm": [1.0, 1.0, 2.5]})
  assert a == b and len(a) == 64
  assert a != P.preprocess_config_hash({"window": "lung", "spacing_mm": [1.0, 1.0, 2.0]})
  assert a == P.preprocess_config_hash({"window": "lung", "spacing_mm": np.array([1.0, 1.0, 2.5])})
  with pytest.raises(ValueError, match="JSON"):
    P.preprocess_config_hash({"fn": object()})


def test_cache_hit_miss(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    rng = np.random.default_rng(len(calls))
    return {"image": rng.normal(size=(4, 5, 6)).astype(np.float32), "label": np.arange(6, dtype=np.int16)}

  config = {"target_spacing_mm": [1.0, 1.0, 1.0], "norm": "ct"}
  first = P.cached(config, "case_001", compute, tmp_path / "cache")
  second = P.cached(dict(config), "case_001", compute, tmp_path / "cache")
  assert len(calls) == 1
  assert first.keys() == second.keys() == {"image", "label"}
  for k in first:
    assert first[k].dtype == second[k].dtype
    np.testing.assert_array_equal(first[k], second[k])
  P.cached({**config, "norm": "zscore"}, "case_001", compute, tmp_path / "cache")
  assert len(calls) == 2  # config change misses
  P.cached(config, "case_002", compute, tmp_path / "cache")
  assert len(calls) == 3  # other case misses
  files = sorted(os.listdir(tmp_path / "cache"))
  assert len(files) == 3 and all(f.endswith(".npz") and not f.startswith(".tmp") for f in files)


def test_cache_recovers_from_corrupt_file_and_rejects_bad_output(tmp_path):
  config = {"a": 1}
  path = P.cache_path(config, "c/1", tmp_path)
  assert os.path.dirname(path) == str(tmp_path) and "/" not in os.path.basename(path)
  with open(path, "wb") as f:
    f.write(b"not an npz")
  out = P.cached(config, "c/1", lambda: {"x": np.ones(3)}, tmp_path)
  np.testing.assert_array_equal(P.cached(config, "c/1", lambda: 1 / 0, tmp_path)["x"], out["x"])
  with pytest.raises(ValueError, match="case 'bad'"):
    P.cached(config, "bad", lambda: [1, 2], tmp_path)
  with pytest.raises(ValueError, match="case 'bad2'"):
    P.cached(config, "bad2", lambda: {"x": np.array([{}, None], dtype=object)}, tmp_path)
  assert not any(f.startswith(".tmp") for f in os.listdir(tmp_path))
  assert not any(f.startswith("bad") for f in os.listdir(tmp_path))
