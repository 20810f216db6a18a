"""Deterministic host-side preprocessing: resampling, foreground cropping, intensity normalisation, cache.

Conventions: arrays are channels-last, volumes `(z, y, x[, C])` and images `(y, x[, C])`; `spacing_mm` has one
entry per spatial axis, in the array's axis order, in millimetres. Images come back as float32; label maps
keep their integer dtype. Everything here is numpy/scipy only (no jax) and has no randomness, so the same
input and configuration always give the same bytes, which is what lets `cached` key results by a config hash.

Anisotropy rule (as nnU-Net plans thick-slice data): when a 3D spacing has max/min > 3 (checked on the source
spacing first, then on the target spacing), the single thickest axis is resampled on its own with
nearest-neighbour (order 0), and the other axes with the requested order. Cubic interpolation across slices
5 mm apart invents structure that was never imaged; nearest keeps whole slices instead. Resampling is done
one axis at a time, which for a tensor-product grid equals the full N-D spline and lets each axis take its
own order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.ndimage as ndi

from medjax import atomic

ANISOTROPY_THRESHOLD = 3.0

# (center, width) in Hounsfield units, the usual radiology display windows.
CT_WINDOWS: Dict[str, Tuple[float, float]] = {
  "lung": (-600.0, 1500.0),
  "mediastinum": (50.0, 350.0),
  "abdomen": (40.0, 400.0),
  "bone": (400.0, 1800.0),
  "brain": (40.0, 80.0),
}

BBox = Tuple[Tuple[int, int], ...]  # ((start, stop), ...) per spatial axis, stop exclusive


# ----------------------------------------------------------------------------------------------- helpers
def _check_finite(array: np.ndarray, what: str) -> None:
  bad = array.size - int(np.count_nonzero(np.isfinite(array)))
  if bad:
    raise ValueError(f"{what}: {bad} NaN/inf voxels in an array of shape {array.shape}.")


def _spatial_ndim(array: np.ndarray, spatial_dims: int, what: str) -> None:
  if array.ndim not in (spatial_dims, spatial_dims + 1):
    raise ValueError(f"{what}: array of shape {array.shape} does not match {spatial_dims} spatial axes "
                     f"(expected {spatial_dims} axes, or {spatial_dims + 1} with trailing channels).")


def _as_spacing(spacing, n: int, name: str) -> np.ndarray:
  s = np.asarray(spacing, dtype=np.float64).reshape(-1)
  if s.size != n or not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise ValueError(f"{name}={tuple(np.asarray(spacing).reshape(-1))} must be {n} positive finite values (mm).")
  return s


def resampled_shape(shape: Sequence[int], spacing_mm, target_spacing_mm) -> Tuple[int, ...]:
  """Spatial shape after resampling: round(shape * spacing / target), at least 1 per axis."""
  src = _as_spacing(spacing_mm, len(shape), "spacing_mm")
  dst = _as_spacing(target_spacing_mm, len(shape), "target_spacing_mm")
  return tuple(max(1, int(round(n * a / b))) for n, a, b in zip(shape, src, dst))


def thick_axis(spacing_mm, target_spacing_mm=None, threshold: float = ANISOTROPY_THRESHOLD) -> Optional[int]:
  """The axis to resample separately with nearest, or None (see the module docstring's anisotropy rule).

  Only 3D spacings qualify, and only when one axis is strictly the thickest (two equal thick axes would
  leave no in-plane to interpolate in, so everything is resampled together).
  """
  for s in (spacing_mm, target_spacing_mm):
    if s is None:
      continue
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if s.size != 3 or s.max() / s.min() <= threshold:
      continue
    axis = int(np.argmax(s))
    return axis if np.count_nonzero(s == s[axis]) == 1 else None
  return None


def _zoom_axes(array: np.ndarray, shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
  """Resamples the leading len(shape) axes of `array` to `shape`, one axis at a time with its own order.

  Voxel edges are aligned (grid_mode): the first and last voxels' outer faces stay put, which is what a
  change of voxel size means physically. An axis whose size does not change is not touched, so resampling
  to the same spacing is exactly the identity.
  """
  out = array
  for axis, (n_new, order) in enumerate(zip(shape, orders)):
    n_old = out.shape[axis]
    if n_new == n_old:
      continue
    factors = [1.0] * out.ndim
    factors[axis] = n_new / n_old
    out = ndi.zoom(out, factors, order=order, mode="reflect", grid_mode=True, prefilter=order > 1)
    assert out.shape[axis] == n_new, (out.shape, n_new)  # zoom rounds n_old * factor back to n_new
  return out


# ------------------------------------------------------------------------------------------ resampling
def resize(array: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
  """Resizes the spatial axes of `array` (*spatial[, C]) to `shape` (len(shape) spatial axes, voxels).

  order 0 keeps the dtype (use it for label maps); order >= 1 returns float32. Trailing channels are kept.
  """
  shape = tuple(int(n) for n in shape)
  array = np.asarray(array)
  _spatial_ndim(array, len(shape), "resize")
  if any(n < 1 for n in shape):
    raise ValueError(f"resize: target shape {shape} must be positive.")
  if order not in range(6):
    raise ValueError(f"resize: order must be 0..5, got {order}.")
  if order > 0:
    array = array.astype(np.float32, copy=False)
  return _zoom_axes(array, shape, [order] * len(shape))


def resample(array: np.ndarray, spacing_mm, target_spacing_mm, *, order: int = 3,
             anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
  """Resamples an image (*spatial[, C]) from `spacing_mm` to `target_spacing_mm` (mm, spatial axis order).

  The new spatial shape is `resampled_shape(...)`, i.e. round(shape * spacing / target). `order` is the
  spline order (3 cubic, 1 linear); a thick axis (module docstring) uses order 0. Returns float32.
  Cubic splines can overshoot the input range near sharp edges, as in nnU-Net; clip afterwards if needed.
  """
  array = np.asarray(array)
  n = len(np.asarray(spacing_mm).reshape(-1))
  _spatial_ndim(array, n, "resample")
  if order not in (0, 1, 2, 3, 4, 5):
    raise ValueError(f"resample: order must be 0..5, got {order}.")
  _check_finite(array, "resample")
  shape = resampled_shape(array.shape[:n], spacing_mm, target_spacing_mm)
  orders = [order] * n
  axis = thick_axis(spacing_mm, target_spacing_mm, anisotropy_threshold)
  if axis is not None:
    orders[axis] = 0
  return _zoom_axes(array.astype(np.float32, copy=False), shape, orders)


def resample_label(label: np.ndarray, spacing_mm, target_spacing_mm, *, mode: str = "nearest",
                   anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
  """Resamples an integer label map (*spatial) to `target_spacing_mm`; never creates a label not in the input.

  mode "nearest": every output voxel copies one input voxel.
  mode "linear": each present class's one-hot indicator is resampled linearly and the output takes the
  class with the largest value (ties to the smaller label), which gives smoother boundaries than nearest,
  as nnU-Net does for segmentations. Only classes present in the input compete, so no new label can appear.
  A thick axis (module docstring) is resampled with nearest in both modes. Keeps the input dtype.
  """
  label = np.asarray(label)
  n = len(np.asarray(spacing_mm).reshape(-1))
  if label.ndim != n:
    raise ValueError(f"resample_label: label of shape {label.shape} must have exactly {n} spatial axes "
                     f"(one per spacing entry), no channel axis.")
  if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
    raise ValueError(f"resample_label: label dtype must be integer, got {label.dtype}.")
  shape = resampled_shape(label.shape, spacing_mm, target_spacing_mm)
  if mode == "nearest":
    return _zoom_axes(label, shape, [0] * n)
  if mode != "linear":
    raise ValueError(f"resample_label: mode must be 'nearest' or 'linear', got {mode!r}.")
  orders = [1] * n
  axis = thick_axis(spacing_mm, target_spacing_mm, anisotropy_threshold)
  if axis is not None:
    orders[axis] = 0
  classes = np.unique(label)
  out = np.full(shape, classes[0], dtype=label.dtype)
  best = np.full(shape, -np.inf, dtype=np.float32)
  # One class at a time keeps memory at two volumes instead of num_classes.
  for c in classes:
    score = _zoom_axes((label == c).astype(np.float32), shape, orders)
    better = score > best
    out[better] = c
    best[better] = score[better]
  return out


# --------------------------------------------------------------------------------------------- cropping
def nonzero_bbox(image: np.ndarray, spatial_dims: Optional[int] = None, margin: int = 0) -> BBox:
  """Bounding box ((start, stop), ...) of voxels nonzero in any channel, grown by `margin` voxels.

  An all-zero image gives the full extent (nothing to crop rather than an empty array).
  """
  image = np.asarray(image)
  n = image.ndim if spatial_dims is None else spatial_dims
  _spatial_ndim(image, n, "nonzero_bbox")
  if margin < 0:
    raise ValueError(f"nonzero_bbox: margin must be >= 0, got {margin}.")
  mask = image != 0
  if image.ndim > n:
    mask = mask.any(axis=-1)
  bbox = []
  for axis in range(n):
    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(n) if a != axis)))
    if hit.size == 0:
      return tuple((0, s) for s in mask.shape)
    bbox.append((max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
  return tuple(bbox)


def crop_to_nonzero(image: np.ndarray, label: Optional[np.ndarray] = None, margin: int = 0):
  """Crops `image` (*spatial[, C]) and optionally `label` (*spatial) to the image's nonzero bounding box.

  Without a label the image is taken to have no channel axis. Returns (image, bbox), or
  (image, label, bbox) with a label; `uncrop(x, bbox, full_shape)` puts a cropped array back.
  """
  image = np.asarray(image)
  n = image.ndim if label is None else np.ndim(label)
  if label is not None and image.shape[:n] != np.shape(label):
    raise ValueError(f"crop_to_nonzero: image spatial shape {image.shape[:n]} != label shape {np.shape(label)}.")
  bbox = nonzero_bbox(image, n, margin)
  slices = tuple(slice(a, b) for a, b in bbox)
  if label is None:
    return image[slices], bbox
  return image[slices], np.asarray(label)[slices], bbox


def uncrop(array: np.ndarray, bbox: BBox, full_shape: Sequence[int], fill=0) -> np.ndarray:
  """Places `array` (*cropped_spatial[, C]) at `bbox` inside a new array of spatial shape `full_shape`.

  Voxels outside the box are `fill`; trailing channel axes and the dtype of `array` are kept.
  """
  array = np.asarray(array)
  full_shape = tuple(int(s) for s in full_shape)
  if len(bbox) != len(full_shape) or array.ndim < len(bbox):
    raise ValueError(f"uncrop: bbox {bbox} and full_shape {full_shape} do not fit array of shape {array.shape}.")
  sizes = tuple(b - a for a, b in bbox)
  if array.shape[:len(bbox)] != sizes or any(a < 0 or b > s for (a, b), s in zip(bbox, full_shape)):
    raise ValueError(f"uncrop: array of shape {array.shape} does not fit bbox {bbox} in {full_shape}.")
  out = np.full(full_shape + array.shape[len(bbox):], fill, dtype=array.dtype)
  out[tuple(slice(a, b) for a, b in bbox)] = array
  return out


# ------------------------------------------------------------------------------------------- intensity
def window(image: np.ndarray, preset: Union[str, Tuple[float, float]]) -> np.ndarray:
  """Maps HU to [0, 1] through a display window: a `CT_WINDOWS` name or (center, width) in HU.

  center - width/2 maps to 0, center + width/2 to 1, values outside are clipped. Returns float32.
  """
  if isinstance(preset, str):
    if preset not in CT_WINDOWS:
      raise ValueError(f"window: unknown preset {preset!r}; known: {sorted(CT_WINDOWS)}.")
    center, width = CT_WINDOWS[preset]
  else:
    center, width = (float(v) for v in preset)
  if not width > 0:
    raise ValueError(f"window: width must be > 0, got {width}.")
  lo = center - width / 2.0
  image = np.asarray(image, dtype=np.float64)
  return ((np.clip(image, lo, lo + width) - lo) / width).astype(np.float32)


def ct_normalize(image: np.ndarray, p005: float, p995: float, mean: float, std: float) -> np.ndarray:
  """nnU-Net's CT scheme: clip to the dataset's foreground [0.5, 99.5] percentiles, then z-score with the
  dataset's foreground mean and std (all in HU, from the fingerprint, not from this volume). float32."""
  if not p005 <= p995:
    raise ValueError(f"ct_normalize: p005={p005} must be <= p995={p995}.")
  image = np.asarray(image, dtype=np.float64)
  _check_finite(image, "ct_normalize")
  return ((np.clip(image, p005, p995) - mean) / max(float(std), 1e-8)).astype(np.float32)


def zscore(image: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Per-volume z-score inside `mask` (default: the image's nonzero voxels), zero outside (MRI scheme).

  With `image` (*spatial, C) and `mask` (*spatial) each channel is normalised on its own. An empty mask
  gives all zeros. Returns float32.
  """
  image = np.asarray(image, dtype=np.float64)
  _check_finite(image, "zscore")
  if mask is None:
    mask = image != 0
  mask = np.asarray(mask, dtype=bool)
  out = np.zeros_like(image)
  if mask.shape == image.shape:
    pairs = [(image, mask, out)]
  elif image.ndim == mask.ndim + 1 and image.shape[:-1] == mask.shape:
    pairs = [(image[..., c], mask, out[..., c]) for c in range(image.shape[-1])]  # views into out
  else:
    raise ValueError(f"zscore: mask shape {mask.shape} does not fit image shape {image.shape}.")
  for x, m, o in pairs:
    values = x[m]
    if values.size:
      o[m] = (values - values.mean()) / max(float(values.std()), 1e-8)
  return out.astype(np.float32)


def minmax(image: np.ndarray) -> np.ndarray:
  """Scales `image` linearly to [0, 1] (min -> 0, max -> 1); a constant image gives zeros. float32."""
  image = np.asarray(image, dtype=np.float64)
  _check_finite(image, "minmax")
  lo, hi = image.min(), image.max()
  if hi == lo:
    return np.zeros(image.shape, np.float32)
  return ((image - lo) / (hi - lo)).astype(np.float32)


def _as_2d(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f"{what}: expected a 2D image (y, x) or (y, x, 1), got shape {image.shape}.")
  return image


def _bin_indices(image: np.ndarray, bins: int) -> np.ndarray:
  """Quantises a 2D image's range [min, max] into `bins` equal bins, as int indices."""
  return np.minimum((minmax(image).astype(np.float64) * bins).astype(np.int64), bins - 1)


def histogram_equalize(image_2d: np.ndarray, bins: int = 256) -> np.ndarray:
  """Global histogram equalisation of a 2D image to [0, 1] (float32, shape of the input).

  Each intensity bin maps to its normalised cumulative count, shifted so the lowest occupied bin maps to 0
  and the highest to 1; the mapping is monotone non-decreasing. A constant image gives zeros.
  """
  shape = np.shape(image_2d)
  image = _as_2d(image_2d, "histogram_equalize")
  idx = _bin_indices(image, bins)
  cdf = np.cumsum(np.bincount(idx.ravel(), minlength=bins)).astype(np.float64)
  first = cdf[idx.min()]
  if cdf[-1] == first:
    return np.zeros(shape, np.float32)
  return ((cdf[idx] - first) / (cdf[-1] - first)).astype(np.float32).reshape(shape)


def _tile_edges(size: int, tiles: int, axis_name: str) -> np.ndarray:
  if not 1 <= tiles <= size:
    raise ValueError(f"clahe: {tiles} tiles along {axis_name} do not fit {size} pixels.")
  return np.linspace(0, size, tiles + 1).round().astype(np.int64)


def _interp_weights(size: int, edges: np.ndarray):
  """For each pixel, the two nearest tile centres (i0, i1) and the weight of i1; clamped at the borders."""
  centers = (edges[:-1] + edges[1:] - 1) / 2.0
  f = np.interp(np.arange(size, dtype=np.float64), centers, np.arange(len(centers), dtype=np.float64))
  i0 = np.floor(f).astype(np.int64)
  i1 = np.minimum(i0 + 1, len(centers) - 1)
  return i0, i1, f - i0


def clahe(image_2d: np.ndarray, clip_limit: float = 2.0, tiles: Tuple[int, int] = (8, 8),
          bins: int = 256) -> np.ndarray:
  """Contrast-limited adaptive histogram equalisation of a 2D image to [0, 1] (float32).

  The image is split into `tiles` = (rows, cols) near-equal tiles. Each tile's histogram (over the image's
  global [min, max] in `bins` bins) is clipped at `clip_limit` times the mean bin count, the clipped excess
  is spread evenly over all bins (one pass, so a bin may end slightly above the limit), and its cumulative
  sum becomes the tile's mapping to [0, 1]. Each pixel blends the mappings of the four nearest tile centres
  bilinearly, so there are no seams at tile borders. clip_limit -> 1 approaches a plain rescale (uniform
  histograms); a large clip_limit approaches per-tile histogram equalisation.
  """
  shape = np.shape(image_2d)
  image = _as_2d(image_2d, "clahe")
  if not clip_limit > 0:
    raise ValueError(f"clahe: clip_limit must be > 0, got {clip_limit}.")
  ty, tx = (int(t) for t in tiles)
  ey, ex = _tile_edges(image.shape[0], ty, "y"), _tile_edges(image.shape[1], tx, "x")
  idx = _bin_indices(image, bins)
  maps = np.empty((ty, tx, bins), np.float64)
  for i in range(ty):
    for j in range(tx):
      tile = idx[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
      hist = np.bincount(tile.ravel(), minlength=bins).astype(np.float64)
      limit = max(clip_limit * tile.size / bins, 1.0)
      excess = np.maximum(hist - limit, 0.0).sum()
      hist = np.minimum(hist, limit) + excess / bins
      maps[i, j] = np.cumsum(hist) / tile.size
  y0, y1, wy = _interp_weights(image.shape[0], ey)
  x0, x1, wx = _interp_weights(image.shape[1], ex)
  y0, y1, wy = y0[:, None], y1[:, None], wy[:, None]
  out = ((1 - wy) * ((1 - wx) * maps[y0, x0, idx] + wx * maps[y0, x1, idx])
         + wy * ((1 - wx) * maps[y1, x0, idx] + wx * maps[y1, x1, idx]))
  return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------------ cache
def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON-serialisable: {type(value).__name__} {value!r}")


def preprocess_config_hash(config: Mapping) -> str:
  """sha256 hex digest of the config as canonical JSON (sorted keys; tuples and lists hash alike)."""
  try:
    text = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=_json_default)
  except (TypeError, ValueError) as e:
    raise ValueError(f"preprocess_config_hash: config must be JSON-serialisable: {e}") from None
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_path(config: Mapping, case_id: str, cache_dir) -> str:
  """The .npz file `cached` uses for (config, case_id): a readable case prefix plus the sha256 key."""
  key = preprocess_config_hash({"config": dict(config), "case_id": str(case_id)})
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(case_id))[:64]
  return os.path.join(os.fspath(cache_dir), f"{safe}_{key}.npz")


def _load(path: str) -> Optional[Dict[str, np.ndarray]]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception:  # Missing, or corrupt/truncated (e.g. a full disk, another writer's rename): recompute.
    return None


def cached(fn_config: Mapping, case_id: str, compute: Callable[[], Mapping[str, np.ndarray]],
           cache_dir) -> Dict[str, np.ndarray]:
  """Returns compute() for this case, reusing a disk copy made under the same config and case id.

  Args:
    fn_config: the JSON-serialisable preprocessing config; any change gives a different key.
    case_id: the case's identifier (part of the key and of the file name).
    compute: returns a dict of name -> array (no object arrays); called only on a cache miss.
    cache_dir: folder for the .npz files; created if missing.

  Files are written to a temporary name and renamed, so a crash never leaves a half-written entry, and an
  unreadable entry is recomputed.
  """
  path = cache_path(fn_config, case_id, cache_dir)
  hit = _load(path)
  if hit is not None:
    return hit
  result = compute()
  if not isinstance(result, Mapping):
    raise ValueError(f"cached: compute() for case {case_id!r} must return a dict of arrays, "
                     f"got {type(result).__name__}.")
  arrays = {}
  for name, value in result.items():
    value = np.asarray(value)
    if not isinstance(name, str) or value.dtype == object:
      raise ValueError(f"cached: case {case_id!r}: entry {name!r} must be a str key with a numeric array, "
                       f"got dtype {value.dtype}.")
    arrays[name] = value
  os.makedirs(os.fspath(cache_dir), exist_ok=True)
  atomic.write_atomically(path, lambda tmp: np.savez(tmp, **arrays))
  return arrays


# ------------------------------------------------------------------------------- distance maps
def signed_distance_maps(label: np.ndarray, num_classes: int, spacing_mm: Sequence[float]) -> np.ndarray:
  """Per-class signed Euclidean distance maps of one label map, in mm (host, numpy / scipy).

  Args:
    label: (*spatial) integer label map of one case (2D or 3D).
    num_classes: K; channel k is the SDM of `label == k`.
    spacing_mm: voxel size per spatial axis, in the spatial order; anisotropic spacing is honoured
      through `scipy.ndimage.distance_transform_edt(..., sampling=spacing_mm)`.
  Returns:
    (*spatial, K) float32: at a voxel outside class k, the distance (mm) to the nearest voxel of k
    (positive); inside k, minus the distance to the nearest voxel not in k (negative; -spacing on the
    object's rim). A class absent from the case, or covering the whole case (no boundary), gives 0.
  """
  label = np.asarray(label)
  spacing = tuple(float(s) for s in spacing_mm)
  if len(spacing) != label.ndim:
    raise ValueError(f"signed_distance_maps: spacing_mm {tuple(spacing_mm)} has {len(spacing)} entries for a "
                     f"{label.ndim}D label map of shape {label.shape}.")
  maps = np.zeros(label.shape + (num_classes,), np.float32)
  for k in range(num_classes):
    inside = label == k
    if not inside.any() or inside.all():
      continue
    # distance_transform_edt measures, at each nonzero voxel, the distance to the nearest zero voxel.
    outside_distance = ndi.distance_transform_edt(~inside, sampling=spacing)
    inside_distance = ndi.distance_transform_edt(inside, sampling=spacing)
    maps[..., k] = np.where(inside, -inside_distance, outside_distance)
  return maps
