"""Shared machinery of the 3D volume datasets ("msd", "image_folder"): per-case preprocessing, disk cache,
intensity normalisation, patient-level train/val splits and the `VolumeSource`.

Sources return WHOLE preprocessed cases, whose spatial shape varies from case to case:
  "image"       float32 (*spatial, C), spatial (z, y, x) in RAS+ canonical voxel order (or (y, x) in 2D)
  "label"       int32 (*spatial) label map (segmentation) or int32 scalar (classification); absent in
                splits without labels (the MSD "test" split)
  "spacing_mm"  float32 (spatial_dims,), the voxel size after resampling
  "id"          int64, the case's index in the dataset's sorted case list (test-only cases: 2 * 10**9 + j);
                the same case keeps its id in every fold, so out-of-fold predictions can be joined by id.
`DatasetInfo.image_shape` is the configured `patch_size` (a plan's by default): the training pipeline crops
patches of that size from each case and pads a smaller case. Case names and geometry (for writing a
prediction back onto the original grid) come from `source.case_name(i)` / `source.geometry(i)`.

Per case, deterministically (`preprocess_case`): read the image files (`io.read_image`: NIfTI, NRRD,
MetaImage); check the image's channels against the dataset's and that the label map is 3D; check that image
and label share spatial shape and affine; reorient both to RAS+ (`io.to_canonical`, flips and axis swaps
only); check for NaN/inf voxels and label values outside the declared classes; optionally crop to the
image's nonzero bounding box; resample to `target_spacing_mm` (image spline order `image_order`, label
nearest). The result is cached as .npz by `preprocess.cached`, keyed by the preprocessing settings and the
size and mtime of every file an image is read from (`io.image_files`: a .mhd / .nhdr header and its data).
Normalisation (cheap) runs on every read, per channel:
  "ct"      clip to the training foreground's 0.5 / 99.5 percentiles, z-score with its mean / std (nnU-Net:
            Isensee et al., Nature Methods 18, 203-211, 2021). The statistics come from `intensity_stats`
            (a fingerprint.json path or a list of per-channel dicts) or are computed once from the training
            split's preprocessed cases (`plan.fingerprint`, foreground = label > 0) and cached as JSON.
  "zscore"  per-case z-score inside the channel's nonzero voxels (MRI).
  "none"    raw values.
  a `preprocess.CT_WINDOWS` name ("abdomen", "lung", ...): HU display window mapped to [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax import atomic
from medjax.data import io, plan as plan_lib, preprocess, splits as splits_lib
from medjax.data.datasets.base import ID_STRIDE, SPLIT_CODES, check_index

SCHEMES = ("ct", "zscore", "none") + tuple(preprocess.CT_WINDOWS)
CACHE_VERSION = 1  # bump when preprocess_case changes its output for the same settings
TEST_ID_OFFSET = SPLIT_CODES["test"] * ID_STRIDE


@dataclasses.dataclass(frozen=True)
class Case:
  """One case on disk. `label_path` None: no label map; `class_label` is the classification target."""
  name: str
  image_path: str
  label_path: Optional[str] = None
  class_label: Optional[int] = None
  patient_id: str = ""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides a preprocessed case (and so its cache key), plus the normalisation."""
  where: str                      # "dataset 'msd' (path/dataset.json)", for error messages
  spatial_dims: int
  num_channels: int
  num_classes: int                # segmentation: labels must lie in [0, num_classes)
  segmentation: bool
  target_spacing_mm: Optional[Tuple[float, ...]]
  crop_nonzero: bool
  image_order: int
  schemes: Tuple[str, ...]        # one normalisation per channel

  def cache_config(self) -> Dict[str, Any]:
    return {"version": CACHE_VERSION, "spatial_dims": self.spatial_dims, "num_channels": self.num_channels,
            "num_classes": self.num_classes, "segmentation": self.segmentation,
            "target_spacing_mm": self.target_spacing_mm, "crop_nonzero": self.crop_nonzero,
            "image_order": self.image_order}


