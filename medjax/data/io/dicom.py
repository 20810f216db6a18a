"""DICOM through pydicom: a series (a folder of slices, or Enhanced multi-frame files) or one file into a `Volume`.

DICOM stores geometry in LPS patient coordinates; readers here convert to nibabel's RAS (negating world x
and y) so that every `Volume` shares one world frame. `medjax.data.io.dicom_multiframe` reads the frames of
one file (classic or Enhanced); this module decodes pixels, picks a series, and builds the volume
(`_assemble`: one set of sorting, spacing and geometry rules for every kind of input).

Slice spacing. Positions in the header are decimal strings, often rounded (to 0.1 mm on some scanners), so
the steps between consecutive slices vary a little even for a regular stack; a missing slice makes one step
about twice the others. What the other readers do:

  * GDCM's IPPSorter computes a slice spacing only when the steps agree within 1e-6 mm (its default).
  * ITK's ImageSeriesReader (SimpleITK) always reads, takes |last - first| / (n - 1) as the spacing and warns
    ("Non uniform sampling or missing slices detected") when a step deviates by more than
    SpacingWarningRelThreshold = 1e-4 of it.
  * dicom3tools' dcsort compares intervals with a tolerance of +/- 0.01 mm.
  * dcm2niix reports "Interslice distance varies in this volume" when a step differs from the first one by more
    than 0.2 mm (nii_dicom_batch.cpp, isSameFloatT(dx, ..., 0.2)) and writes an equalised copy as well.

Here, with the mean step (last - first) / (n - 1) along the slice normal and d the largest deviation of a step
from it: d <= min(0.01 mm, 1% of the step) is exact (silent; 0.01 mm as dcsort, 1% as this reader always
allowed); d <= min(slice_step_tolerance_mm = 0.2 mm (dcm2niix), slice_step_tolerance_fraction = 0.25 of the
step) is accepted on the mean step with one `GeometryWarning`; anything more is refused, naming the two slices
around the worst step and the keyword values that would accept it. The relative bound keeps a missing slice out
for any slice thickness: one missing slice in n >= 3 files puts a step at least 1/3 of the mean step away from
it, while 0.1 mm rounding stays within 0.25 of slices down to 0.4 mm.

Gantry tilt. When the slice positions do not advance along the slice normal (a CT gantry tilted against the
table), the affine keeps the exact, sheared geometry: the third column is the step between slice positions.
One `GeometryWarning` gives the tilt angle, since other tools differ: dcm2niix resamples the slices to remove
the tilt, and ITK/SimpleITK's ImageSeriesReader keeps an orthogonal direction (ForceOrthogonalDirection) with
the spacing |last - first| / (n - 1), so its slices drift away from their recorded positions.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import numpy as np

from medjax.data.io.dicom_multiframe import Frame, frame_value, frames_of, number_of_frames
from medjax.data.io.volume import (LPS_TO_RAS, GeometryWarning, PathLike, Volume, check_readable_file,
                                  spacing_from_affine)

# Defaults of the slice-step tolerances (module doc: sources and reasoning).
SLICE_STEP_TOLERANCE_MM = 0.2
SLICE_STEP_TOLERANCE_FRACTION = 0.25
# Below both of these a deviation is the decimal rounding of any header: no warning.
_EXACT_STEP_MM = 0.01
_EXACT_STEP_FRACTION = 0.01
# A sideways drift of the stack up to this many mm is position rounding, not gantry tilt.
_TILT_MIN_DRIFT_MM = 0.2
# Pixel data larger than this is read from the file only when decoded: a folder of several series loads only the
# pixels of the one it returns.
_DEFER_SIZE = "64 KB"
_INSTALL_HINT = 'pip install "medjax[dicom]" (pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg)'


def dcmread(path: PathLike, *, header_only: bool = False):
  """pydicom dataset of `path`; header_only stops before the pixel data. ValueError naming non-DICOM files."""
  import pydicom
  from pydicom.errors import InvalidDicomError

  path = check_readable_file(path, "DICOM")
  try:
    if header_only:
      return pydicom.dcmread(path, stop_before_pixels=True)
    return pydicom.dcmread(path, defer_size=_DEFER_SIZE)
  except InvalidDicomError as e:
    raise ValueError(f"{path} is not a DICOM file: {e}") from e
  except Exception as e:
    raise ValueError(f"cannot read DICOM file {path}: {type(e).__name__}: {e}") from e


def _missing_decoder(path: str, syntax, detail: str) -> ValueError:
  return ValueError(f"cannot decode DICOM file {path}: its transfer syntax {syntax.name} ({syntax}) needs a pixel "
                    f"decoder that is not installed ({detail}). Install the optional DICOM decoders: {_INSTALL_HINT}.")


def _transfer_syntax(ds):
  meta = getattr(ds, "file_meta", None)
  syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
  return syntax if syntax is not None and syntax.is_transfer_syntax else None


def read_pixels(ds, path: str) -> np.ndarray:
  """The stored pixel values of a dataset: (Rows, Columns[, samples]) or (frames, Rows, Columns[, samples]).

  Compressed transfer syntaxes go through pydicom's decoder plugins: RLE Lossless and Deflated need none,
  JPEG, JPEG-LS and JPEG 2000 need the `dicom` extra (pylibjpeg with its libjpeg and openjpeg plugins).

  Raises:
    ValueError naming the file: no PixelData; a transfer syntax without an installed decoder (naming the
    syntax, its UID and what to install) or without any pydicom decoder; a decoding failure.
  """
  if "PixelData" not in ds:
    raise ValueError(f"DICOM file {path} has no PixelData.")
  syntax = _transfer_syntax(ds)
  if syntax is not None and syntax.is_encapsulated:
    from pydicom.pixels import get_decoder

    try:
      decoder = get_decoder(syntax)
    except NotImplementedError as e:
      raise ValueError(f"DICOM file {path} uses the transfer syntax {syntax.name} ({syntax}), which pydicom has no "
                       f"pixel decoder for.") from e
    if not decoder.is_available:
      raise _missing_decoder(path, syntax, "; ".join(decoder.missing_dependencies) or "no plugin available")
  try:
    return np.asarray(ds.pixel_array)
  except Exception as e:
    if syntax is not None and isinstance(e, RuntimeError) and "missing dependencies" in str(e):
      raise _missing_decoder(path, syntax, " ".join(str(e).split())) from e
    described = f" ({syntax.name}, {syntax})" if syntax is not None else ""
    raise ValueError(f"cannot decode the pixels of DICOM file {path}{described}: {type(e).__name__}: {e}") from e


def apply_rescale(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
  """stored * slope + intercept as float32 (float64 arithmetic: exact for 16-bit stored values and usual slopes)."""
  return (np.asarray(pixels).astype(np.float64) * slope + intercept).astype(np.float32)


def rescale(pixels: np.ndarray, ds) -> np.ndarray:
  """Modality LUT of a one-frame dataset: stored * RescaleSlope + RescaleIntercept (HU for CT), float32."""
  slope = frame_value(ds, 0, "PixelValueTransformationSequence", "RescaleSlope")
  intercept = frame_value(ds, 0, "PixelValueTransformationSequence", "RescaleIntercept")
  return apply_rescale(pixels, float(slope or 1.0) or 1.0, float(intercept or 0.0))


def _check_folder(folder: PathLike) -> str:
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"DICOM series folder not found: {folder}")
  return folder


def _list_files(folder: str) -> List[str]:
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if not f.startswith(".") and f.upper() != "DICOMDIR" and os.path.isfile(os.path.join(folder, f)))
  if not files:
    raise ValueError(f"no DICOM files in {folder} (the folder is empty).")
  return files


def _series_uid(ds) -> str:
  return str(getattr(ds, "SeriesInstanceUID", "") or "")


def _group_by_series(entries) -> Dict[str, list]:
  groups: Dict[str, list] = {}
  for path, ds in entries:
    groups.setdefault(_series_uid(ds), []).append((path, ds))
  return groups


def _summaries(groups: Dict[str, list]) -> List[dict]:
  rows = []
  for uid, entries in groups.items():
    first = entries[0][1]
    number = getattr(first, "SeriesNumber", None)
    rows.append({"uid": uid, "description": str(getattr(first, "SeriesDescription", "") or ""),
                 "number": int(number) if number not in (None, "") else None, "num_files": len(entries),
                 "num_frames": sum(number_of_frames(ds) for _, ds in entries),
                 "modality": str(getattr(first, "Modality", "") or "")})
  return sorted(rows, key=lambda r: (r["number"] is None, r["number"] or 0, r["uid"]))


def _series_table(groups: Dict[str, list]) -> str:
  return "\n".join(f"  series_uid={r['uid'] or '<none>'}: {r['description']!r}, SeriesNumber {r['number']}, "
                   f"{r['modality'] or '?'}, {r['num_frames']} slices in {r['num_files']} files"
                   for r in _summaries(groups))


def list_dicom_series(folder: PathLike) -> List[dict]:
  """The DICOM series in a folder (headers only), to choose `series_uid` for `read_dicom_series`.

  Returns:
    One dict per series, ordered by SeriesNumber: uid (SeriesInstanceUID, "" when absent), description
    (SeriesDescription), number (SeriesNumber, None when absent), num_files, num_frames (slices: the sum of
    NumberOfFrames over the files), modality.

  Raises:
    FileNotFoundError: no such folder.  ValueError: no files, or a file that is not DICOM (naming it).
  """
  folder = _check_folder(folder)
  entries = [(path, dcmread(path, header_only=True)) for path in _list_files(folder)]
  return _summaries(_group_by_series(entries))


def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None, *,
                      slice_step_tolerance_mm: float = SLICE_STEP_TOLERANCE_MM,
                      slice_step_tolerance_fraction: float = SLICE_STEP_TOLERANCE_FRACTION) -> Volume:
  """Reads one DICOM series (a folder of single-frame slices, or of Enhanced multi-frame files) into a float32 Volume.

  Slices (files, or the frames of multi-frame files) are ordered by the projection of ImagePositionPatient on
  the slice normal (the cross product of the row and column directions in ImageOrientationPatient), never by
  file name or InstanceNumber. Voxel values are RescaleSlope * stored + RescaleIntercept (HU for CT; per frame
  for Enhanced files). Array axes: z = slice (increasing along the normal), y = image row, x = image column.
  The affine maps (column, row, slice) to RAS mm: columns PixelSpacing[1] * row direction, PixelSpacing[0] *
  column direction, the mean step between slice positions ((last - first) / (n - 1), exact even for a tilted
  gantry), and the position of the first slice, converted from DICOM's LPS. A single slice gets the step
  SpacingBetweenSlices, else SliceThickness, along the normal. The module doc explains the spacing tolerances.

  Args:
    folder: directory whose files (hidden files and DICOMDIR skipped) are all DICOM.
    series_uid: read only this SeriesInstanceUID when the folder holds several (`list_dicom_series`).
    slice_step_tolerance_mm: largest accepted deviation, in mm, of a step between consecutive slices (along
      the slice normal) from the mean step; default 0.2 mm, dcm2niix's interslice tolerance.
    slice_step_tolerance_fraction: the same deviation as a fraction of the mean step (default 0.25); a step
      must be within both bounds. Deviations above min(0.01 mm, 1% of the step) that pass both are accepted
      with a GeometryWarning; smaller ones are silent.

  Warns:
    GeometryWarning: steps that vary within the tolerance (once, with the folder and the min/max step); a gantry
      tilt (with the angle); a single slice without a thickness (1 mm assumed).

  Raises:
    FileNotFoundError: no such folder.
    ValueError: no files, a non-DICOM file, several series without `series_uid` or an unknown `series_uid` (both
      listing the series), a missing geometry tag (naming the file), orientations, pixel spacings or slice sizes
      that differ, duplicate positions, steps beyond the tolerance (a gap: naming the slices, steps and keywords),
      pixels that cannot be decoded (naming the transfer syntax and the package to install).
  """
  _check_tolerances(slice_step_tolerance_mm, slice_step_tolerance_fraction)
  folder = _check_folder(folder)
  groups = _group_by_series((path, dcmread(path)) for path in _list_files(folder))
  if series_uid is not None:
    if series_uid not in groups:
      raise ValueError(f"series_uid={series_uid} is not in {folder}, which holds:\n{_series_table(groups)}")
    entries = groups[series_uid]
  elif len(groups) > 1:
    raise ValueError(f"{folder} holds {len(groups)} DICOM series; pass series_uid= to read one "
                     f"(list_dicom_series(folder) returns this list):\n{_series_table(groups)}")
  else:
    entries = next(iter(groups.values()))
  frames = [frame for path, ds in entries for frame in frames_of(ds, path, read_pixels(ds, path))]
  return _assemble(frames, folder, slice_step_tolerance_mm, slice_step_tolerance_fraction)


def read_dicom(path: PathLike, *, slice_step_tolerance_mm: float = SLICE_STEP_TOLERANCE_MM,
               slice_step_tolerance_fraction: float = SLICE_STEP_TOLERANCE_FRACTION) -> Volume:
  """Reads one DICOM file into a float32 Volume: a one-slice volume (1, Rows, Columns) for a single-frame file,
  (frames, Rows, Columns) for an Enhanced multi-frame file, with the same ordering, rescale, geometry and
  tolerances as `read_dicom_series` (see there; warnings and errors name the file).

  Raises:
    FileNotFoundError: no such file.  ValueError: as `read_dicom_series`, for one file.
  """
  _check_tolerances(slice_step_tolerance_mm, slice_step_tolerance_fraction)
  path = check_readable_file(path, "DICOM")
  ds = dcmread(path)
  return _assemble(frames_of(ds, path, read_pixels(ds, path)), path, slice_step_tolerance_mm,
                   slice_step_tolerance_fraction)


def _check_tolerances(tolerance_mm: float, fraction: float):
  if not (tolerance_mm >= 0 and fraction >= 0):
    raise ValueError(f"slice_step_tolerance_mm ({tolerance_mm}) and slice_step_tolerance_fraction ({fraction}) must "
                     f"be >= 0.")


def _mm(position: np.ndarray) -> str:
  return "(" + ", ".join(f"{v:.6g}" for v in position) + ")"


def _round_up(value: float) -> str:
  return f"{np.ceil(value * 100) / 100:g}"


def _check_steps(frames: List[Frame], depths: np.ndarray, where: str, tolerance_mm: float, fraction: float):
  """Accepts steps within the tolerance (warning when beyond rounding), refuses the rest; module doc."""
  n = len(depths)
  steps = np.diff(depths)
  mean = (depths[-1] - depths[0]) / (n - 1)
  deviation = np.abs(steps - mean)
  worst = int(np.argmax(deviation))
  largest = float(deviation[worst])
  if largest <= min(_EXACT_STEP_MM, _EXACT_STEP_FRACTION * mean):
    return
  limit = min(tolerance_mm, fraction * mean)
  if largest <= limit:
    warnings.warn(f"{where}: slice steps vary from {steps.min():.4g} to {steps.max():.4g} mm along the slice normal "
                  f"(up to {largest:.3g} mm from the mean, within min(slice_step_tolerance_mm={tolerance_mm:g}, "
                  f"slice_step_tolerance_fraction={fraction:g} x step) = {limit:.3g} mm; rounded ImagePositionPatient "
                  f"values?); using the mean step {mean:.6g} mm.", GeometryWarning, stacklevel=4)
    return
  a, b = frames[worst], frames[worst + 1]
  kind = "a gap (missing slices?)" if steps[worst] > mean else "slices closer than the rest (extra slices?)"
  misplaced = float(np.max(np.abs(depths - (depths[0] + mean * np.arange(n)))))
  num_bad = int(np.count_nonzero(deviation > limit))
  raise ValueError(
      f"unevenly spaced slices in {where}: {kind} between {a.label} at {_mm(a.position)} and {b.label} at "
      f"{_mm(b.position)} (LPS mm): a step of {steps[worst]:.4g} mm along the slice normal against the mean step "
      f"{mean:.4g} mm; steps range from {steps.min():.4g} to {steps.max():.4g} mm and {num_bad} of {n - 1} deviate "
      f"by more than min(slice_step_tolerance_mm={tolerance_mm:g}, slice_step_tolerance_fraction={fraction:g} x "
      f"step) = {limit:.3g} mm. To read the slices anyway on the mean step (each then lies up to {misplaced:.3g} mm "
      f"from its recorded position), pass slice_step_tolerance_mm={_round_up(largest)} and "
      f"slice_step_tolerance_fraction={_round_up(largest / mean)}.")


def _warn_tilt(step: np.ndarray, normal: np.ndarray, n: int, where: str):
  along = float(step @ normal)
  sideways = float(np.linalg.norm(step - along * normal))
  if sideways * (n - 1) <= _TILT_MIN_DRIFT_MM:
    return
  angle = float(np.degrees(np.arctan2(sideways, abs(along))))
  warnings.warn(f"{where}: gantry tilt of {angle:.2f} degrees: slice positions advance {np.linalg.norm(step):.4g} mm "
                f"per slice at {angle:.2f} degrees from the slice normal ({sideways * (n - 1):.3g} mm sideways over "
                f"the stack). The affine keeps this exact, sheared geometry; dcm2niix resamples such series to remove "
                f"the tilt and ITK/SimpleITK keep an orthogonal direction, so their results differ.", GeometryWarning,
                stacklevel=4)


def _assemble(frames: List[Frame], where: str, tolerance_mm: float, fraction: float) -> Volume:
  """The Volume of frames from one series or file: checks, slice order, spacing tolerance, tilt, RAS affine."""
  first = frames[0]
  row_dir, col_dir = first.orientation[:3], first.orientation[3:]
  if (abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2
      or abs(row_dir @ col_dir) > 1e-2):
    raise ValueError(f"DICOM file {first.label}: ImageOrientationPatient {first.orientation.tolist()} is not two "
                     f"orthogonal unit vectors.")
  normal = np.cross(row_dir, col_dir)
  normal = normal / np.linalg.norm(normal)
  shape_2d = first.pixels.shape
  for frame in frames:
    if not np.allclose(frame.orientation, first.orientation, atol=1e-4):
      raise ValueError(f"inconsistent ImageOrientationPatient in {where}: {frame.label} has "
                       f"{frame.orientation.tolist()}, {first.label} has {first.orientation.tolist()}.")
    if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4):
      raise ValueError(f"inconsistent PixelSpacing in {where}: {frame.label} has {list(frame.pixel_spacing)}, "
                       f"{first.label} has {list(first.pixel_spacing)}.")
    if frame.pixels.shape != shape_2d or len(shape_2d) != 2:
      raise ValueError(f"DICOM file {frame.label} has pixel shape {frame.pixels.shape}, expected {shape_2d} (Rows, "
                       f"Columns) of grey pixels as in {first.label}.")

  depths = np.asarray([frame.position @ normal for frame in frames])
  order = np.argsort(depths, kind="stable")
  frames = [frames[i] for i in order]
  depths = depths[order]
  steps = np.diff(depths)
  if steps.size and np.min(steps) <= 1e-3:
    i = int(np.argmin(steps))
    raise ValueError(f"{frames[i].label} and {frames[i + 1].label} are at the same slice position "
                     f"{_mm(frames[i].position)} (LPS mm) in {where}; several series, stacks or time points mixed?")

  if len(frames) > 1:
    _check_steps(frames, depths, where, tolerance_mm, fraction)
    slice_step = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    _warn_tilt(slice_step, normal, len(frames), where)
  else:
    thickness = first.thickness_mm
    if thickness is None:
      warnings.warn(f"{where}: a single slice without SpacingBetweenSlices or SliceThickness; assuming 1 mm along "
                    f"the slice normal.", GeometryWarning, stacklevel=3)
      thickness = 1.0
    slice_step = normal * thickness
  lps = np.eye(4)
  lps[:3, 0] = row_dir * first.pixel_spacing[1]  # column index -> along the row
  lps[:3, 1] = col_dir * first.pixel_spacing[0]  # row index -> down the column
  lps[:3, 2] = slice_step
  lps[:3, 3] = frames[0].position
  affine = LPS_TO_RAS @ lps
  array = np.stack([apply_rescale(frame.pixels, frame.slope, frame.intercept) for frame in frames])  # (z, y, x)
  return Volume(array, spacing_from_affine(affine), affine)
