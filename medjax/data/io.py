"""Reading and writing medical images: NIfTI (nibabel), DICOM series and single images (pydicom), PNG (PIL).

Axis convention. A `Volume` holds its voxels as a numpy array `(z, y, x)` or `(z, y, x, C)` (channels last,
as everywhere in medjax), with `spacing_mm` in the same order. Its `affine` is nibabel's: a 4x4 float64
matrix mapping voxel indices `(i, j, k, 1)` of the nibabel data array to RAS+ world millimetres. The two
orders are related by one transpose:

    volume.array == nibabel_data.transpose(2, 1, 0[, 3])      i.e.  array[z, y, x] == data[x, y, z]

so array axis 0 is nibabel's k, axis 1 is j, axis 2 is i, and a voxel at array index `(z, y, x)` lies at
world position `affine @ (x, y, z, 1)`. `spacing_mm[a]` is the length of the affine column of the nibabel
axis behind array axis `a`: `spacing_mm == (|affine[:3, 2]|, |affine[:3, 1]|, |affine[:3, 0]|)`. The
transpose is a pure relabelling, so NIfTI round trips are exact (voxels, dtype and the float64 affine; see
`write_nifti` for how the affine survives the format's float32 fields).

DICOM stores geometry in LPS patient coordinates; readers here convert to nibabel's RAS (negating world x
and y) so that every `Volume` shares one world frame.

This module uses numpy, nibabel, pydicom and PIL only (no jax): it runs on the host.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from medjax import atomic

PathLike = Union[str, os.PathLike]

# Affines of an image and its label may differ by float32 rounding of the header fields (plus tools that
# recompute them); anything beyond this, in mm, is a real misalignment.
AFFINE_ATOL = 1e-4
# Allowed relative disagreement between a Volume's spacing_mm and the column lengths of its affine.
_SPACING_RTOL = 1e-3
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
# LPS (DICOM) -> RAS (nibabel) flips world x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def spacing_from_affine(affine: np.ndarray) -> Tuple[float, ...]:
  """Voxel size in mm in array order (z, y, x): the lengths of the affine columns k, j, i."""
  affine = np.asarray(affine, np.float64)
  lengths = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))  # (i, j, k) = (x, y, z)
  return tuple(float(s) for s in lengths[::-1])


def affine_from_spacing(spacing_mm: Sequence[float], origin_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
  """Axis-aligned RAS affine for `spacing_mm` (z, y, x) and the world position `origin_mm` (x, y, z) of voxel 0."""
  spacing_mm = tuple(float(s) for s in spacing_mm)
  if len(spacing_mm) != 3:
    raise ValueError(f"spacing_mm must have 3 entries (z, y, x), got {spacing_mm}.")
  affine = np.eye(4)
  affine[:3, :3] = np.diag(spacing_mm[::-1])
  affine[:3, 3] = np.asarray(origin_mm, np.float64)
  return affine


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """A 3D image with its geometry.

  Attributes:
    array: numpy array (z, y, x) or (z, y, x, C), any dtype; the transpose of nibabel's data (module doc).
    spacing_mm: voxel size in mm, (z, y, x), consistent with the affine's column lengths.
    affine: (4, 4) float64, nibabel convention: voxel (x, y, z, 1) -> RAS+ world mm.
  """
  array: np.ndarray
  spacing_mm: Tuple[float, float, float]
  affine: np.ndarray

  def __post_init__(self):
    array = self.array
    if not isinstance(array, np.ndarray):
      array = np.asarray(array)
      object.__setattr__(self, "array", array)
    if array.ndim not in (3, 4):
      raise ValueError(f"Volume.array must be (z, y, x) or (z, y, x, C), got shape {array.shape}.")
    affine = np.array(self.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
      raise ValueError(f"Volume.affine must be a finite 4x4 matrix, got {affine!r}.")
    affine.setflags(write=False)  # shared by derived volumes; a frozen dataclass should not drift
    object.__setattr__(self, "affine", affine)
    spacing = tuple(float(s) for s in self.spacing_mm)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
      raise ValueError(f"Volume.spacing_mm must be 3 positive values (z, y, x), got {self.spacing_mm}.")
    expected = spacing_from_affine(affine)
    if not np.allclose(spacing, expected, rtol=_SPACING_RTOL, atol=1e-6):
      raise ValueError(f"Volume.spacing_mm {spacing} (z, y, x) disagrees with the affine's column lengths "
                       f"{expected}.")
    object.__setattr__(self, "spacing_mm", spacing)

  @classmethod
  def from_array(cls, array: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
                 affine: Optional[np.ndarray] = None) -> Volume:
    """A Volume from an array (z, y, x[, C]); without `affine`, an axis-aligned RAS one from `spacing_mm`."""
    if affine is None:
      affine = affine_from_spacing(spacing_mm)
    else:
      spacing_mm = spacing_from_affine(affine)
    return cls(np.asarray(array), tuple(spacing_mm), affine)

  @property
  def spatial_shape(self) -> Tuple[int, int, int]:
    """(z, y, x) in voxels."""
    return tuple(self.array.shape[:3])

  @property
  def num_channels(self) -> Optional[int]:
    """C for a (z, y, x, C) array, None for (z, y, x)."""
    return self.array.shape[3] if self.array.ndim == 4 else None

  def replace(self, **changes) -> Volume:
    return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------- NIfTI


def _to_nibabel_order(array: np.ndarray) -> np.ndarray:
  return array.transpose((2, 1, 0) + tuple(range(3, array.ndim)))


def _from_nibabel_order(data: np.ndarray) -> np.ndarray:
  array = np.ascontiguousarray(data.transpose((2, 1, 0) + tuple(range(3, data.ndim))))
  if not array.flags.writeable:
    array = array.copy()
  return array


def _check_readable_file(path: PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  if os.path.isdir(path):
    raise ValueError(f"expected a {what} file but {path} is a directory.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{what} file {path} is empty (0 bytes).")
  return path


def read_nifti(path: PathLike, allow_channels: bool = False) -> Volume:
  """Reads a .nii / .nii.gz file (NIfTI-1 or -2) into a Volume.

  The stored dtype is kept unless the header sets a scaling (scl_slope/scl_inter), in which case nibabel's
  scaled values (float) are returned. Trailing axes of size 1 beyond the third are dropped when
  `allow_channels` is False, so (I, J, K, 1) files read as 3D.

  Args:
    path: the file.
    allow_channels: accept a 4D file (I, J, K, C) and return array (z, y, x, C).

  Returns:
    Volume with array (z, y, x) or (z, y, x, C), spacing from the affine, the affine in nibabel's convention.

  Raises:
    FileNotFoundError: no such file.
    ValueError: empty or unreadable file, or a dimensionality other than the one expected.
  """
  import nibabel as nib

  path = _check_readable_file(path, "NIfTI")
  try:
    # mmap=False: the returned array must not keep the file open or change with it.
    img = nib.load(path, mmap=False)
    data = np.asanyarray(img.dataobj)
    affine = np.asarray(img.affine, np.float64)
  except Exception as e:  # nibabel raises several types (ImageFileError, EOFError, zlib errors, ...)
    raise ValueError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from e
  if not allow_channels:
    while data.ndim > 3 and data.shape[-1] == 1:
      data = data[..., 0]
  expected = "a 3D image or 4D (I, J, K, C) channels" if allow_channels else "a 3D image"
  if data.ndim != 3 and not (allow_channels and data.ndim == 4):
    hint = " (pass allow_channels=True to read channels)" if data.ndim == 4 else ""
    raise ValueError(f"expected {expected}, got {data.ndim}D shape {tuple(data.shape)} in {path}{hint}.")
  return Volume(_from_nibabel_order(data), spacing_from_affine(affine), affine)


def write_nifti(path: PathLike, volume: Volume, nifti2: Optional[bool] = None) -> None:
  """Writes a Volume to .nii or .nii.gz atomically (a temp file in the same folder, then os.replace).

  Voxels and dtype are written as they are (no scaling). The affine goes to the sform (and, as far as a
  rigid transform can express it, the qform), both with code "scanner". NIfTI-1 stores the sform as
  float32; when the float64 affine is not exactly representable in float32 the file is written as NIfTI-2
  (float64 sform) instead, so that `read_nifti` returns the affine bit for bit. Affines read from NIfTI-1
  files are always float32-exact, so read -> write keeps NIfTI-1 files NIfTI-1.

  Args:
    path: destination, .nii or .nii.gz (gzip).
    volume: the Volume to write.
    nifti2: None picks as above; False forces NIfTI-1 (for tools without NIfTI-2 support; the affine is
      then rounded to float32, an error of about 1e-5 mm at 300 mm); True forces NIfTI-2.

  Raises:
    ValueError: wrong suffix, or a dtype NIfTI cannot store (bool, float16, ...); nothing is written.
  """
  import nibabel as nib

  path = os.fspath(path)
  if not (path.endswith((".nii", ".nii.gz"))):
    raise ValueError(f"NIfTI path must end with .nii or .nii.gz, got {path}.")
  if not isinstance(volume, Volume):
    raise ValueError(f"write_nifti({path}) expects a Volume, got {type(volume).__name__}.")
  affine = volume.affine
  exact_in_float32 = np.array_equal(affine.astype(np.float32).astype(np.float64), affine)
  if nifti2 is None:
    nifti2 = not exact_in_float32
  image_cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
  data = _to_nibabel_order(volume.array)
  try:
    # dtype= is explicit so nibabel keeps int64 and never picks another storage type.
    img = image_cls(data, affine, dtype=data.dtype)
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")  # strips shears; readers use the sform first
    img.header.set_xyzt_units(xyz="mm", t="sec")
  except Exception as e:
    raise ValueError(f"cannot write {volume.array.dtype} volume of shape {volume.array.shape} as NIfTI "
                     f"{path}: {e}") from e
  atomic.write_atomically(path, lambda tmp: nib.save(img, tmp))


# ------------------------------------------------------------------------------------------- orientation


def orientation_codes(affine: np.ndarray) -> Tuple[str, str, str]:
  """Axis codes of nibabel's (i, j, k) = our (x, y, z) axes, e.g. ("R", "A", "S") or ("L", "P", "S")."""
  import nibabel as nib
  return tuple(nib.aff2axcodes(np.asarray(affine, np.float64)))


