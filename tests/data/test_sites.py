"""Site splits, feature skew and harmonisation (medjax/data/sites.py)."""

import json

import numpy as np
import pytest

from medjax.data import harmonise, sites


def _labels(n=600, k=5, seed=0):
  return np.random.default_rng(seed).integers(0, k, n)


def _mean_site_entropy(site_of, labels, k):
  summary = sites.summarise_sites(site_of, labels, k)
  weights = np.asarray(summary["counts"], np.float64)
  return float(np.average(summary["label_entropy_bits"], weights=weights))


def test_dirichlet_split_is_deterministic_covers_every_example_and_fills_every_site():
  labels = _labels()
  a = sites.dirichlet_label_split(labels, 6, 0.3, seed=7, min_per_site=10)
  b = sites.dirichlet_label_split(labels, 6, 0.3, seed=7, min_per_site=10)
  c = sites.dirichlet_label_split(labels, 6, 0.3, seed=8, min_per_site=10)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.dtype == np.int32 and a.shape == labels.shape  # one site per example: each example exactly once
  assert a.min() == 0 and a.max() == 5
  assert np.bincount(a, minlength=6).min() >= 10 and np.bincount(a).sum() == len(labels)


def test_dirichlet_skew_grows_as_alpha_shrinks():
  labels = _labels(n=2000, k=5)
  skewed = np.mean([_mean_site_entropy(sites.dirichlet_label_split(labels, 5, 0.1, s), labels, 5) for s in range(3)])
  uniform = np.mean([_mean_site_entropy(sites.dirichlet_label_split(labels, 5, 100.0, s), labels, 5)
                     for s in range(3)])
  assert uniform > np.log2(5) - 0.05  # nearly IID: every site sees every class evenly
  assert skewed < uniform - 0.7


def test_split_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"num_sites=5 is more than the N=4 examples"):
    sites.dirichlet_label_split(np.zeros(4, int), 5, 1.0, 0)
  with pytest.raises(ValueError, match=r"min_per_site=3 examples need 9, but there are only N=8"):
    sites.quantity_split(8, 3, 1.0, 0, min_per_site=3)
  with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got 0"):
    sites.dirichlet_label_split(np.zeros(10, int), 2, 0, 0)
  with pytest.raises(ValueError, match=r"no draw in 1000 gave all num_sites=10 sites at least min_per_site=9"):
    sites.dirichlet_label_split(np.repeat(np.arange(2), 50), 10, 0.01, 0, min_per_site=9)
  with pytest.raises(ValueError, match=r"num_sites=3 is more than the N=2"):
    sites.iid_split(2, 3, 0)


def test_quantity_iid_and_column_splits():
  q = sites.quantity_split(500, 4, 0.2, seed=1, min_per_site=5)
  np.testing.assert_array_equal(q, sites.quantity_split(500, 4, 0.2, seed=1, min_per_site=5))
  counts = np.bincount(q, minlength=4)
  assert counts.sum() == 500 and counts.min() >= 5 and counts.max() > 2 * counts.min()  # unequal sizes
  iid = sites.iid_split(10, 3, seed=0)
  assert sorted(np.bincount(iid).tolist()) == [3, 3, 4]
  ids, names = sites.column_split(["b", "a", "c", "a"])
  assert names == ["a", "b", "c"] and ids.tolist() == [1, 0, 2, 0] and ids.dtype == np.int32
  ids, names = sites.column_split([30, 10, 30])
  assert names == [10, 30] and ids.tolist() == [1, 0, 1] and isinstance(names[0], int)


def test_summarise_sites_counts_and_is_json_able():
  summary = sites.summarise_sites(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 0, 0]), num_classes=3,
                                  num_sites=4)
  assert summary["counts"] == [2, 1, 3, 0]
  assert summary["class_counts"] == [[1, 1, 0], [0, 1, 0], [3, 0, 0], [0, 0, 0]]
  assert summary["label_entropy_bits"] == [1.0, 0.0, 0.0, 0.0]
  json.dumps(summary)


@pytest.mark.parametrize("shape", [(6, 5, 2), (3, 6, 5, 1)])
def test_feature_skew_is_deterministic_per_rng_and_identity_at_strength_zero(shape):
  image = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  for skew in sites.feature_skews(3, 0.0, seed=0):
    assert skew.is_identity
    np.testing.assert_array_equal(skew.apply(image, np.random.default_rng(1)), image)
  skews = sites.feature_skews(4, 1.0, seed=0)
  assert skews == sites.feature_skews(4, 1.0, seed=0)
  assert len({s.gain for s in skews}) == 4 and len({s.gamma for s in skews}) == 4  # spread out
  for skew in skews:
    a = skew.apply(image, np.random.default_rng([3, 4]))
    b = skew.apply(image, np.random.default_rng([3, 4]))
    assert a.dtype == np.float32 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(skews[0].apply(image, np.random.default_rng(0)),
                         skews[1].apply(image, np.random.default_rng(0)))


