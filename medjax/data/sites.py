"""Data sites for federated learning: non-IID splits, scanner-like feature skew, and site harmonisation.

A federation's sites (hospitals) either come from a site column of the data (`column_split`) or are simulated
by partitioning one dataset:

  dirichlet_label_split  label skew: each class's examples are spread over the sites in proportions drawn
                         from Dirichlet(alpha * 1) (Hsu, Qi & Brown 2019, arXiv:1909.06335); small alpha gives
                         each site few classes, large alpha approaches an IID split.
  quantity_split         quantity skew: site sizes ~ Dirichlet(alpha), labels IID.
  iid_split              equal-size random sites.

Sites also differ in how their images look (scanner vendor, protocol, reconstruction kernel). `FeatureSkew`
simulates that per site with a gamma curve, a contrast gain, an intensity offset, a blur and noise, and
`feature_skews` spreads such settings over the sites. Harmonisation (`medjax.data.harmonise`) undoes part of it
before training.

Everything here is numpy (and scipy.ndimage for the blur): data code runs on the host and knows no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Seed = Union[int, Sequence[int]]
# Redraws of a Dirichlet split before giving up: each attempt is cheap, and a split that keeps failing the
# minimum site size needs a larger alpha or fewer sites, not more attempts.
MAX_REDRAWS = 1000


# ---------------------------------------------------------------------------------------------- site splits


def _check_counts(num_examples: int, num_sites: int, min_per_site: int, what: str) -> None:
  if not isinstance(num_sites, (int, np.integer)) or isinstance(num_sites, bool) or num_sites < 1:
    raise ValueError(f"{what}: num_sites must be an int >= 1, got {num_sites!r}.")
  if not isinstance(min_per_site, (int, np.integer)) or min_per_site < 0:
    raise ValueError(f"{what}: min_per_site must be an int >= 0, got {min_per_site!r}.")
  if num_sites > num_examples:
    raise ValueError(f"{what}: num_sites={num_sites} is more than the N={num_examples} examples; every site "
                     f"needs at least one example.")
  if num_sites * min_per_site > num_examples:
    raise ValueError(f"{what}: num_sites={num_sites} sites of at least min_per_site={min_per_site} examples "
                     f"need {num_sites * min_per_site}, but there are only N={num_examples}.")


def _check_alpha(alpha: float, what: str) -> None:
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < np.inf:
    raise ValueError(f"{what}: alpha must be a finite number > 0, got {alpha!r}.")


def _cuts(proportions: np.ndarray, n: int) -> np.ndarray:
  """Boundaries splitting n items into len(proportions) consecutive runs of about those proportions."""
  return np.round(np.cumsum(proportions)[:-1] * n).astype(np.int64)


def dirichlet_label_split(labels: np.ndarray, num_sites: int, alpha: float, seed: Seed,
                          min_per_site: int = 1) -> np.ndarray:
  """Assigns every example to a site with label skew (Hsu, Qi & Brown 2019).

  For each class, site proportions p ~ Dirichlet(alpha * 1_K) are drawn and the class's examples (in random
  order) are cut into K runs of sizes ~ p * n_class. The whole draw is repeated until every site has at least
  `min_per_site` examples; the repeats come from one generator seeded by `seed`, so the result is deterministic.

  Args:
    labels: int (N,) class of each example.
    num_sites: K >= 1.
    alpha: concentration > 0; small alpha = strong skew.
    seed: int or sequence of ints (numpy SeedSequence entropy).
    min_per_site: smallest allowed site size.
  Returns: int32 (N,) site of each example, in [0, K).
  Raises ValueError naming num_sites and N when K sites cannot be filled, or when no draw in MAX_REDRAWS
  reaches min_per_site (then alpha is too small for that many sites).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"dirichlet_label_split: labels must be 1-D (N,), got shape {labels.shape}.")
  n = len(labels)
  _check_counts(n, num_sites, min_per_site, "dirichlet_label_split")
  _check_alpha(alpha, "dirichlet_label_split")
  rng = np.random.default_rng(seed)
  classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  for _ in range(MAX_REDRAWS):
    sites = np.empty(n, np.int32)
    for members in classes:
      members = rng.permutation(members)
      proportions = rng.dirichlet(np.full(num_sites, float(alpha)))
      for site, run in enumerate(np.split(members, _cuts(proportions, len(members)))):
        sites[run] = site
    if np.bincount(sites, minlength=num_sites).min() >= min_per_site:
      return sites
  raise ValueError(f"dirichlet_label_split: no draw in {MAX_REDRAWS} gave all num_sites={num_sites} sites "
                   f"at least min_per_site={min_per_site} of the N={n} examples at alpha={alpha}; raise alpha "
                   "or lower num_sites.")