def to_canonical(volume: Volume) -> Tuple[Volume, Callable[[Union[Volume, np.ndarray]], Volume]]:
  """Reorients a volume to RAS+ (nibabel's i -> Right, j -> Anterior, k -> Superior) by flips and axis swaps.

  Only voxel order changes (no resampling): for an oblique affine each axis goes to the world direction it
  is closest to (nibabel.orientations.io_orientation). In our array order RAS means array axis 2 (x) runs
  left -> right, axis 1 (y) posterior -> anterior and axis 0 (z) inferior -> superior.

  Returns:
    (canonical, undo): `undo(v)` takes a Volume or an array (z', y', x'[, C]) in the canonical voxel grid
    (e.g. a predicted label map) and returns it in the original grid, as a Volume carrying the original
    affine. `undo(canonical)` gives back the input exactly (array and affine).
  """
  from nibabel import orientations as ornt_lib

  start = ornt_lib.io_orientation(volume.affine)
  transform = ornt_lib.ornt_transform(start, ornt_lib.axcodes2ornt(("R", "A", "S")))
  inverse = ornt_lib.ornt_transform(ornt_lib.axcodes2ornt(("R", "A", "S")), start)
  nib_shape = volume.spatial_shape[::-1]
  data = ornt_lib.apply_orientation(_to_nibabel_order(volume.array), transform)
  affine = volume.affine @ ornt_lib.inv_ornt_aff(transform, nib_shape)
  canonical = Volume(_from_nibabel_order(data), spacing_from_affine(affine), affine)
  original_affine = volume.affine
  original_spacing = volume.spacing_mm
  canonical_shape = canonical.spatial_shape

  def undo(v: Union[Volume, np.ndarray]) -> Volume:
    array = v.array if isinstance(v, Volume) else np.asarray(v)
    if tuple(array.shape[:3]) != canonical_shape:
      raise ValueError(f"to_canonical undo: expected spatial shape {canonical_shape} (z, y, x), got "
                       f"{tuple(array.shape)}.")
    back = ornt_lib.apply_orientation(_to_nibabel_order(array), inverse)
    return Volume(_from_nibabel_order(back), original_spacing, original_affine)

  return canonical, undo