# ---------------------------------------------------------------------------------------------- settings
def resolve_schemes(normalization, default: Sequence[str], num_channels: int, where: str) -> Tuple[str, ...]:
  """One scheme per channel from a str (all channels), a sequence (per channel) or None (`default`)."""
  if normalization is None:
    schemes = tuple(default)
  elif isinstance(normalization, str):
    schemes = (normalization,) * num_channels
  else:
    schemes = tuple(normalization)
  schemes = tuple(s.lower() if isinstance(s, str) else s for s in schemes)
  if len(schemes) != num_channels or any(s not in SCHEMES for s in schemes):
    raise ValueError(f"{where}: normalization must be one of {SCHEMES} or one per channel ({num_channels}), "
                     f"got {normalization!r}.")
  return schemes


def resolve_geometry(patch_size, target_spacing_mm, plan_path, spatial_dims: int,
                     where: str) -> Tuple[Tuple[int, ...], Optional[Tuple[float, ...]]]:
  """(patch_size, target_spacing_mm) from the kwargs, falling back to a plan.json (`plan.write_plan`)."""
  if plan_path is not None:
    p = plan_lib.read_plan(plan_path)
    patch_size = p["patch_size"] if patch_size is None else patch_size
    target_spacing_mm = p["target_spacing_mm"] if target_spacing_mm is None else target_spacing_mm
  if patch_size is None:
    raise ValueError(f"{where}: set patch_size (the training patch, {spatial_dims} ints) or plan_path (a "
                     "plan.json from `python -m medjax.tools.plan`); cases have varying shapes.")
  patch = tuple(int(n) for n in np.atleast_1d(patch_size))
  if len(patch) != spatial_dims or min(patch) < 1:
    raise ValueError(f"{where}: patch_size {patch_size} must be {spatial_dims} positive ints (z, y, x).")
  if target_spacing_mm is not None:
    t = tuple(float(s) for s in np.atleast_1d(target_spacing_mm))
    if len(t) != spatial_dims or not all(np.isfinite(s) and s > 0 for s in t):
      raise ValueError(f"{where}: target_spacing_mm {target_spacing_mm} must be {spatial_dims} positive mm.")
    target_spacing_mm = t
  return patch, target_spacing_mm


# ------------------------------------------------------------------------------------------- per case
def _file_stamp(path: str) -> List[Any]:
  st = os.stat(path)
  return [os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)]


def _image_stamps(path: str) -> List[List[Any]]:
  """One stamp per file the image is read from; a NIfTI file gives one stamp, as before multi-file formats."""
  try:
    files = io.image_files(path)
  except OSError as e:  # an unreadable header: preprocess_case will name the file
    raise ValueError(f"cannot read {path}: {e}") from None
  return [_file_stamp(f) if os.path.exists(f) else [os.path.abspath(f), -1, -1] for f in files]


def _to_spatial_dims(array: np.ndarray, spacing, spatial_dims: int, name: str):
  """Drops the singleton z (or other) axis of a one-slice volume when 2D is asked for."""
  if spatial_dims == 3:
    return array, tuple(spacing)
  flat = [a for a in range(3) if array.shape[a] == 1]
  if not flat:
    raise ValueError(f"case {name}: spatial_dims=2 needs a one-slice volume, got spatial shape "
                     f"{array.shape[:3]}.")
  axis = flat[0]
  return np.take(array, 0, axis=axis), tuple(s for a, s in enumerate(spacing) if a != axis)


def _integer_labels(array: np.ndarray, name: str, path: str) -> np.ndarray:
  if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
    return array.astype(np.int32)
  io.check_finite(array, f"case {name}: label {path}")
  rounded = np.rint(array)
  if not np.array_equal(rounded, array):
    bad = np.unique(array[rounded != array])[:5].tolist()
    raise ValueError(f"case {name}: label {path} holds non-integer values {bad}.")
  return rounded.astype(np.int32)