def quantity_split(num_examples: int, num_sites: int, alpha: float, seed: Seed, min_per_site: int = 1) -> np.ndarray:
  """Assigns examples to sites whose sizes follow Dirichlet(alpha * 1_K) proportions; labels stay IID.

  Returns int32 (num_examples,) site ids. Redraws (deterministically from `seed`) until every site has at
  least `min_per_site` examples; raises ValueError naming num_sites and N when that is impossible.
  """
  _check_counts(num_examples, num_sites, min_per_site, "quantity_split")
  _check_alpha(alpha, "quantity_split")
  rng = np.random.default_rng(seed)
  for _ in range(MAX_REDRAWS):
    order = rng.permutation(num_examples)
    proportions = rng.dirichlet(np.full(num_sites, float(alpha)))
    sites = np.empty(num_examples, np.int32)
    for site, run in enumerate(np.split(order, _cuts(proportions, num_examples))):
      sites[run] = site
    if np.bincount(sites, minlength=num_sites).min() >= min_per_site:
      return sites
  raise ValueError(f"quantity_split: no draw in {MAX_REDRAWS} gave all num_sites={num_sites} sites at least "
                   f"min_per_site={min_per_site} of the N={num_examples} examples at alpha={alpha}; raise alpha.")


def iid_split(num_examples: int, num_sites: int, seed: Seed) -> np.ndarray:
  """int32 (num_examples,) site ids of a random split into sites whose sizes differ by at most one."""
  _check_counts(num_examples, num_sites, 1, "iid_split")
  sites = np.empty(num_examples, np.int32)
  sites[np.random.default_rng(seed).permutation(num_examples)] = np.arange(num_examples) % num_sites
  return sites


def column_split(values: Sequence[Any]) -> Tuple[np.ndarray, List[Any]]:
  """Sites from a site column (strings or ints): (int32 (N,) site ids, sorted site names).

  Site j is the j-th distinct value in sorted order, so the same column always gives the same ids.
  """
  values = np.asarray(list(values))
  if values.ndim != 1 or len(values) == 0:
    raise ValueError(f"column_split: the site column must be a non-empty 1-D sequence, got shape {values.shape}.")
  names, sites = np.unique(values, return_inverse=True)
  return sites.astype(np.int32).reshape(-1), [v.item() if hasattr(v, "item") else v for v in names]


def summarise_sites(site_of_example: np.ndarray, labels: Optional[np.ndarray] = None,
                    num_classes: Optional[int] = None, num_sites: Optional[int] = None) -> Dict[str, Any]:
  """Counts per site (and per class per site when `labels` are given) as a JSON-able dict.

  Args:
    site_of_example: int (N,) site ids.
    labels: optional int (N,) class of each example.
    num_classes: number of classes (default: max label + 1).
    num_sites: number of sites (default: max site + 1), so that empty sites are counted too.
  Returns: {"num_examples", "num_sites", "counts": [per site]} plus, with labels, "class_counts" (a list per
  site of per-class counts) and "label_entropy_bits" (per site, entropy of its label distribution).
  """
  sites = np.asarray(site_of_example).astype(np.int64)
  if num_sites is None:
    num_sites = int(sites.max()) + 1 if sites.size else 0
  summary: Dict[str, Any] = {"num_examples": int(sites.size), "num_sites": num_sites,
                             "counts": np.bincount(sites, minlength=num_sites).tolist()}
  if labels is not None:
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != sites.shape:
      raise ValueError(f"summarise_sites: labels have shape {labels.shape}, sites {sites.shape}.")
    k = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if labels.size else 0)
    table = np.zeros((num_sites, k), np.int64)
    np.add.at(table, (sites, labels), 1)
    summary["class_counts"] = table.tolist()
    summary["label_entropy_bits"] = [label_entropy(row) for row in table]
  return summary