# ------------------------------------------------------------------------------------------------- DICOM


def _dcmread(path: str):
  import pydicom
  from pydicom.errors import InvalidDicomError

  path = _check_readable_file(path, "DICOM")
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


def _pixels(ds, path: str) -> np.ndarray:
  if "PixelData" not in ds:
    raise ValueError(f"DICOM file {path} has no PixelData.")
  try:
    return np.asarray(ds.pixel_array)
  except Exception as e:  # compressed transfer syntaxes need optional decoders
    raise ValueError(f"cannot decode the pixels of DICOM file {path}: {type(e).__name__}: {e}") from e


def _rescale(pixels: np.ndarray, ds) -> np.ndarray:
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
  slices = [(path, _dcmread(path)) for path in files]

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
    pixels = _pixels(ds, path)
    if pixels.shape != shape_2d:
      raise ValueError(f"DICOM file {path} has pixel shape {pixels.shape}, expected {shape_2d} (Rows, Columns) "
                       f"as in {first_path}.")
    records.append((float(position @ normal), position, path, _rescale(pixels, ds)))

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
  affine = _LPS_TO_RAS @ lps
  array = np.stack([r[3] for r in records])  # (z, y, x)
  return Volume(array, spacing_from_affine(affine), affine)


# ---------------------------------------------------------------------------------------------------- 2D