def _read(path: str, name: str) -> io.Volume:
  """Any format `io.read_image` reads, channels allowed (checked by the caller, whose message names the
  dataset's num_channels); reader errors are prefixed with the case."""
  try:
    return io.read_image(path, allow_channels=True)
  except ValueError as e:
    raise ValueError(f"case {name}: {e}") from None


def preprocess_case(case: Case, settings: Settings) -> Dict[str, np.ndarray]:
  """Reads and preprocesses one case (module doc) before normalisation.

  Returns image float32 (*spatial, C), label int32 (*spatial) when the case has a label map, spacing_mm
  float64 (nd,), canonical_affine (4, 4) float64 (RAS+ grid before cropping), bbox int64 (nd, 2) of the crop
  in that grid, cropped_shape int64 (nd,) before resampling. Raises ValueError naming the case.
  """
  name = case.name
  image = _read(case.image_path, name)
  channels = image.num_channels or 1
  if channels != settings.num_channels:
    hint = " (a 4D image where 3D single-channel images are expected)" if settings.num_channels == 1 else ""
    raise ValueError(f"case {name}: image {case.image_path} has shape {image.array.shape} (z, y, x[, C]): "
                     f"{channels} channel(s), but {settings.where} declares num_channels={settings.num_channels}"
                     f"{hint}.")
  label = None
  if case.label_path is not None:
    label = _read(case.label_path, name)
    if label.num_channels == 1:
      label = label.replace(array=label.array[..., 0])
    if label.num_channels is not None:
      raise ValueError(f"case {name}: label {case.label_path} has shape {label.array.shape} (z, y, x, C); a label "
                       "map must be 3D (z, y, x).")
    io.check_pair(image, label, name)
  image, _ = io.to_canonical(image)
  io.check_finite(image.array, f"case {name}: image {case.image_path}")
  array = image.array.astype(np.float32, copy=False)
  if array.ndim == 3:
    array = array[..., None]
  spacing = image.spacing_mm
  label_array = None
  if label is not None:
    label, _ = io.to_canonical(label)
    label_array = _integer_labels(label.array, name, case.label_path)
    bad = np.unique(label_array[(label_array < 0) | (label_array >= settings.num_classes)])
    if bad.size:
      raise ValueError(f"case {name}: label {case.label_path} holds values {bad[:10].tolist()} outside the "
                       f"declared classes 0..{settings.num_classes - 1} of {settings.where}.")
    label_array, _ = _to_spatial_dims(label_array, spacing, settings.spatial_dims, name)
  array, spacing = _to_spatial_dims(array, spacing, settings.spatial_dims, name)
  nd = settings.spatial_dims
  bbox = tuple((0, n) for n in array.shape[:nd])
  if settings.crop_nonzero:
    if label_array is None:
      bbox = preprocess.nonzero_bbox(array, nd)
      array = array[tuple(slice(a, b) for a, b in bbox)]
    else:
      array, label_array, bbox = preprocess.crop_to_nonzero(array, label_array)
  cropped_shape = array.shape[:nd]
  if settings.target_spacing_mm is not None:
    array = preprocess.resample(array, spacing, settings.target_spacing_mm, order=settings.image_order)
    if label_array is not None:
      label_array = preprocess.resample_label(label_array, spacing, settings.target_spacing_mm)
    spacing = settings.target_spacing_mm
  out = {"image": np.ascontiguousarray(array, np.float32), "spacing_mm": np.asarray(spacing, np.float64),
         "canonical_affine": image.affine, "bbox": np.asarray(bbox, np.int64).reshape(nd, 2),
         "cropped_shape": np.asarray(cropped_shape, np.int64)}
  if label_array is not None:
    out["label"] = np.ascontiguousarray(label_array, np.int32)
  return out


