"""Dataset fingerprint and experiment planning (target spacing, patch size, U-Net topology), nnU-Net style.

`fingerprint(cases)` summarises a training set: per-case spacings and shapes, their medians, foreground
intensity statistics per channel (the 0.5/99.5 percentiles, mean and std that `preprocess.ct_normalize`
takes) and class voxel frequencies. `plan(fp)` turns a fingerprint into the settings a segmentation run
needs: the spacing to resample to, the patch size, and per-stage `features` / `kernel_size` / `strides`
that can be passed straight to `medjax.models.UNet`.

Planning rules:
  * Target spacing: the median spacing, except for thick-slice data (3D, max/min of the median spacing > 3,
    one strictly thickest axis; `preprocess.thick_axis`), where the thick axis gets the 10th percentile of
    that axis's spacings: a few finely sliced cases then keep their detail instead of being thrown away,
    while the bulk of the data is only mildly upsampled along the slices. It is never made finer than the
    coarsest in-plane spacing, so the thick axis stays the thickest.
  * Topology: at each stage the axes whose current spacing is <= 2x the smallest current spacing and whose
    current size is >= 2 * min_feature_size are halved (stride 2); a kernel of 3 is used on axes within 2x
    of the smallest spacing and 1 on much coarser axes (a 3-wide kernel across 5 mm slices mostly mixes
    unrelated anatomy). Halving doubles an axis's spacing, so thick axes join in once the in-plane axes
    have caught up. It stops when no axis can be halved or after `max_stages` levels.
  * Patch size: starts at the median shape after resampling (capped by `max_patch`); each axis is rounded
    up to a multiple of the network's total stride; while the patch exceeds the voxel budget (or
    `max_patch`), the axis that is largest relative to the median shape is shrunk by its total stride and
    the topology is recomputed.

numpy only (no jax). Fingerprints and plans are JSON files, written atomically.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from medjax import atomic
from medjax.data import preprocess

# Foreground voxels kept per case and channel for the intensity statistics: evenly spaced, so the result is
# deterministic, and bounded, so a large dataset does not need all its voxels in memory at once.
MAX_SAMPLES_PER_CASE = 100_000
DEFAULT_BUDGET_VOXELS = {2: 512 * 512, 3: 128 * 128 * 128}


# -------------------------------------------------------------------------------------------- fingerprint
def _case_arrays(index: int, case) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
  try:
    image, label, spacing = case
  except (TypeError, ValueError):
    raise ValueError(f"case {index}: expected (image, label or None, spacing_mm), got {type(case).__name__}.") from None
  image = np.asarray(image)
  spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
  nd = spacing.size
  if nd not in (2, 3) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"case {index}: spacing_mm={tuple(spacing)} must be 2 or 3 positive finite values (mm).")
  if image.ndim not in (nd, nd + 1):
    raise ValueError(f"case {index}: image of shape {image.shape} does not match spacing_mm with {nd} axes.")
  if label is not None:
    label = np.asarray(label)
    if label.shape != image.shape[:nd]:
      raise ValueError(f"case {index}: label shape {label.shape} != image spatial shape {image.shape[:nd]}.")
  return image, label, spacing


def _evenly(values: np.ndarray, limit: int) -> np.ndarray:
  if values.size <= limit:
    return values
  return values[np.linspace(0, values.size - 1, limit).round().astype(np.int64)]


def fingerprint(cases: Iterable, *, max_samples_per_case: int = MAX_SAMPLES_PER_CASE) -> Dict[str, Any]:
  """Summarises a training set for `plan` and for CT intensity normalisation.

  Args:
    cases: iterable of `(image, label, spacing_mm)`: image `(*spatial)` or `(*spatial, C)`, label
      `(*spatial)` integer map or None, spacing_mm one value per spatial axis (mm), same axis order.
    max_samples_per_case: foreground voxels kept per case and channel (evenly spaced) for the statistics.

  Returns a JSON-ready dict: num_cases, spatial_dims, num_channels, spacings (per case, mm), shapes (per
  case), median_spacing_mm, median_shape, intensity (one dict per channel: p005, p995, mean, std, min, max,
  num_samples over foreground voxels, label > 0; all voxels of a case without a label), class_voxels and
  class_frequencies (label value as a string -> voxel count / fraction of labelled voxels).
  """
  spacings: List[List[float]] = []
  shapes: List[List[int]] = []
  samples: Optional[List[List[np.ndarray]]] = None
  class_voxels: Dict[int, int] = {}
  nd = channels = None
  for i, case in enumerate(cases):
    image, label, spacing = _case_arrays(i, case)
    c = image.shape[-1] if image.ndim == spacing.size + 1 else 1
    if nd is None:
      nd, channels = spacing.size, c
      samples = [[] for _ in range(c)]
    elif (spacing.size, c) != (nd, channels):
      raise ValueError(f"case {i}: {spacing.size} spatial axes and {c} channels, but case 0 has {nd} and "
                       f"{channels}.")
    spacings.append([float(s) for s in spacing])
    shapes.append([int(n) for n in image.shape[:nd]])
    data = image.reshape(image.shape[:nd] + (c,)).astype(np.float64)
    if not np.all(np.isfinite(data)):
      raise ValueError(f"case {i}: image has NaN/inf voxels.")
    voxels = data[label > 0] if label is not None else data.reshape(-1, c)
    for ch in range(c):
      samples[ch].append(_evenly(voxels[:, ch], max_samples_per_case))
    if label is not None:
      values, counts = np.unique(label, return_counts=True)
      for v, n in zip(values.tolist(), counts.tolist()):
        class_voxels[int(v)] = class_voxels.get(int(v), 0) + int(n)
  if nd is None:
    raise ValueError("fingerprint: no cases.")
  intensity = []
  for ch in range(channels):
    v = np.concatenate(samples[ch])
    if v.size == 0:
      raise ValueError(f"fingerprint: channel {ch} has no foreground voxels (label > 0) in any case.")
    p005, p995 = np.percentile(v, [0.5, 99.5])
    intensity.append({"p005": float(p005), "p995": float(p995), "mean": float(v.mean()),
                      "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
                      "num_samples": int(v.size)})
  total = sum(class_voxels.values())
  return {
    "num_cases": len(spacings),
    "spatial_dims": int(nd),
    "num_channels": int(channels),
    "spacings": spacings,
    "shapes": shapes,
    "median_spacing_mm": [float(s) for s in np.median(np.asarray(spacings), axis=0)],
    "median_shape": [float(s) for s in np.median(np.asarray(shapes, dtype=np.float64), axis=0)],
    "intensity": intensity,
    "class_voxels": {str(k): n for k, n in sorted(class_voxels.items())},
    "class_frequencies": {str(k): n / total for k, n in sorted(class_voxels.items())},
  }


def _write_json(path, obj) -> str:
  return atomic.write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path, what: str) -> dict:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  with open(path, encoding="utf-8") as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}.")
  return obj


def write_fingerprint(path, fp: Dict[str, Any]) -> str:
  """Writes a fingerprint as JSON (atomically). Returns the path."""
  return _write_json(path, fp)


def read_fingerprint(path) -> Dict[str, Any]:
  """Reads a fingerprint written by `write_fingerprint`."""
  fp = _read_json(path, "fingerprint")
  missing = [k for k in ("spacings", "shapes", "median_spacing_mm", "spatial_dims") if k not in fp]
  if missing:
    raise ValueError(f"{os.fspath(path)}: fingerprint lacks keys {missing}.")
  return fp


# ------------------------------------------------------------------------------------------------- plan
def target_spacing(spacings, threshold: float = preprocess.ANISOTROPY_THRESHOLD) -> Tuple[float, ...]:
  """Median spacing (mm), with the thick axis of anisotropic data at its 10th percentile (module doc)."""
  s = np.asarray(spacings, dtype=np.float64)
  target = np.median(s, axis=0)
  axis = preprocess.thick_axis(target, threshold=threshold)
  if axis is not None:
    others = np.delete(target, axis)
    target[axis] = max(float(np.percentile(s[:, axis], 10)), float(others.max()))
  return tuple(float(t) for t in target)


def topology(patch_size: Sequence[int], spacing_mm, *, min_feature_size: int = 4,
             max_stages: int = 6) -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[Tuple[int, ...], ...]]:
  """Per-stage kernel sizes (one per level) and strides (one per transition) for a patch (module doc)."""
  size = [int(n) for n in patch_size]
  spacing = [float(s) for s in spacing_mm]
  kernels: List[Tuple[int, ...]] = []
  strides: List[Tuple[int, ...]] = []
  while True:
    finest = min(spacing)
    fine = [sp <= 2 * finest for sp in spacing]
    kernels.append(tuple(3 if f else 1 for f in fine))
    if len(kernels) >= max_stages:
      break
    halve = [f and n >= 2 * min_feature_size for f, n in zip(fine, size)]
    if not any(halve):
      break
    strides.append(tuple(2 if h else 1 for h in halve))
    size = [n // 2 if h else n for n, h in zip(size, halve)]
    spacing = [sp * 2 if h else sp for sp, h in zip(spacing, halve)]
  return tuple(kernels), tuple(strides)


def _total(strides, nd: int) -> List[int]:
  total = [1] * nd
  for s in strides:
    total = [t * k for t, k in zip(total, s)]
  return total


def plan(fp: Dict[str, Any], *, memory_budget_voxels: Optional[int] = None,
         max_patch: Union[int, Sequence[int], None] = None, min_feature_size: int = 4,
         base_features: int = 32, max_features: int = 320, batch_size: int = 2,
         max_stages: int = 6) -> Dict[str, Any]:
  """Plans target spacing, patch size and U-Net topology from a fingerprint (rules in the module doc).

  Args:
    fp: a `fingerprint` dict (spacings, shapes, spatial_dims).
    memory_budget_voxels: most voxels in one patch (default 128^3 in 3D, 512^2 in 2D).
    max_patch: optional cap on the patch size, an int for every axis or one per axis.
    min_feature_size: an axis is only halved while its size is >= 2x this, so the bottleneck keeps at
      least this many voxels along every downsampled axis.
    base_features / max_features: width of the first level, doubled per level and capped.
    batch_size: copied into the plan.
    max_stages: most U-Net levels.

  Returns a JSON-ready dict with target_spacing_mm, patch_size, batch_size, features, kernel_size (per
  level), strides (per transition), plus median_resampled_shape, thick_axis and memory_budget_voxels.
  `UNet(features=p["features"], kernel_size=p["kernel_size"], strides=p["strides"])` builds the network.
  """
  try:
    spacings = np.asarray(fp["spacings"], dtype=np.float64)
    shapes = np.asarray(fp["shapes"], dtype=np.int64)
  except KeyError as e:
    raise ValueError(f"plan: fingerprint lacks key {e}.") from None
  if spacings.ndim != 2 or spacings.shape != shapes.shape or len(spacings) == 0:
    raise ValueError(f"plan: fingerprint spacings {spacings.shape} and shapes {shapes.shape} must be "
                     "(num_cases, spatial_dims), non-empty.")
  nd = spacings.shape[1]
  budget = DEFAULT_BUDGET_VOXELS.get(nd, 128**3) if memory_budget_voxels is None else int(memory_budget_voxels)
  if budget < 1:
    raise ValueError(f"plan: memory_budget_voxels={memory_budget_voxels} must be positive.")
  if min_feature_size < 1 or base_features < 1 or max_features < base_features or batch_size < 1:
    raise ValueError(f"plan: bad settings min_feature_size={min_feature_size}, base_features={base_features}, "
                     f"max_features={max_features}, batch_size={batch_size}.")
  cap = [sys.maxsize] * nd if max_patch is None else (
    [int(max_patch)] * nd if np.isscalar(max_patch) else [int(m) for m in max_patch])
  if len(cap) != nd or min(cap) < 1:
    raise ValueError(f"plan: max_patch={max_patch} must be a positive int or {nd} positive ints.")

  target = target_spacing(spacings)
  resampled = [preprocess.resampled_shape(shape, sp, target) for shape, sp in zip(shapes, spacings)]
  median = [max(1, int(round(m))) for m in np.median(np.asarray(resampled, dtype=np.float64), axis=0)]

  patch = [min(m, c) for m, c in zip(median, cap)]
  while True:
    kernels, strides = topology(patch, target, min_feature_size=min_feature_size, max_stages=max_stages)
    total = _total(strides, nd)
    rounded = [int(math.ceil(p / t)) * t for p, t in zip(patch, total)]
    over_cap = [a for a in range(nd) if rounded[a] > cap[a]]
    if not over_cap and math.prod(rounded) <= budget:
      break
    shrinkable = [a for a in range(nd) if patch[a] > 1]
    if not shrinkable:
      raise ValueError(f"plan: no patch fits memory_budget_voxels={budget} and max_patch={max_patch}.")
    # Shrink where the patch is largest relative to the data, so the patch keeps the data's proportions.
    pool = [a for a in over_cap if a in shrinkable] or shrinkable
    axis = max(pool, key=lambda a: (rounded[a] / median[a], rounded[a]))
    smaller = min(patch[axis], rounded[axis] - total[axis])
    patch[axis] = smaller if 1 <= smaller < patch[axis] else patch[axis] - 1
  if not strides:
    raise ValueError(f"plan: patch {tuple(rounded)} (median resampled shape {tuple(median)}) is too small "
                     f"for any downsampling with min_feature_size={min_feature_size}; a U-Net needs >= 2 levels.")
  features = [min(base_features * 2**i, max_features) for i in range(len(kernels))]
  return {
    "spatial_dims": nd,
    "target_spacing_mm": list(target),
    "thick_axis": preprocess.thick_axis(target),
    "median_resampled_shape": median,
    "patch_size": rounded,
    "batch_size": int(batch_size),
    "memory_budget_voxels": budget,
    "features": features,
    "kernel_size": [list(k) for k in kernels],
    "strides": [list(s) for s in strides],
  }


def write_plan(path, p: Dict[str, Any]) -> str:
  """Writes a plan as JSON (atomically). Returns the path."""
  return _write_json(path, p)


def read_plan(path) -> Dict[str, Any]:
  """Reads a plan written by `write_plan`; kernel_size / strides come back as tuples of tuples."""
  p = _read_json(path, "plan")
  missing = [k for k in ("target_spacing_mm", "patch_size", "features", "kernel_size", "strides") if k not in p]
  if missing:
    raise ValueError(f"{os.fspath(path)}: plan lacks keys {missing}.")
  p["kernel_size"] = tuple(tuple(int(v) for v in k) for k in p["kernel_size"])
  p["strides"] = tuple(tuple(int(v) for v in s) for s in p["strides"])
  return p
