"""Site harmonisation: intensity differences between scanners undone before training (`medjax.data.sites`
simulates them).

`SiteIntensityNormaliser` z-scores intensities per site and `HistogramMatcher` maps every site's intensity
distribution onto a reference site's by piecewise-linear quantile mapping (Nyul & Udupa 1999, "On standardizing
the MR image intensity scale", Magn. Reson. Med. 42:1072). Both are fit on training images only and round-trip
through JSON-able dicts (`harmoniser_from_dict`), so a run can store what it applied. numpy only.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np


def _channels_last(image: Any, what: str) -> np.ndarray:
  x = np.asarray(image, np.float64)
  if x.ndim < 2:
    raise ValueError(f"{what}: images must be (*spatial, C), got shape {x.shape}.")
  return x.reshape(-1, x.shape[-1])


def _site_int(site: Any, num_sites: int, fitted: np.ndarray, what: str) -> int:
  s = int(site)
  if not 0 <= s < num_sites or not fitted[s]:
    seen = np.flatnonzero(fitted).tolist()
    raise ValueError(f"{what}: site {s} was not seen when fitting (fitted sites: {seen}).")
  return s


class SiteIntensityNormaliser:
  """Per-site, per-channel z-scoring of intensities: (x - mean[site]) / std[site].

  `fit` pools every voxel of a site's training images (exact streaming mean and variance, Chan et al.'s
  parallel update), so a site with brighter or higher-contrast scans comes out on a common scale.
  """

  def __init__(self, mean: Optional[np.ndarray] = None, std: Optional[np.ndarray] = None):
    self.mean = None if mean is None else np.asarray(mean, np.float64)
    self.std = None if std is None else np.asarray(std, np.float64)

  def fit(self, images: Iterable[np.ndarray], sites: Sequence[int]) -> SiteIntensityNormaliser:
    """Fits on training images (*spatial, C) and their site ids; returns self."""
    sites = np.asarray(sites, np.int64)
    if sites.size == 0 or sites.min() < 0:
      raise ValueError("SiteIntensityNormaliser.fit: sites must be a non-empty sequence of ids >= 0.")
    num_sites = int(sites.max()) + 1
    count = np.zeros(num_sites)
    mean, m2 = None, None
    seen = 0
    for image, site in zip(images, sites):
      x = _channels_last(image, "SiteIntensityNormaliser.fit")
      if mean is None:
        mean, m2 = np.zeros((num_sites, x.shape[1])), np.zeros((num_sites, x.shape[1]))
      n_b, mean_b = len(x), x.mean(axis=0)
      delta = mean_b - mean[site]
      total = count[site] + n_b
      mean[site] += delta * n_b / total
      m2[site] += ((x - mean_b) ** 2).sum(axis=0) + delta ** 2 * count[site] * n_b / total
      count[site] = total
      seen += 1
    if seen != len(sites):
      raise ValueError(f"SiteIntensityNormaliser.fit: {len(sites)} site ids but {seen} images.")
    fitted = count > 0
    std = np.sqrt(np.where(fitted[:, None], m2 / np.maximum(count, 1)[:, None], 1.0))
    self.mean = np.where(fitted[:, None], mean, np.nan)
    self.std = np.where(fitted[:, None], np.where(std > 1e-12, std, 1.0), np.nan)  # a constant site: shift only
    return self

  def _check_fitted(self) -> np.ndarray:
    if self.mean is None:
      raise ValueError("SiteIntensityNormaliser: call fit (or from_dict) before transform.")
    return ~np.isnan(self.mean[:, 0])

  def transform(self, image: np.ndarray, site: int) -> np.ndarray:
    """float32 (*spatial, C) image of `site`, z-scored with that site's statistics."""
    s = _site_int(site, len(self.mean) if self.mean is not None else 0, self._check_fitted(),
                  "SiteIntensityNormaliser.transform")
    x = np.asarray(image, np.float64)
    return ((x - self.mean[s]) / self.std[s]).astype(np.float32)

  def to_dict(self) -> Dict[str, Any]:
    self._check_fitted()
    return {"kind": "zscore", "mean": _nan_to_none(self.mean), "std": _nan_to_none(self.std)}

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> SiteIntensityNormaliser:
    if d.get("kind") != "zscore":
      raise ValueError(f"SiteIntensityNormaliser.from_dict: kind must be 'zscore', got {d.get('kind')!r}.")
    return cls(_none_to_nan(d["mean"]), _none_to_nan(d["std"]))