def load_case(case: Case, settings: Settings, cache_dir: str) -> Dict[str, np.ndarray]:
  """`preprocess_case`, through the disk cache (recomputed when the settings or the files change)."""
  stamps = _image_stamps(case.image_path) + (_image_stamps(case.label_path) if case.label_path else [])
  config = dict(settings.cache_config(), files=stamps)
  return preprocess.cached(config, case.name, lambda: preprocess_case(case, settings), cache_dir)


# ------------------------------------------------------------------------------------------ intensity
def read_intensity_stats(source, num_channels: int, where: str) -> List[Dict[str, float]]:
  """Per-channel CT statistics (p005, p995, mean, std) from a fingerprint.json path or a list of dicts."""
  if isinstance(source, (str, os.PathLike)):
    fp = plan_lib._read_json(source, "fingerprint")
    if "intensity" not in fp:
      raise ValueError(f"{where}: {os.fspath(source)} has no 'intensity' key; pass a fingerprint.json "
                       "written by `python -m medjax.tools.plan`.")
    stats, origin = fp["intensity"], os.fspath(source)
  else:
    stats, origin = list(source), "intensity_stats"
  if len(stats) != num_channels:
    raise ValueError(f"{where}: {origin} has intensity stats for {len(stats)} channel(s), the images have "
                     f"{num_channels}.")
  for ch, s in enumerate(stats):
    missing = [k for k in ("p005", "p995", "mean", "std") if k not in s]
    if missing:
      raise ValueError(f"{where}: {origin} channel {ch} lacks {missing}.")
  return [{k: float(s[k]) for k in ("p005", "p995", "mean", "std")} for s in stats]