def test_feature_skew_components_do_what_they_say():
  image = np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8, 1)
  rng = np.random.default_rng(0)
  np.testing.assert_allclose(sites.FeatureSkew(offset=0.5).apply(image, rng), image + 0.5, atol=1e-6)
  np.testing.assert_allclose(sites.FeatureSkew(gain=2.0).apply(image, rng), 0.5 + 2 * (image - 0.5), atol=1e-6)
  np.testing.assert_allclose(sites.FeatureSkew(gamma=2.0).apply(image, rng), image ** 2, atol=1e-6)
  blurred = sites.FeatureSkew(blur_sigma=1.0).apply(image, rng)
  assert blurred.std() < image.std() and abs(blurred.mean() - image.mean()) < 0.02
  noisy = sites.FeatureSkew(noise_std=0.1).apply(np.zeros((64, 64, 1), np.float32), rng)
  assert 0.09 < noisy.std() < 0.11
  with pytest.raises(ValueError, match="gain and gamma must be > 0"):
    sites.FeatureSkew(gamma=0.0)


def _site_images(seed=0):
  """Two sites, 2 channels: site 1 has 3x the contrast and +2 offset of site 0, and a curved histogram."""
  rng = np.random.default_rng(seed)
  images, site_ids = [], []
  for i in range(12):
    site = i % 2
    x = rng.normal(0, 1, (5, 7, 2))
    if site == 1:
      x = 3 * np.exp(x / 2) + 2
    images.append(x.astype(np.float32))
    site_ids.append(site)
  return images, np.array(site_ids)


def test_zscore_makes_each_site_zero_mean_unit_std_and_round_trips():
  images, site_ids = _site_images()
  norm = harmonise.SiteIntensityNormaliser().fit(images, site_ids)
  for s in (0, 1):
    pooled = np.stack([norm.transform(x, s) for x, t in zip(images, site_ids) if t == s])
    np.testing.assert_allclose(pooled.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(pooled.std(axis=(0, 1, 2)), 1, atol=1e-5)
  restored = harmonise.harmoniser_from_dict(json.loads(json.dumps(norm.to_dict())))
  np.testing.assert_array_equal(restored.transform(images[1], 1), norm.transform(images[1], 1))
  with pytest.raises(ValueError, match=r"site 2 was not seen when fitting \(fitted sites: \[0, 1\]\)"):
    norm.transform(images[0], 2)


def test_histogram_matching_maps_site_quantiles_onto_the_reference():
  images, site_ids = _site_images()
  matcher = harmonise.HistogramMatcher(reference_site=0, num_landmarks=32).fit(images, site_ids)
  landmarks = matcher.landmarks  # (sites, C, L)
  # The landmarks of site 1, as an image, land exactly on the reference's landmarks.
  as_image = landmarks[1].T[:, None, :]  # (L, 1, C)
  np.testing.assert_allclose(matcher.transform(as_image, 1)[:, 0, :].T, landmarks[0], atol=1e-5)
  # Site 1's images, mapped, have the reference's distribution (quantiles within sampling error).
  mapped = np.concatenate([matcher.transform(x, 1).reshape(-1, 2) for x, s in zip(images, site_ids) if s == 1])
  reference = np.concatenate([x.reshape(-1, 2) for x, s in zip(images, site_ids) if s == 0])
  p = [0.1, 0.25, 0.5, 0.75, 0.9]
  np.testing.assert_allclose(np.quantile(mapped, p, axis=0), np.quantile(reference, p, axis=0), atol=0.2)
  # Monotone and extrapolated beyond the fitted range; the reference site maps onto itself.
  line = np.linspace(-50, 50, 101, dtype=np.float32)[:, None, None].repeat(2, axis=-1)
  assert np.all(np.diff(matcher.transform(line, 1)[:, 0, 0]) > 0)
  np.testing.assert_allclose(matcher.transform(images[0], 0), images[0], atol=1e-5)
  restored = harmonise.harmoniser_from_dict(json.loads(json.dumps(matcher.to_dict())))
  np.testing.assert_array_equal(restored.transform(images[1], 1), matcher.transform(images[1], 1))


def test_harmonisers_refuse_a_missing_reference_or_an_unfitted_site():
  images, site_ids = _site_images()
  with pytest.raises(ValueError, match=r"reference_site=2 has no training images \(sites seen: \[0, 1\]\)"):
    harmonise.HistogramMatcher(reference_site=2).fit(images, site_ids)
  only_site_2 = harmonise.HistogramMatcher(reference_site=2).fit(images[:2], [2, 2])
  with pytest.raises(ValueError, match=r"site 0 was not seen when fitting \(fitted sites: \[2\]\)"):
    only_site_2.transform(images[0], 0)
  json.dumps(only_site_2.to_dict())  # unfitted sites are stored as null
  restored = harmonise.HistogramMatcher.from_dict(json.loads(json.dumps(only_site_2.to_dict())))
  np.testing.assert_array_equal(restored.transform(images[0], 2), only_site_2.transform(images[0], 2))
  with pytest.raises(ValueError, match="call fit"):
    harmonise.SiteIntensityNormaliser().transform(images[0], 0)
