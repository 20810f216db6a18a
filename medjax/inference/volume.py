"""Whole-case prediction: an image file in (NIfTI, NRRD, MetaImage: `io.read_image`), a label map out on exactly the
input's grid, in the format its path names (`io.write_image`).

`Predictor.predict_volume` runs, for one 3D case:

  1. reorient to RAS+ (`io.to_canonical`: voxel order only, no resampling);
  2. crop to the bounding box of nonzero voxels in any channel (`preprocess.nonzero_bbox`), if enabled;
  3. resample to `target_spacing_mm` (`preprocess.resample`, spline order `image_order`, the thick-axis
     rule included), if given;
  4. normalise each channel ("zscore", "ct" with the training set's HU statistics, "none", or a CT window);
  5. sliding-window prediction of class probabilities (flip TTA / ensembles come in through `predict_fn`);
  6. back to the cropped grid: with `label_resample="linear"` the K probability maps are resized linearly
     (nearest along a thick axis, the rule of step 3) and then argmax-ed, which gives smoother boundaries,
     as nnU-Net exports segmentations; with "nearest" the argmax on the resampled grid is resized with
     nearest neighbour (cheaper: one map instead of K);
  7. optional largest-connected-component filtering, then uncrop (background 0 outside the box) and undo
     the reorientation, so the written map has the input's shape and affine bit for bit (and, for NIfTI,
     its sform/qform codes: `Volume.xform_codes` travels through `to_canonical`'s undo).

An input whose channels differ from the model's (a 4D image given to a single-channel model) is refused
with the file and its shape (`Predictor(num_channels=...)`), before any network call.

Steps 1-4 are those of medjax's volume datasets (`medjax.data.datasets.volumes`: canonical, crop,
resample, then normalise on read) and must match what the model was trained on. They are given as a
`PreprocessSpec`, whose field names are the datasets' keyword arguments, so `config.data` fills it
(`PreprocessSpec.from_data_config`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.ndimage as ndi

from medjax.data import io, plan as plan_lib, preprocess
from medjax.data.datasets import volumes
from medjax.inference.combine import flip_tta
from medjax.inference.sliding_window import sliding_window_inference

SCHEMES = ("ct", "zscore", "none") + tuple(preprocess.CT_WINDOWS)
LABEL_RESAMPLING = ("linear", "nearest")
_CT_KEYS = ("p005", "p995", "mean", "std")


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """How the training cases were preprocessed; the field names are those of the volume datasets' kwargs.

  Attributes:
    target_spacing_mm: (z, y, x) mm to resample to; None keeps the (reoriented) input grid.
    crop_nonzero: crop to the nonzero bounding box (any channel) before resampling.
    normalization: per channel, after resampling: "zscore" (the channel's nonzero voxels), "ct" (clip to
      the training foreground's 0.5/99.5 percentiles, z-score with its mean/std), "none", or a
      `preprocess.CT_WINDOWS` name; one str for every channel or one per channel.
    intensity_stats: for "ct": per-channel dicts {"p005", "p995", "mean", "std"} (HU), or the path of a
      fingerprint.json (`medjax.data.plan`) holding them under "intensity".
    image_order: spline order for resampling the image (3 cubic, 1 linear).
  """
  target_spacing_mm: Optional[Tuple[float, float, float]] = None
  crop_nonzero: bool = False
  normalization: Union[str, Tuple[str, ...]] = "zscore"
  intensity_stats: Union[str, Tuple[Mapping[str, float], ...], None] = None
  image_order: int = 3

  def __post_init__(self):
    schemes = (self.normalization,) if isinstance(self.normalization, str) else tuple(self.normalization)
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
      raise ValueError(f"preprocessing normalization={self.normalization!r}: each scheme must be one of {SCHEMES}.")
    object.__setattr__(self, "normalization", self.normalization if isinstance(self.normalization, str)
                       else schemes)
    stats = self.intensity_stats
    if isinstance(stats, (str, os.PathLike)):
      fp = plan_lib.read_fingerprint(stats)
      if "intensity" not in fp:
        raise ValueError(f"preprocessing intensity_stats: {os.fspath(stats)} has no 'intensity' key.")
      stats = fp["intensity"]
    if stats is not None:
      stats = tuple(dict(s) for s in stats)
      for ch, s in enumerate(stats):
        missing = [k for k in _CT_KEYS if k not in s]
        if missing:
          raise ValueError(f"preprocessing intensity_stats channel {ch} lacks {missing}.")
      object.__setattr__(self, "intensity_stats", stats)
    if "ct" in schemes and stats is None:
      raise ValueError("preprocessing normalization 'ct' needs intensity_stats (per-channel p005/p995/mean/std "
                       "from the training set, or a fingerprint.json path).")
    if self.target_spacing_mm is not None:
      spacing = tuple(float(s) for s in self.target_spacing_mm)
      if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"preprocessing target_spacing_mm={self.target_spacing_mm} must be 3 positive mm "
                         "values (z, y, x).")
      object.__setattr__(self, "target_spacing_mm", spacing)
    if self.image_order not in range(6):
      raise ValueError(f"preprocessing image_order={self.image_order} must be 0..5.")

  @classmethod
  def from_dict(cls, spec: Union[PreprocessSpec, Mapping[str, Any], None]) -> PreprocessSpec:
    """A spec from a dict with the field names (unknown keys raise, naming them); None gives the defaults."""
    if spec is None:
      return cls()
    if isinstance(spec, cls):
      return spec
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
      raise ValueError(f"preprocessing has unknown keys {unknown}; known: {sorted(fields)}.")
    return cls(**dict(spec))

  @classmethod
  def from_data_config(cls, data: Mapping[str, Any], **overrides: Any) -> PreprocessSpec:
    """The spec a volume dataset config (`config.data` of an "msd" / "image_folder" run) trained with.

    Picks the spec's fields from `data` (target spacing from `plan_path` when not set), then applies the
    non-None `overrides`. Raises when `data` leaves normalization unset (msd then picks it per modality
    from dataset.json, which inference does not read): set it explicitly.
    """
    data = dict(data or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: data[k] for k in fields if data.get(k) is not None}
    if "target_spacing_mm" not in values and data.get("plan_path"):
      values["target_spacing_mm"] = plan_lib.read_plan(data["plan_path"])["target_spacing_mm"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "normalization" not in values and data.get("name") == "msd":
      raise ValueError("config.data.normalization is unset (dataset 'msd' picks it per modality): pass the "
                       "schemes used in training, e.g. --normalization ct or zscore.")
    return cls.from_dict(values)

  def schemes(self, num_channels: int) -> Tuple[str, ...]:
    """One normalisation scheme per channel; raises when a per-channel list has the wrong length."""
    if isinstance(self.normalization, str):
      return (self.normalization,) * num_channels
    if len(self.normalization) != num_channels:
      raise ValueError(f"preprocessing normalization {self.normalization} has {len(self.normalization)} "
                       f"entries but the image has {num_channels} channel(s).")
    return self.normalization


@dataclasses.dataclass(frozen=True)
class _Context:
  """What `restore_label` needs to map a prediction back onto the input grid."""
  undo_canonical: Callable[[np.ndarray], io.Volume]
  canonical_shape: Tuple[int, ...]
  bbox: preprocess.BBox
  cropped_spacing: Tuple[float, ...]
  target_spacing: Optional[Tuple[float, ...]]


def _normalize(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
  """Per-channel normalisation of (z, y, x, C) with the schemes of medjax's volume datasets; float32."""
  schemes = spec.schemes(image.shape[-1])
  if "ct" in schemes and len(spec.intensity_stats) != len(schemes):
    raise ValueError(f"preprocessing intensity_stats has {len(spec.intensity_stats)} channel(s), the image "
                     f"has {len(schemes)}.")
  stats = [{k: float(s[k]) for k in _CT_KEYS} for s in spec.intensity_stats] if "ct" in schemes else None
  return volumes.normalize(image, schemes, stats)


def preprocess_volume(volume: io.Volume, spec: PreprocessSpec) -> Tuple[np.ndarray, _Context]:
  """Steps 1-4: a case as the network's input `(z, y, x, C)` float32, plus the context to undo them."""
  canonical, undo = io.to_canonical(volume)
  image = canonical.array if canonical.array.ndim == 4 else canonical.array[..., None]
  if not np.all(np.isfinite(image)):
    raise ValueError(f"the input has {int(np.sum(~np.isfinite(image)))} NaN/inf voxels.")
  shape = tuple(image.shape[:3])
  bbox = preprocess.nonzero_bbox(image, 3) if spec.crop_nonzero else tuple((0, s) for s in shape)
  image = image[tuple(slice(a, b) for a, b in bbox)].astype(np.float32)
  if spec.target_spacing_mm is not None:
    image = preprocess.resample(image, canonical.spacing_mm, spec.target_spacing_mm, order=spec.image_order)
  return _normalize(image, spec), _Context(undo, shape, bbox, canonical.spacing_mm, spec.target_spacing_mm)


def _resize_back(array: np.ndarray, shape: Sequence[int], order: int, thick: Optional[int]) -> np.ndarray:
  """Resizes (z, y, x[, K]) to `shape`, the thick axis (if any) with nearest and the others with `order`."""
  if thick is None or order == 0:
    return preprocess.resize(array, shape, order=order)
  in_plane = list(array.shape[:3])
  for axis in range(3):
    if axis != thick:
      in_plane[axis] = shape[axis]
  array = preprocess.resize(array, in_plane, order=order)  # thick axis keeps its size: untouched
  return preprocess.resize(array, shape, order=0)


def label_dtype(num_classes: int) -> np.dtype:
  """uint8 for up to 256 classes, int16 beyond."""
  return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int16)