def compute_intensity_stats(cases: Sequence[Case], settings: Settings, cache_dir: str) -> List[Dict[str, float]]:
  """Foreground statistics of the preprocessed (unnormalised) `cases`, cached as JSON in `cache_dir`."""
  if not cases:
    raise ValueError(f"{settings.where}: no training cases to compute CT intensity statistics from.")
  key = preprocess.preprocess_config_hash(dict(
      settings.cache_config(), cases=sorted(stamp for c in cases for stamp in _image_stamps(c.image_path))))
  path = os.path.join(cache_dir, f"intensity_{key}.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def items():
    for case in cases:
      c = load_case(case, settings, cache_dir)
      yield c["image"], c.get("label"), c["spacing_mm"]

  stats = [{k: s[k] for k in ("p005", "p995", "mean", "std")} for s in plan_lib.fingerprint(items())["intensity"]]
  os.makedirs(cache_dir, exist_ok=True)
  atomic.write_text_atomically(path, json.dumps(stats))
  return stats


def normalize(image: np.ndarray, schemes: Sequence[str], stats: Optional[Sequence[Mapping]]) -> np.ndarray:
  """Normalises each channel of `image` (*spatial, C) by its scheme (module doc); float32."""
  out = np.empty(image.shape, np.float32)
  for ch, scheme in enumerate(schemes):
    x = image[..., ch]
    if scheme == "ct":
      s = stats[ch]
      out[..., ch] = preprocess.ct_normalize(x, s["p005"], s["p995"], s["mean"], s["std"])
    elif scheme == "zscore":
      out[..., ch] = preprocess.zscore(x)
    elif scheme == "none":
      out[..., ch] = x
    else:
      out[..., ch] = preprocess.window(x, scheme)
  return out


# --------------------------------------------------------------------------------------------- splits
def split_indices(patient_ids: Sequence[str], labels, *, fold, num_folds: int, seed: int,
                  val_fraction: float, where: str) -> Dict[str, np.ndarray]:
  """Patient-level train/val indices: fold `fold` of `num_folds` (stratified by `labels` when given);
  num_folds=1 is a hold-out of `val_fraction` of the patients; fold="all" trains on everything."""
  ids = np.asarray(patient_ids)
  if fold == "all":
    out = {"train": np.arange(len(ids)), "val": np.zeros((0,), np.int64)}
  elif isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 1:
    raise ValueError(f"{where}: num_folds must be an int >= 1, got {num_folds!r}.")
  elif num_folds == 1:
    if not 0 < val_fraction < 1:
      raise ValueError(f"{where}: val_fraction must be in (0, 1), got {val_fraction!r}.")
    out = splits_lib.holdout_split(ids, labels, {"train": 1 - val_fraction, "val": val_fraction}, seed=seed)
  else:
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
      raise ValueError(f"{where}: fold must be in [0, {num_folds}) or 'all', got {fold!r}.")
    folds = splits_lib.assign_folds(ids, labels, k=int(num_folds), seed=seed)
    out = {"train": np.flatnonzero(folds != fold), "val": np.flatnonzero(folds == fold)}
  splits_lib.check_no_leakage(out, ids)
  return out


# --------------------------------------------------------------------------------------------- source
class VolumeSource:
  """Random access to one split's cases (module doc for the examples). Picklable (no loaded data)."""

  def __init__(self, split: str, cases: Sequence[Case], ids: Sequence[int], settings: Settings,
               stats: Optional[Sequence[Mapping]], cache_dir: str):
    self.split = split
    self.cases = tuple(cases)
    self.ids = np.asarray(ids, np.int64)
    self.settings = settings
    self.stats = stats
    self.cache_dir = cache_dir
    if len(self.ids) != len(self.cases):
      raise ValueError(f"VolumeSource: {len(self.ids)} ids for {len(self.cases)} cases.")

  def __len__(self) -> int:
    return len(self.cases)

  def patient_ids(self) -> np.ndarray:
    """(N,) str patient id of every example, in index order (for `splits` / `folds`)."""
    return np.asarray([c.patient_id for c in self.cases], dtype=str)

  def labels(self) -> np.ndarray:
    """(N,) int32 class labels (classification sources only; read from the CSV, no image is loaded)."""
    if self.settings.segmentation:
      raise ValueError(f"VolumeSource({self.split!r}).labels(): segmentation cases have label maps, not classes.")
    return np.asarray([c.class_label for c in self.cases], np.int32)

  def case_name(self, index: int) -> str:
    return self.cases[check_index(index, len(self), self.split)].name

  def geometry(self, index: int) -> Dict[str, np.ndarray]:
    """canonical_affine, bbox, cropped_shape of case `index` (see `preprocess_case`)."""
    c = load_case(self.cases[check_index(index, len(self), self.split)], self.settings, self.cache_dir)
    return {k: c[k] for k in ("canonical_affine", "bbox", "cropped_shape")}

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    i = check_index(index, len(self), self.split)
    case = self.cases[i]
    c = load_case(case, self.settings, self.cache_dir)
    example = {"image": normalize(c["image"], self.settings.schemes, self.stats),
               "spacing_mm": np.asarray(c["spacing_mm"], np.float32), "id": np.asarray(self.ids[i], np.int64)}
    if self.settings.segmentation and "label" in c:
      example["label"] = c["label"]
    elif case.class_label is not None:
      example["label"] = np.asarray(case.class_label, np.int32)
    return example

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"VolumeSource(split={self.split!r}, n={len(self)}, cache_dir={self.cache_dir!r})"


def check_files(cases: Sequence[Case], where: str, layout: str) -> None:
  """Raises FileNotFoundError naming the first missing image / label file (or the missing data file of a
  .nhdr / .mhd header) and the expected layout."""
  for case in cases:
    for path in (case.image_path, case.label_path):
      if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: case {case.name}: file not found: {path}. Expected layout: {layout}")
      if path is not None and io.image_suffix(path) in io.itk.DETACHED_SUFFIXES:
        missing = [f for f in io.image_files(path)[1:] if not os.path.isfile(f)]
        if missing:
          raise FileNotFoundError(f"{where}: case {case.name}: {path} names the data file {missing[0]}, which is "
                                  "not there.")
