"""The frames of one DICOM file with their geometry: classic single-frame and Enhanced multi-frame (CT/MR/...).

A classic image keeps its geometry at the top level of the dataset (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, RescaleSlope/Intercept). An Enhanced file (NumberOfFrames > 1, Enhanced CT/MR Image Storage) keeps
it in functional groups: SharedFunctionalGroupsSequence[0] for what every frame shares and
PerFrameFunctionalGroupsSequence[k] for frame k, each holding one-item macros:

    PlanePositionSequence[0].ImagePositionPatient           position of the frame (per frame in practice)
    PlaneOrientationSequence[0].ImageOrientationPatient     row and column directions
    PixelMeasuresSequence[0].PixelSpacing / SliceThickness / SpacingBetweenSlices
    PixelValueTransformationSequence[0].RescaleSlope / RescaleIntercept

`frame_value` looks a keyword up in that order (per frame, then shared, then the top level), so one code path
reads both kinds of file. Everything here is in DICOM's LPS frame and millimetres; `medjax.data.io.dicom` sorts
the frames, checks their spacing and builds the RAS `Volume`.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

_PER_FRAME = "PerFrameFunctionalGroupsSequence"
_SHARED = "SharedFunctionalGroupsSequence"


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
  """One 2D image of a DICOM file, in DICOM's LPS patient frame.

  Attributes:
    label: how messages name the frame: the file path, plus "frame k/n" (1-based) for multi-frame files.
    orientation: (6,) float64, ImageOrientationPatient: the row direction (along a row, increasing column),
      then the column direction (down a column, increasing row), unit vectors in LPS.
    position: (3,) float64, ImagePositionPatient: LPS mm of the centre of the first transmitted pixel.
    pixel_spacing: (row spacing, column spacing) in mm, i.e. (y, x): DICOM's PixelSpacing order.
    slope, intercept: modality LUT, value = stored * slope + intercept (HU for CT).
    thickness_mm: SpacingBetweenSlices, else SliceThickness, else None: the step of a one-slice volume.
    pixels: (Rows, Columns) stored values, the dtype pydicom decodes to.
  """
  label: str
  orientation: np.ndarray
  position: np.ndarray
  pixel_spacing: Tuple[float, float]
  slope: float
  intercept: float
  thickness_mm: Optional[float]
  pixels: np.ndarray


def number_of_frames(ds) -> int:
  """NumberOfFrames (1 when absent or empty)."""
  return int(getattr(ds, "NumberOfFrames", 1) or 1)


def is_enhanced(ds) -> bool:
  """True for files that keep their geometry in functional groups (Enhanced CT/MR and other multi-frame IODs)."""
  return _PER_FRAME in ds or _SHARED in ds


def _first_item(ds, keyword: str):
  sequence = getattr(ds, keyword, None)
  return sequence[0] if sequence else None


def frame_value(ds, frame: int, sequence_keyword: str, keyword: str):
  """`keyword` for frame `frame` (0-based): in the per-frame functional group's `sequence_keyword` macro, else the
  shared group's, else the top level of the dataset; None when absent or empty everywhere."""
  groups = []
  per_frame = getattr(ds, _PER_FRAME, None)
  if per_frame is not None and frame < len(per_frame):
    groups.append(per_frame[frame])
  shared = _first_item(ds, _SHARED)
  if shared is not None:
    groups.append(shared)
  for group in groups:
    macro = _first_item(group, sequence_keyword)
    if macro is not None:
      value = getattr(macro, keyword, None)
      if value is not None and not (hasattr(value, "__len__") and len(value) == 0):
        return value
  value = getattr(ds, keyword, None)
  if value is None or (hasattr(value, "__len__") and len(value) == 0):
    return None
  return value


def _required(ds, frame: int, sequence_keyword: str, keyword: str, label: str, size: int) -> np.ndarray:
  value = frame_value(ds, frame, sequence_keyword, keyword)
  if value is None:
    where = f" (looked in {_PER_FRAME} and {_SHARED} > {sequence_keyword})" if is_enhanced(ds) else ""
    raise ValueError(f"DICOM file {label} is missing the {keyword} tag{where}.")
  items = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else [value]
  try:
    array = np.asarray([float(v) for v in items], np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"DICOM file {label}: {keyword} {value!r} is not numeric.") from e
  if array.shape != (size,) or not np.all(np.isfinite(array)):
    raise ValueError(f"DICOM file {label}: {keyword} must have {size} finite values, got {array.tolist()}.")
  return array


def _optional_float(ds, frame: int, sequence_keyword: str, keyword: str, default: Optional[float]) -> Optional[float]:
  value = frame_value(ds, frame, sequence_keyword, keyword)
  try:
    value = float(value) if value is not None else default
  except (TypeError, ValueError):
    return default
  return value if value is not None and np.isfinite(value) else default


def frames_of(ds, path: str, pixels: np.ndarray) -> List[Frame]:
  """The frames of one DICOM dataset with their geometry and rescale values.

  Args:
    ds: the pydicom dataset read from `path`.
    path: the file, for messages.
    pixels: the decoded stored values: (Rows, Columns) for one frame, (NumberOfFrames, Rows, Columns) for several.

  Raises:
    ValueError naming the file (and frame): a missing or malformed ImagePositionPatient, ImageOrientationPatient or
    PixelSpacing, or pixels whose shape does not match NumberOfFrames, Rows and Columns.
  """
  count = number_of_frames(ds)
  pixels = np.asarray(pixels)
  if count == 1 and pixels.ndim == 2:
    pixels = pixels[None]
  if pixels.ndim != 3 or pixels.shape[0] != count:
    raise ValueError(f"DICOM file {path} has pixel shape {pixels.shape} for {count} frame(s); expected "
                     f"(frames, Rows, Columns) of single-sample (grey) pixels.")
  frames = []
  for k in range(count):
    label = path if count == 1 else f"{path} frame {k + 1}/{count}"
    orientation = _required(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient", label, 6)
    position = _required(ds, k, "PlanePositionSequence", "ImagePositionPatient", label, 3)
    spacing = _required(ds, k, "PixelMeasuresSequence", "PixelSpacing", label, 2)
    if not np.all(spacing > 0):
      raise ValueError(f"DICOM file {label}: PixelSpacing must be positive, got {spacing.tolist()}.")
    thickness = _optional_float(ds, k, "PixelMeasuresSequence", "SpacingBetweenSlices", None)
    if thickness is None or thickness <= 0:
      thickness = _optional_float(ds, k, "PixelMeasuresSequence", "SliceThickness", None)
    frames.append(Frame(
        label=label, orientation=orientation, position=position,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        # An empty or zero slope in the header means "no rescale", as in most viewers.
        slope=_optional_float(ds, k, "PixelValueTransformationSequence", "RescaleSlope", 1.0) or 1.0,
        intercept=_optional_float(ds, k, "PixelValueTransformationSequence", "RescaleIntercept", 0.0),
        thickness_mm=thickness if thickness is not None and thickness > 0 else None,
        pixels=pixels[k]))
  return frames