def restore_label(probabilities: np.ndarray, context: _Context, label_resample: str = "linear",
                  lcc_classes: Union[bool, Sequence[int], None] = None) -> io.Volume:
  """Steps 6-7: probabilities `(z', y', x', K)` on the network grid -> label Volume on the input grid."""
  if label_resample not in LABEL_RESAMPLING:
    raise ValueError(f"label_resample must be one of {LABEL_RESAMPLING}, got {label_resample!r}.")
  num_classes = probabilities.shape[-1]
  dtype = label_dtype(num_classes)
  cropped_shape = tuple(b - a for a, b in context.bbox)
  thick = None
  if context.target_spacing is not None:
    thick = preprocess.thick_axis(context.cropped_spacing, context.target_spacing)
  if label_resample == "linear":
    label = np.argmax(_resize_back(probabilities, cropped_shape, 1, thick), axis=-1).astype(dtype)
  else:
    label = _resize_back(np.argmax(probabilities, axis=-1).astype(dtype), cropped_shape, 0, thick)
  if lcc_classes is not None and lcc_classes is not False:
    label = keep_largest_component(label, None if lcc_classes is True else lcc_classes)
  label = preprocess.uncrop(label, context.bbox, context.canonical_shape, fill=0)
  return context.undo_canonical(label)