def read_image_2d(path: PathLike) -> Tuple[np.ndarray, Tuple[float, float]]:
  """Reads a single 2D image: PNG/JPEG/TIFF/BMP (PIL) by suffix, anything else as one DICOM file.

  Returns:
    (array, spacing_mm): array (y, x) for grey or (y, x, C) for colour; spacing_mm (y, x) in mm.
    DICOM: float32 after RescaleSlope/Intercept when the file has them, else the stored dtype; spacing
    from PixelSpacing, else ImagerPixelSpacing (radiographs), else (1, 1). MONOCHROME1 is not inverted.
    PIL: the stored dtype (palette images are expanded to RGB/RGBA); spacing from the file's DPI
    (25.4 / dpi), else (1, 1).

  Raises:
    FileNotFoundError: no such file.  ValueError: empty, unreadable, multi-frame or not 2D.
  """
  path = _check_readable_file(path, "image")
  if path.lower().endswith(_PIL_SUFFIXES):
    from PIL import Image
    try:
      with Image.open(path) as img:
        if img.mode == "P":
          img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        array = np.array(img)
        dpi = img.info.get("dpi")
    except Exception as e:
      raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
    if dpi and all(float(d) > 0 for d in dpi):
      spacing = (25.4 / float(dpi[1]), 25.4 / float(dpi[0]))  # PIL gives (x, y) dpi
    else:
      spacing = (1.0, 1.0)
    return array, spacing

  ds = _dcmread(path)
  if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
    raise ValueError(f"DICOM file {path} has {ds.NumberOfFrames} frames; read_image_2d expects one.")
  array = _pixels(ds, path)
  if array.ndim not in (2, 3):
    raise ValueError(f"DICOM file {path} has pixel shape {array.shape}; expected (y, x) or (y, x, C).")
  if "RescaleSlope" in ds or "RescaleIntercept" in ds:
    array = _rescale(array, ds)
  spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
  spacing = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
  return array, spacing


# ---------------------------------------------------------------------------------------------- checks


def check_pair(image: Volume, label: Volume, name: str, atol: float = AFFINE_ATOL) -> None:
  """Raises ValueError naming case `name` if image and label differ in spatial shape or affine (> atol mm)."""
  if image.spatial_shape != label.spatial_shape:
    raise ValueError(f"case {name}: image spatial shape {image.spatial_shape} (z, y, x) differs from label "
                     f"shape {label.spatial_shape}.")
  diff = float(np.max(np.abs(image.affine - label.affine)))
  if diff > atol:
    raise ValueError(f"case {name}: image and label affines differ by up to {diff:.3g} (> {atol:g}):\n"
                     f"image\n{image.affine}\nlabel\n{label.affine}")


def check_finite(array: np.ndarray, name: str) -> None:
  """Raises ValueError naming `name` if a floating-point array holds NaN or inf voxels."""
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.inexact):
    return  # integers cannot hold NaN/inf
  finite = np.isfinite(array)
  if finite.all():
    return
  bad = np.argwhere(~finite)
  num_nan = int(np.count_nonzero(np.isnan(array)))
  num_inf = int(bad.shape[0]) - num_nan
  raise ValueError(f"{name}: {num_nan} NaN and {num_inf} inf voxels of {array.size} "
                   f"(first at index {tuple(int(i) for i in bad[0])}).")