class HistogramMatcher:
  """Maps each site's intensity distribution onto a reference site's by piecewise-linear quantile mapping.

  `fit` computes, per site and channel, `num_landmarks` quantile landmarks at probabilities
  linspace(0, 1, L) as the average of the per-image quantiles of its training images (in one dimension the
  averaged quantile function is the Wasserstein-2 barycentre of the images' distributions, and memory stays
  O(sites x L) however many images there are). `transform(image, site)` sends an intensity through site
  s's landmarks to the reference site's landmarks by linear interpolation (Nyul & Udupa 1999); intensities
  outside site s's landmark range continue along the straight line through its end landmarks' images.
  """

  def __init__(self, reference_site: int = 0, num_landmarks: int = 256, landmarks: Optional[np.ndarray] = None):
    if num_landmarks < 2:
      raise ValueError(f"HistogramMatcher: num_landmarks must be >= 2, got {num_landmarks}.")
    self.reference_site = int(reference_site)
    self.num_landmarks = int(num_landmarks)
    self.landmarks = None if landmarks is None else np.asarray(landmarks, np.float64)  # (sites, C, L)

  def fit(self, images: Iterable[np.ndarray], sites: Sequence[int]) -> HistogramMatcher:
    """Fits on training images (*spatial, C) and their site ids; returns self. The reference site must be
    among them."""
    sites = np.asarray(sites, np.int64)
    if sites.size == 0 or sites.min() < 0:
      raise ValueError("HistogramMatcher.fit: sites must be a non-empty sequence of ids >= 0.")
    num_sites = int(sites.max()) + 1
    probabilities = np.linspace(0.0, 1.0, self.num_landmarks)
    total, count, seen = None, np.zeros(num_sites), 0
    for image, site in zip(images, sites):
      x = _channels_last(image, "HistogramMatcher.fit")
      q = np.quantile(x, probabilities, axis=0).T  # (C, L)
      if total is None:
        total = np.zeros((num_sites,) + q.shape)
      total[site] += q
      count[site] += 1
      seen += 1
    if seen != len(sites):
      raise ValueError(f"HistogramMatcher.fit: {len(sites)} site ids but {seen} images.")
    if not (self.reference_site < num_sites and count[self.reference_site] > 0):
      raise ValueError(f"HistogramMatcher.fit: reference_site={self.reference_site} has no training images "
                       f"(sites seen: {np.flatnonzero(count).tolist()}).")
    with np.errstate(invalid="ignore", divide="ignore"):
      self.landmarks = total / count[:, None, None]  # NaN rows for sites without images
    return self

  def _fitted(self) -> np.ndarray:
    if self.landmarks is None:
      raise ValueError("HistogramMatcher: call fit (or from_dict) before transform.")
    return ~np.isnan(self.landmarks[:, 0, 0])

  def transform(self, image: np.ndarray, site: int) -> np.ndarray:
    """float32 (*spatial, C) image of `site` with its intensities mapped onto the reference site's scale."""
    s = _site_int(site, len(self.landmarks) if self.landmarks is not None else 0, self._fitted(),
                  "HistogramMatcher.transform")
    x = np.asarray(image, np.float64)
    if x.shape[-1] != self.landmarks.shape[1]:
      raise ValueError(f"HistogramMatcher.transform: image has {x.shape[-1]} channels, fitted on "
                       f"{self.landmarks.shape[1]}.")
    out = np.empty_like(x)
    for c in range(x.shape[-1]):
      out[..., c] = _quantile_map(x[..., c], self.landmarks[s, c], self.landmarks[self.reference_site, c])
    return out.astype(np.float32)

  def to_dict(self) -> Dict[str, Any]:
    self._fitted()
    return {"kind": "histogram", "reference_site": self.reference_site, "num_landmarks": self.num_landmarks,
            "landmarks": _nan_to_none(self.landmarks)}

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> HistogramMatcher:
    if d.get("kind") != "histogram":
      raise ValueError(f"HistogramMatcher.from_dict: kind must be 'histogram', got {d.get('kind')!r}.")
    return cls(d["reference_site"], d["num_landmarks"], _none_to_nan(d["landmarks"]))


def _quantile_map(x: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Piecewise-linear map sending landmarks `source` (increasing) to `target`, extrapolated linearly."""
  # Tied source landmarks (e.g. a flat background) map to the mean of their targets: np.interp needs
  # strictly increasing abscissae to be well defined.
  xs, inverse = np.unique(source, return_inverse=True)
  ys = np.bincount(inverse, weights=target) / np.bincount(inverse)
  if len(xs) == 1:  # a constant site: shift it onto the reference's median
    return x - xs[0] + np.median(target)
  slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
  out = np.interp(x, xs, ys)
  out = np.where(x < xs[0], ys[0] + slope * (x - xs[0]), out)
  return np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), out)


def harmoniser_from_dict(d: Dict[str, Any]) -> Union[SiteIntensityNormaliser, HistogramMatcher]:
  """The harmoniser a `to_dict()` came from ("kind" is "zscore" or "histogram")."""
  kinds = {"zscore": SiteIntensityNormaliser, "histogram": HistogramMatcher}
  if d.get("kind") not in kinds:
    raise ValueError(f"harmoniser_from_dict: kind must be one of {sorted(kinds)}, got {d.get('kind')!r}.")
  return kinds[d["kind"]].from_dict(d)


def _nan_to_none(a: np.ndarray) -> Any:
  # JSON has no NaN; sites absent from the fit are stored as null.
  a = np.asarray(a, np.float64)
  return np.where(np.isnan(a), None, a).tolist() if np.isnan(a).any() else a.tolist()


def _none_to_nan(v: Any) -> np.ndarray:
  def walk(e):
    return [walk(i) for i in e] if isinstance(e, (list, tuple)) else (np.nan if e is None else float(e))
  return np.asarray(walk(v), np.float64)