def keep_largest_component(label: np.ndarray, classes: Optional[Sequence[int]] = None,
                           connectivity: int = 1) -> np.ndarray:
  """Keeps, for each class in `classes`, only its largest connected component; the rest becomes 0.

  Args:
    label: integer label map (*spatial), 0 = background.
    classes: classes to filter; None means every nonzero class present. Others are left as they are.
    connectivity: 1 (neighbours share a face) up to label.ndim (any shared corner), as
      `scipy.ndimage.generate_binary_structure`.
  Returns a new array (same dtype). Ties between equally large components keep the first in raster order.
  """
  label = np.asarray(label)
  if not 1 <= connectivity <= label.ndim:
    raise ValueError(f"keep_largest_component: connectivity must be in [1, {label.ndim}], got {connectivity}.")
  structure = ndi.generate_binary_structure(label.ndim, connectivity)
  classes = [int(c) for c in np.unique(label) if c != 0] if classes is None else [int(c) for c in classes]
  out = label.copy()
  for c in classes:
    components, count = ndi.label(label == c, structure=structure)
    if count <= 1:
      continue
    sizes = np.bincount(components.ravel())[1:]
    out[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
  return out


class Predictor:
  """Applies a patch network to whole 3D cases (module docstring for the steps).

  Args:
    predict_fn: windows `(n, *roi, C) -> (n, *roi, K)` probabilities (`make_predict_fn`, `ensemble`).
    roi_size: (z, y, x) window size, normally the training patch size.
    preprocessing: a `PreprocessSpec` or a dict with its fields (None: zscore, crop, no resampling).
    overlap / mode / sigma_scale / window_batch / mesh: passed to `sliding_window_inference`.
    tta: False, True (all 8 mirrorings) or a list of flips for `flip_tta`.
    lcc: False, True (largest component of every foreground class) or a list of classes.
    label_resample: "linear" (probabilities) or "nearest" (labels); see step 6.
    num_channels: the input channels the network takes; an image with another number is refused naming its
      shape (None: not checked here).
  """

  def __init__(self, predict_fn, *, roi_size: Sequence[int], preprocessing=None, overlap: float = 0.5,
               mode: str = "gaussian", sigma_scale: float = 0.125, window_batch: int = 4,
               tta: Union[bool, Sequence[Sequence[int]]] = False,
               lcc: Union[bool, Sequence[int]] = False, label_resample: str = "linear", mesh=None,
               num_channels: Optional[int] = None):
    if tta is not False:
      predict_fn = flip_tta(predict_fn, None if tta is True else tta)
    self.predict_fn = predict_fn
    self.spec = PreprocessSpec.from_dict(preprocessing)
    self.roi_size = tuple(int(r) for r in roi_size)
    if len(self.roi_size) != 3:
      raise ValueError(f"Predictor works on 3D volumes: roi_size must be (z, y, x), got {tuple(roi_size)}.")
    if label_resample not in LABEL_RESAMPLING:
      raise ValueError(f"label_resample must be one of {LABEL_RESAMPLING}, got {label_resample!r}.")
    self.window_kwargs = dict(roi_size=self.roi_size, overlap=overlap, mode=mode, sigma_scale=sigma_scale,
                              window_batch=window_batch, mesh=mesh)
    self.lcc = lcc
    self.label_resample = label_resample
    if num_channels is not None and (isinstance(num_channels, bool) or int(num_channels) < 1):
      raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}.")
    self.num_channels = None if num_channels is None else int(num_channels)

  def check_channels(self, volume: io.Volume, name: str = "the input") -> None:
    """Raises ValueError naming `name` and the shape when `volume`'s channels are not the network's."""
    channels = volume.num_channels or 1
    if self.num_channels is None or channels == self.num_channels:
      return
    hint = " (a 4D image where a 3D one is expected)" if self.num_channels == 1 else ""
    raise ValueError(f"{name}: image of shape {volume.array.shape} (z, y, x[, C]) has {channels} channel(s), the "
                     f"model takes {self.num_channels}{hint}.")

  def predict_probabilities(self, image: np.ndarray) -> np.ndarray:
    """Preprocessed `(z, y, x, C)` -> `(z, y, x, K)` float32 probabilities (host numpy)."""
    out = sliding_window_inference(self.predict_fn, np.asarray(image, np.float32)[None], **self.window_kwargs)
    return np.asarray(out[0])

  def predict_volume(self, volume: io.Volume) -> io.Volume:
    """A label-map Volume (uint8, or int16 beyond 256 classes) with `volume`'s spatial shape, affine and
    xform_codes."""
    self.check_channels(volume)
    image, context = preprocess_volume(volume, self.spec)
    probabilities = self.predict_probabilities(image)
    return restore_label(probabilities, context, self.label_resample, self.lcc)

  def predict_file(self, input_path, output_path) -> io.Volume:
    """Reads a case (3D, or with channels; any `io.read_image` format), writes its label map to `output_path`
    (format by suffix: .nii.gz, .nrrd, .mha, ...)."""
    from flax.errors import ScopeParamShapeError

    name = os.fspath(input_path)
    volume = io.read_image(input_path, allow_channels=True)
    self.check_channels(volume, name)
    try:
      label = self.predict_volume(volume)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from e
    except ScopeParamShapeError as e:  # no num_channels given: the network's first layer is the check
      raise ValueError(f"{name}: image of shape {volume.array.shape} (z, y, x[, C]) does not fit the model's "
                       f"input: {e}") from e
    io.write_image(output_path, label)
    return label


