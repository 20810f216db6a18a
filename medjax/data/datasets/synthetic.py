"""Synthetic 2D/3D phantoms: segmentation and classification data with no download.

Generative model (one case; every number below is drawn from the case's own rng, so example i of a split
depends only on (seed, split, i)):

  Geometry, in mm. Voxel spacing s_k ~ U(spacing_range_mm[k]) independently per axis (anisotropic), and
  voxel centres sit at x_k = (j - (n_k - 1) / 2) * s_k. The scan field is fitted to the body: the body is an
  axis-aligned ellipsoid with semi-axes U(0.38, 0.46) * n_k * s_k. Organs and lesions have fixed physical
  sizes measured against L = min(image_size) mm (the side of the image at the 1 mm reference spacing), so
  the spacing changes their size and aspect in voxels:
    organs  (class 1): 1 or 2 randomly rotated ellipsoids, semi-axes U(0.19, 0.27) * L, centred inside the
            body, clipped to it; two organs may overlap.
    lesions (class 2): none with probability `lesion_free_prob`, else 1 or 2, each in a random organ, nearly
            spherical (radius U(0.12, 0.16) * L, +-15% per axis, randomly rotated), centred within 0.35 of
            the organ's semi-axes from its centre, clipped to the organ. At 32^3 a lesion has a radius of
            2.5-4.5 voxels and ~0.15x the organ volume, so lesion voxels are the rare foreground class.
  Intensities (tissue = 1, before the bias field): air U(0, 0.1); body tissue 1; organ 1 + U(1.0, 1.4);
  a bright lesion is the organ + U(0.8, 1.2), a dark lesion lies between tissue and organ at U(0.4, 0.6) of
  the organ contrast. All lesions of a case share one type (bright or dark). Every boundary has contrast
  >= 0.4 against noise_std = 0.1 by default, and edges are hard, so the labels are exact and learnable.
  Artefacts: a smooth multiplicative bias field exp(bias_field * p(u)), p a random quadratic polynomial of
  the normalised coordinates u in [-1, 1] scaled to max |p| = 1; then additive Gaussian noise of std
  `noise_std`. Finally the image is z-scored per case (zero mean, unit variance over all voxels).

Datasets (registered in DATASETS):
  "synthetic_phantoms"  segmentation, classes ("background", "organ", "lesion"); num_classes=2 merges the
                        lesions into the organ class ("background", "organ").
  "synthetic_lesions"   classification of the same phantoms by lesion type: num_classes=2 ("no_lesion",
                        "lesion") or 3 ("no_lesion", "bright_lesion", "dark_lesion"); `positive_fraction`
                        sets the share of cases with a lesion (None = balanced, 1 / num_classes per class).

Examples are dicts of numpy arrays: "image" float32 (*spatial, 1), "label" int32 (*spatial) or int32 scalar,
"spacing_mm" float32 (spatial_dims,), "id" int64 = split_code * 10**9 + index (train 0, val 1, test 2).
A 32^3 case takes a few ms to generate; recently used cases are kept in an LRU cache of `cache_size`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from medjax.data.datasets.base import DATASETS, Dataset, DatasetInfo, GeneratedSource

NONE, BRIGHT, DARK = 0, 1, 2  # lesion types


@dataclasses.dataclass(frozen=True)
class PhantomParams:
  """Knobs of the phantom generator (see module doc). spacing_range_mm is ((lo, hi),) * spatial_dims."""
  image_shape: Tuple[int, ...]
  spacing_range_mm: Tuple[Tuple[float, float], ...]
  noise_std: float = 0.1
  bias_field: float = 0.25


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
  """A uniformly random proper rotation (d, d): QR of a Gaussian matrix with the sign ambiguity fixed."""
  q, r = np.linalg.qr(rng.standard_normal((d, d)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _radius2(coords: Sequence[np.ndarray], center: np.ndarray, semi: np.ndarray,
             rot: Optional[np.ndarray] = None) -> np.ndarray:
  """Squared normalised radius of every voxel in an ellipsoid's frame; <= 1 inside. float32 (*spatial).

  coords[j] is the mm coordinate of axis j shaped to broadcast (n_j on axis j, 1 elsewhere); rot's columns
  are the ellipsoid's axes in the image frame. Built from broadcast sums, so no voxel loop and no meshgrid.
  """
  d = len(coords)
  rot = np.eye(d) if rot is None else rot
  delta = [c - np.float32(center[j]) for j, c in enumerate(coords)]
  total = 0.0
  for k in range(d):
    q = sum(delta[j] * np.float32(rot[j, k] / semi[k]) for j in range(d))
    total = total + q * q
  return total


def _bias(rng: np.random.Generator, shape: Tuple[int, ...], strength: float) -> np.ndarray:
  """Smooth multiplicative field exp(strength * p(u)), p a random quadratic scaled to max |p| = 1."""
  d = len(shape)
  u = [np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if a == j else 1 for a in range(d)])
       for j, n in enumerate(shape)]
  lin, quad = rng.standard_normal(d), rng.standard_normal((d, d))
  p = np.zeros(shape, np.float32)
  for j in range(d):
    p = p + np.float32(lin[j]) * u[j]
    for k in range(j, d):
      p = p + np.float32(quad[j, k]) * u[j] * u[k]
  peak = float(np.abs(p).max())
  if peak > 0:
    p *= np.float32(strength / peak)
  return np.exp(p)


def make_phantom(rng: np.random.Generator, params: PhantomParams, lesion_type: int,
                 num_lesions: int) -> Dict[str, np.ndarray]:
  """Draws one phantom case (module doc) with `num_lesions` lesions of `lesion_type` (BRIGHT or DARK).

  Returns "image" float32 (*spatial, 1), z-scored; "label" int32 (*spatial) with 0 background, 1 organ,
  2 lesion; "spacing_mm" float32 (spatial_dims,).
  """
  shape = params.image_shape
  d = len(shape)
  lo, hi = np.asarray(params.spacing_range_mm, np.float64).T
  spacing = rng.uniform(lo, hi)
  coords = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(spacing[j]))
            .reshape([n if a == j else 1 for a in range(d)]) for j, n in enumerate(shape)]
  extent = np.asarray(shape) * spacing  # field of view in mm
  size = float(min(shape))  # L: mm at the 1 mm reference spacing

  body_semi = rng.uniform(0.38, 0.46, d) * extent
  body_center = rng.uniform(-0.03, 0.03, d) * extent
  body = _radius2(coords, body_center, body_semi) <= 1.0

  organ_masks, organ_frames = [], []
  for _ in range(int(rng.integers(1, 3))):
    semi = rng.uniform(0.19, 0.27, d) * size
    center = body_center + rng.uniform(-0.45, 0.45, d) * body_semi
    rot = _rotation(rng, d)
    organ_masks.append(_radius2(coords, center, semi, rot) <= 1.0)
    organ_frames.append((center, semi, rot))
  organ = np.logical_or.reduce(organ_masks) & body

  lesion = np.zeros(shape, bool)
  for _ in range(num_lesions):
    which = int(rng.integers(len(organ_frames)))
    o_center, o_semi, o_rot = organ_frames[which]
    # Uniform in a ball of radius 0.35 in the organ's normalised frame, mapped back to mm.
    u = rng.standard_normal(d)
    u *= 0.35 * rng.uniform() ** (1.0 / d) / max(np.linalg.norm(u), 1e-12)
    center = o_center + o_rot @ (u * o_semi)
    semi = rng.uniform(0.12, 0.16) * size * rng.uniform(0.85, 1.15, d)
    lesion |= (_radius2(coords, center, semi, _rotation(rng, d)) <= 1.0) & organ_masks[which]
  lesion &= organ

  air = rng.uniform(0.0, 0.1)
  organ_level = 1.0 + rng.uniform(1.0, 1.4)
  lesion_level = organ_level + rng.uniform(0.8, 1.2) if lesion_type == BRIGHT \
      else 1.0 + (organ_level - 1.0) * rng.uniform(0.4, 0.6)
  image = np.where(body, np.float32(1.0), np.float32(air))
  image[organ] = organ_level
  image[lesion] = lesion_level
  image *= _bias(rng, shape, params.bias_field)
  image += np.float32(params.noise_std) * rng.standard_normal(shape, dtype=np.float32)
  image -= image.mean()
  image /= max(float(image.std()), 1e-6)

  label = organ.astype(np.int32)
  label[lesion] = 2
  return {"image": image[..., None], "label": label, "spacing_mm": spacing.astype(np.float32)}


def _segmentation_example(rng: np.random.Generator, index: int, *, params: PhantomParams,
                          num_classes: int, lesion_free_prob: float, dark_lesion_prob: float):
  del index  # rng already depends on it
  num_lesions = 0 if rng.uniform() < lesion_free_prob else int(rng.integers(1, 3))
  lesion_type = DARK if rng.uniform() < dark_lesion_prob else BRIGHT
  example = make_phantom(rng, params, lesion_type, num_lesions)
  if num_classes == 2:
    example["label"] = np.minimum(example["label"], 1)
  return example


def _classification_example(rng: np.random.Generator, index: int, *, params: PhantomParams,
                            num_classes: int, positive_fraction: float):
  del index
  if rng.uniform() >= positive_fraction:
    target = 0
  else:
    target = 1 if num_classes == 2 else int(rng.integers(1, 3))
  lesion_type = (BRIGHT if rng.uniform() < 0.5 else DARK) if num_classes == 2 else target
  example = make_phantom(rng, params, lesion_type, int(rng.integers(1, 3)) if target else 0)
  # A lesion clipped away entirely would mislabel the case; with lesion centres inside an organ it cannot
  # happen at sane sizes, but keep the label honest if it ever does.
  if target and not (example["label"] == 2).any():
    target = 0
  del example["label"]
  example["label"] = np.asarray(target, np.int32)
  return example


# ----------------------------------------------------------------------------------------------- builders


def _fail(dataset: str, key: str, message: str, value: Any):
  raise ValueError(f"dataset {dataset!r}: {key} {message}, got {value!r}.")


def _check_common(dataset: str, spatial_dims, image_size, num_train, num_val, num_test, seed, noise_std,
                  bias_field, spacing_range_mm, cache_size) -> PhantomParams:
  if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
    _fail(dataset, "spatial_dims", "must be 2 or 3", spatial_dims)
  shape = (image_size,) * spatial_dims if isinstance(image_size, (int, np.integer)) else tuple(image_size)
  if len(shape) != spatial_dims or not all(isinstance(n, (int, np.integer)) and n >= 8 for n in shape):
    _fail(dataset, "image_size", f"must be an int >= 8 or {spatial_dims} such ints (spatial_dims="
          f"{spatial_dims})", image_size)
  for key, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                     ("seed", seed), ("cache_size", cache_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
      _fail(dataset, key, "must be a non-negative int", value)
  for key, value in (("noise_std", noise_std), ("bias_field", bias_field)):
    if not isinstance(value, (int, float)) or not 0 <= value < np.inf:
      _fail(dataset, key, "must be a finite number >= 0", value)
  ranges = np.asarray(spacing_range_mm, np.float64) if _is_numeric(spacing_range_mm) else None
  if ranges is not None and ranges.shape == (2,):
    ranges = np.tile(ranges, (spatial_dims, 1))
  if ranges is None or ranges.shape != (spatial_dims, 2) or not np.all(
      (ranges[:, 0] > 0) & (ranges[:, 0] <= ranges[:, 1]) & np.isfinite(ranges[:, 1])):
    _fail(dataset, "spacing_range_mm", f"must be (lo, hi) with 0 < lo <= hi, or {spatial_dims} such pairs "
          "(one per axis)", spacing_range_mm)
  return PhantomParams(image_shape=tuple(int(n) for n in shape),
                       spacing_range_mm=tuple((float(a), float(b)) for a, b in ranges),
                       noise_std=float(noise_std), bias_field=float(bias_field))


def _is_numeric(value) -> bool:
  try:
    return np.asarray(value).dtype.kind in "iuf"
  except (ValueError, TypeError):  # ragged nesting
    return False


def _check_probability(dataset: str, key: str, value):
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
    _fail(dataset, key, "must be a number in [0, 1]", value)


def _make_dataset(info: DatasetInfo, sizes: Dict[str, int], seed: int, generate, cache_size: int) -> Dataset:
  sources = {split: GeneratedSource(split, n, seed, generate, cache_size) for split, n in sizes.items()}
  return Dataset(info=info, sources=sources)


@DATASETS.register("synthetic_phantoms")
def synthetic_phantoms(*, spatial_dims: int = 3, image_size=32, num_classes: int = 3, num_train: int = 256,
                       num_val: int = 32, num_test: int = 32, seed: int = 0, noise_std: float = 0.1,
                       bias_field: float = 0.25, spacing_range_mm=(0.8, 1.25), lesion_free_prob: float = 0.2,
                       dark_lesion_prob: float = 0.5, cache_size: int = 128) -> Dataset:
  """Segmentation phantoms (module doc): body, 1-2 organs (class 1), 0-2 lesions inside them (class 2).

  Args:
    spatial_dims: 2 or 3.
    image_size: int (every axis) or a tuple of spatial_dims ints, each >= 8; spatial order (z, y, x).
    num_classes: 3 ("background", "organ", "lesion") or 2 (lesions merged into "organ").
    num_train, num_val, num_test: number of cases per split.
    seed: base seed; example i of a split uses default_rng([seed, split_code, i]).
    noise_std: std of the additive Gaussian noise, relative to the body-tissue intensity 1.
    bias_field: strength of the multiplicative bias field (factor within exp(+-bias_field)).
    spacing_range_mm: (lo, hi) voxel spacing range for every axis, or one (lo, hi) per axis.
    lesion_free_prob: probability that a case has no lesion.
    dark_lesion_prob: probability that a case's lesions are darker (rather than brighter) than the organ.
    cache_size: examples kept per split in an LRU cache (0 = none); a 32^3 case costs ~260 kB.
  """
  name = "synthetic_phantoms"
  params = _check_common(name, spatial_dims, image_size, num_train, num_val, num_test, seed, noise_std,
                         bias_field, spacing_range_mm, cache_size)
  if num_classes not in (2, 3) or isinstance(num_classes, bool):
    _fail(name, "num_classes", "must be 2 or 3", num_classes)
  _check_probability(name, "lesion_free_prob", lesion_free_prob)
  _check_probability(name, "dark_lesion_prob", dark_lesion_prob)
  info = DatasetInfo(task="segmentation", spatial_dims=spatial_dims, image_shape=params.image_shape,
                     num_channels=1, num_classes=num_classes,
                     class_names=("background", "organ", "lesion")[:num_classes], label_kind="map")
  generate = functools.partial(_segmentation_example, params=params, num_classes=num_classes,
                               lesion_free_prob=float(lesion_free_prob),
                               dark_lesion_prob=float(dark_lesion_prob))
  return _make_dataset(info, {"train": num_train, "val": num_val, "test": num_test}, seed, generate,
                       cache_size)


@DATASETS.register("synthetic_lesions")
def synthetic_lesions(*, spatial_dims: int = 3, image_size=32, num_classes: int = 2,
                      positive_fraction: Optional[float] = None, num_train: int = 256, num_val: int = 32,
                      num_test: int = 32, seed: int = 0, noise_std: float = 0.1, bias_field: float = 0.25,
                      spacing_range_mm=(0.8, 1.25), cache_size: int = 128) -> Dataset:
  """Classification of phantoms by lesion type (module doc); label is an int32 scalar.

  Args:
    num_classes: 2 ("no_lesion", "lesion": bright or dark at random) or 3 ("no_lesion", "bright_lesion",
      "dark_lesion", the two lesion types equally likely).
    positive_fraction: share of cases with a lesion, in [0, 1]; None = balanced classes
      ((num_classes - 1) / num_classes). Labels are drawn per case, so a split matches it only on average.
    Other arguments as in `synthetic_phantoms`.
  """
  name = "synthetic_lesions"
  params = _check_common(name, spatial_dims, image_size, num_train, num_val, num_test, seed, noise_std,
                         bias_field, spacing_range_mm, cache_size)
  if num_classes not in (2, 3) or isinstance(num_classes, bool):
    _fail(name, "num_classes", "must be 2 or 3", num_classes)
  if positive_fraction is None:
    positive_fraction = (num_classes - 1) / num_classes
  _check_probability(name, "positive_fraction", positive_fraction)
  class_names = ("no_lesion", "lesion") if num_classes == 2 else ("no_lesion", "bright_lesion", "dark_lesion")
  info = DatasetInfo(task="classification", spatial_dims=spatial_dims, image_shape=params.image_shape,
                     num_channels=1, num_classes=num_classes, class_names=class_names, label_kind="class")
  generate = functools.partial(_classification_example, params=params, num_classes=num_classes,
                               positive_fraction=float(positive_fraction))
  return _make_dataset(info, {"train": num_train, "val": num_val, "test": num_test}, seed, generate,
                       cache_size)
