"""DICOM through pydicom: series of single-frame slices into a `Volume` (LPS converted to RAS).

DICOM stores geometry in LPS patient coordinates; readers here convert to nibabel's RAS (negating world x
and y) so that every `Volume` shares one world frame.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from medjax.data.io.volume import LPS_TO_RAS, PathLike, Volume, check_readable_file, spacing_from_affine


def dcmread(path: str):
  import pydicom
  from pydicom.errors import InvalidDicomError

  path = check_readable_file(path, "DICOM")
  try:
    return pydicom.dcmread(path)
  except InvalidDicomError as e:
    raise ValueError(f"{path} is not a DICOM file: {e}") from e
  except Exception as e:
    raise ValueError(f"cannot read DICOM file {path}: {type(e).__name__}: {e}") from e


def _tag(ds, keyword: str, path: str):
  value = getattr(ds, keyword, None)
  if value is None or (hasattr(value, "__len__") and len(value) == 0):
    raise ValueError(f"DICOM file {path} is missing the {keyword} tag.")
  return value


def read_pixels(ds, path: str) -> np.ndarray:
  if "PixelData" not in ds:
    raise ValueError(f"DICOM file {path} has no PixelData.")
  try:
    return np.asarray(ds.pixel_array)
  except Exception as e:  # compressed transfer syntaxes need optional decoders
    raise ValueError(f"cannot decode the pixels of DICOM file {path}: {type(e).__name__}: {e}") from e


def rescale(pixels: np.ndarray, ds) -> np.ndarray:
  """Modality LUT: stored value * RescaleSlope + RescaleIntercept (Hounsfield units for CT), float32."""
  slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
  intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
  # float64 arithmetic, then float32: exact for any 16-bit stored value with the usual slopes.
  return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _list_files(folder: str):
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if not f.startswith(".") and f.upper() != "DICOMDIR" and os.path.isfile(os.path.join(folder, f)))


def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> Volume:
  """Reads one DICOM series (a folder of single-frame slices) into a float32 Volume.

  Slices are ordered by the projection of ImagePositionPatient on the slice normal (the cross product of
  the row and column directions in ImageOrientationPatient), never by file name or InstanceNumber. Voxel
  values are RescaleSlope * stored + RescaleIntercept (HU for CT). Array axes: z = slice (increasing along
  the normal), y = image row, x = image column. The affine maps (column, row, slice) to RAS mm:
  columns PixelSpacing[1] * row direction, PixelSpacing[0] * column direction, the mean step between
  consecutive slice positions, and the position of the first slice, converted from DICOM's LPS.

  Args:
    folder: directory whose files (hidden files and DICOMDIR skipped) are all DICOM.
    series_uid: read only this SeriesInstanceUID when the folder holds several.

  Raises:
    FileNotFoundError: no such folder.
    ValueError: no files, a non-DICOM file, several series without `series_uid`, a missing geometry tag
      (naming the file), orientations or slice sizes that differ, duplicate or unevenly spaced slices.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"DICOM series folder not found: {folder}")
  files = _list_files(folder)
  if not files:
    raise ValueError(f"no DICOM files in {folder} (the folder is empty).")
  slices = [(path, dcmread(path)) for path in files]

  uids = {}
  for path, ds in slices:
    uids.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(path)
  if series_uid is not None:
    if series_uid not in uids:
      raise ValueError(f"series {series_uid} not in {folder}; found {sorted(uids)}.")
    slices = [(p, ds) for p, ds in slices if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid]
  elif len(uids) > 1:
    summary = ", ".join(f"{uid or '<none>'} ({len(paths)} files, e.g. {os.path.basename(paths[0])})"
                        for uid, paths in sorted(uids.items()))
    raise ValueError(f"{folder} mixes {len(uids)} DICOM series: {summary}; pass series_uid= to pick one.")

  first_path, first = slices[0]
  orientation = np.asarray([float(v) for v in _tag(first, "ImageOrientationPatient", first_path)])
  if orientation.shape != (6,):
    raise ValueError(f"DICOM file {first_path}: ImageOrientationPatient must have 6 values, got {orientation}.")
  row_dir, col_dir = orientation[:3], orientation[3:]
  normal = np.cross(row_dir, col_dir)
  pixel_spacing = [float(v) for v in _tag(first, "PixelSpacing", first_path)]
  shape_2d = (int(_tag(first, "Rows", first_path)), int(_tag(first, "Columns", first_path)))

  records = []
  for path, ds in slices:
    this_orientation = np.asarray([float(v) for v in _tag(ds, "ImageOrientationPatient", path)])
    if this_orientation.shape != (6,) or not np.allclose(this_orientation, orientation, atol=1e-4):
      raise ValueError(f"inconsistent ImageOrientationPatient in {folder}: {path} has "
                       f"{this_orientation.tolist()}, {first_path} has {orientation.tolist()}.")
    this_spacing = [float(v) for v in _tag(ds, "PixelSpacing", path)]
    if not np.allclose(this_spacing, pixel_spacing, rtol=1e-4):
      raise ValueError(f"inconsistent PixelSpacing in {folder}: {path} has {this_spacing}, {first_path} has "
                       f"{pixel_spacing}.")
    position = np.asarray([float(v) for v in _tag(ds, "ImagePositionPatient", path)])
    if position.shape != (3,):
      raise ValueError(f"DICOM file {path}: ImagePositionPatient must have 3 values, got {position.tolist()}.")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
      raise ValueError(f"DICOM file {path} is multi-frame; read_dicom_series expects one slice per file.")
    pixels = read_pixels(ds, path)
    if pixels.shape != shape_2d:
      raise ValueError(f"DICOM file {path} has pixel shape {pixels.shape}, expected {shape_2d} (Rows, Columns) "
                       f"as in {first_path}.")
    records.append((float(position @ normal), position, path, rescale(pixels, ds)))

  records.sort(key=lambda r: r[0])
  depths = np.asarray([r[0] for r in records])
  steps = np.diff(depths)
  if steps.size and np.min(steps) <= 1e-3:
    i = int(np.argmin(steps))
    raise ValueError(f"DICOM files {records[i][2]} and {records[i + 1][2]} are at the same slice position "
                     f"{records[i][1].tolist()}; several series or time points in one folder?")
  if steps.size > 1 and np.max(np.abs(steps - np.median(steps))) > 0.01 * np.median(steps):
    raise ValueError(f"unevenly spaced slices in {folder}: gaps along the normal {np.round(steps, 4).tolist()} mm "
                     f"(missing slices?).")

  if len(records) > 1:
    slice_step = (records[-1][1] - records[0][1]) / (len(records) - 1)
  else:
    thickness = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
    slice_step = normal * thickness
  lps = np.eye(4)
  lps[:3, 0] = row_dir * pixel_spacing[1]  # column index -> along the row
  lps[:3, 1] = col_dir * pixel_spacing[0]  # row index -> down the column
  lps[:3, 2] = slice_step
  lps[:3, 3] = records[0][1]
  affine = LPS_TO_RAS @ lps
  array = np.stack([r[3] for r in records])  # (z, y, x)
  return Volume(array, spacing_from_affine(affine), affine)