def predict_volume_to_nifti(predict_fn, input_path, output_path, *, roi_size: Sequence[int],
                            preprocessing=None, **predictor_kwargs) -> io.Volume:
  """One-shot `Predictor(predict_fn, ...).predict_file(input_path, output_path)`; returns the label Volume. Any
  format `io.read_image` reads in, any `io.write_image` writes out (by `output_path`'s suffix), despite the name."""
  predictor = Predictor(predict_fn, roi_size=roi_size, preprocessing=preprocessing, **predictor_kwargs)
  return predictor.predict_file(input_path, output_path)


def image_inputs(path) -> Dict[str, str]:
  """{case name: file} for one image file or every image file in a folder (sorted; `io.IMAGE_SUFFIXES`: .nii.gz,
  .nii, .nrrd, .nhdr, .mha, .mhd). Case names drop the suffix; two files of one case are an error."""
  path = os.fspath(path)
  what = f"image files ({', '.join(io.IMAGE_SUFFIXES)})"
  if os.path.isfile(path):
    stem = io.image_stem(path)
    if stem is None:
      raise ValueError(f"predict input {path} is not one of the {what}.")
    return {stem: path}
  if not os.path.isdir(path):
    raise FileNotFoundError(f"predict input not found: {path}")
  try:
    names = io.list_images(path)
  except ValueError as e:
    raise ValueError(f"predict input: {e}") from None
  if not names:
    raise ValueError(f"predict input {path} holds no {what}.")
  return names


nifti_inputs = image_inputs  # its first name, from when only NIfTI was read


def output_name(case: str, input_path: str, output_suffix: Optional[str] = None) -> str:
  """`<case><suffix>` for a prediction: `output_suffix`, else the input's format (NIfTI always as .nii.gz)."""
  if output_suffix is None:
    suffix = io.image_suffix(input_path)
    output_suffix = ".nii.gz" if suffix in (None, ".nii", ".nii.gz") else suffix
  if output_suffix not in io.IMAGE_SUFFIXES:
    raise ValueError(f"output suffix {output_suffix!r} must be one of {', '.join(io.IMAGE_SUFFIXES)}.")
  return f"{case}{output_suffix}"