def label_entropy(counts: np.ndarray) -> float:
  """Entropy in bits of the distribution given by non-negative `counts` (0 for an empty site)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    return 0.0
  p = counts[counts > 0] / total
  return float(-(p * np.log2(p)).sum())


# --------------------------------------------------------------------------------------------- feature skew


@dataclasses.dataclass(frozen=True)
class FeatureSkew:
  """How one site's scanner changes an image; the defaults change nothing.

  Applied in acquisition order: gamma curve, contrast gain about the image mean, intensity offset, blur
  (point-spread function), additive noise.

  Attributes:
    gain: contrast multiplier about the image's mean intensity (per channel).
    offset: added to every intensity, in the image's intensity units.
    gamma: exponent applied to intensities rescaled to [0, 1] over `intensity_range` (then scaled back).
    noise_std: std of additive Gaussian noise, in intensity units.
    blur_sigma: Gaussian blur std in voxels over the spatial axes (0 = none).
    intensity_range: (lo, hi) of the site's data for the gamma curve; None = each image's own min and max.
  """
  gain: float = 1.0
  offset: float = 0.0
  gamma: float = 1.0
  noise_std: float = 0.0
  blur_sigma: float = 0.0
  intensity_range: Optional[Tuple[float, float]] = None

  def __post_init__(self):
    if not self.gain > 0 or not self.gamma > 0:
      raise ValueError(f"FeatureSkew: gain and gamma must be > 0, got gain={self.gain}, gamma={self.gamma}.")
    if self.noise_std < 0 or self.blur_sigma < 0:
      raise ValueError(f"FeatureSkew: noise_std and blur_sigma must be >= 0, got {self.noise_std}, "
                       f"{self.blur_sigma}.")

  @property
  def is_identity(self) -> bool:
    return (self.gain, self.offset, self.gamma, self.noise_std, self.blur_sigma) == (1.0, 0.0, 1.0, 0.0, 0.0)

  def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The skewed image: float32 (*spatial, C) in, float32 (*spatial, C) out.

    `rng` only feeds the noise, so the result is a function of (image, rng state); seed it per (site,
    example) to make the skew deterministic per example.
    """
    image = np.asarray(image, np.float32)
    if self.is_identity:
      return image.copy()
    x = image.astype(np.float64)
    spatial_axes = tuple(range(x.ndim - 1))
    if self.gamma != 1.0:
      if self.intensity_range is None:
        lo, hi = x.min(axis=spatial_axes, keepdims=True), x.max(axis=spatial_axes, keepdims=True)
      else:
        lo, hi = (np.float64(v) for v in self.intensity_range)
      span = np.maximum(hi - lo, 1e-12)
      x = lo + span * np.clip((x - lo) / span, 0.0, 1.0) ** self.gamma
    if self.gain != 1.0:
      mean = x.mean(axis=spatial_axes, keepdims=True)
      x = mean + self.gain * (x - mean)
    x = x + self.offset
    if self.blur_sigma > 0:
      from scipy import ndimage  # only skews with a blur need scipy
      x = ndimage.gaussian_filter(x, sigma=(self.blur_sigma,) * len(spatial_axes) + (0.0,), mode="nearest")
    if self.noise_std > 0:
      x = x + rng.normal(0.0, self.noise_std, size=x.shape)
    return x.astype(np.float32)

  def to_dict(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    if self.intensity_range is not None:
      out["intensity_range"] = [float(v) for v in self.intensity_range]
    return out


def feature_skews(num_sites: int, strength: float, seed: Seed) -> List[FeatureSkew]:
  """One `FeatureSkew` per site, spread out and deterministic in (num_sites, strength, seed).

  Each setting takes evenly spaced levels over the sites, permuted independently per setting by `seed`, so
  sites differ in several ways at once rather than along one axis. At strength 1 gains span exp(+-0.3),
  gammas exp(+-0.4), offsets +-0.2 and noise std 0..0.05 (in intensity units, suited to images of unit
  scale), and blurs 0..1 voxel; strength scales all of them, and 0 gives identities.
  """
  if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 <= strength < np.inf:
    raise ValueError(f"feature_skews: strength must be a finite number >= 0, got {strength!r}.")
  _check_counts(num_sites, num_sites, 0, "feature_skews")
  if strength == 0:
    return [FeatureSkew() for _ in range(num_sites)]
  rng = np.random.default_rng(seed)
  centred = np.linspace(-1.0, 1.0, num_sites) if num_sites > 1 else np.zeros(1)
  ramp = np.linspace(0.0, 1.0, num_sites) if num_sites > 1 else np.zeros(1)
  gain, gamma, offset = (rng.permutation(centred) for _ in range(3))
  noise, blur = (rng.permutation(ramp) for _ in range(2))
  s = float(strength)
  return [FeatureSkew(gain=float(np.exp(0.3 * s * gain[j])), offset=float(0.2 * s * offset[j]),
                      gamma=float(np.exp(0.4 * s * gamma[j])), noise_std=float(0.05 * s * noise[j]),
                      blur_sigma=float(s * blur[j])) for j in range(num_sites)]
