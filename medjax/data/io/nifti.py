"""NIfTI-1 and NIfTI-2 files (.nii, .nii.gz) through nibabel; the axis convention is in `medjax.data.io.volume`.

Headers that lie. nibabel quietly repairs some header fields on load: a zero voxel size (pixdim) becomes 1.0,
a negative one its absolute value; a file whose qform_code and sform_code are both 0 says nothing about
orientation, and nibabel then invents an affine (voxel sizes on the diagonal, x flipped, origin at the
volume centre). `read_nifti` checks the raw header fields: a zero, negative or NaN voxel size is an error,
a missing orientation a `GeometryWarning` (an error with strict=True).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np

from medjax import atomic
from medjax.data.io.volume import (GeometryWarning, PathLike, Volume, check_readable_file, from_nibabel_order,
                                  spacing_from_affine, to_nibabel_order)

SUFFIXES = (".nii.gz", ".nii")
# The world frame of a volume that carries no codes of its own (ITK, DICOM, arrays): scanner coordinates.
DEFAULT_XFORM_CODES = (1, 1)


def _raw_header(img, path: str):
  """The header as stored in the file, before nibabel's `check_fix` repairs (pixdim, codes) on load."""
  from nibabel.openers import ImageOpener

  with ImageOpener(path) as f:
    return type(img.header).from_fileobj(f, check=False)


def _check_pixdim(raw, path: str) -> None:
  """Raises ValueError naming the file when a spatial voxel size in the raw header is zero, negative or NaN."""
  num_spatial = int(min(max(int(raw["dim"][0]), 0), 3))
  pixdim = np.asarray(raw["pixdim"][1:1 + num_spatial], np.float64)
  if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
    values = tuple(float(p) for p in pixdim)
    raise ValueError(f"NIfTI file {path}: voxel spacing pixdim[1:{1 + num_spatial}] = {values} mm (x, y, z) holds "
                     "zero, negative or NaN values; nibabel would silently replace them (zero -> 1.0, negative -> "
                     "its absolute value). Fix the header's voxel size before using the file.")


def _check_orientation(header, affine: np.ndarray, path: str, strict: bool) -> None:
  """qform_code = sform_code = 0: no orientation in the file; warn (or raise) naming the affine assumed."""
  if int(header["sform_code"]) != 0 or int(header["qform_code"]) != 0:
    return
  diagonal = tuple(float(round(d, 6)) for d in np.diag(affine)[:3])
  if strict:
    raise ValueError(f"NIfTI file {path} has qform_code = sform_code = 0: no orientation (strict=True refuses "
                     f"it; without strict it is read with nibabel's fallback affine, diagonal {diagonal} (x, y, z) "
                     "mm, origin at the volume centre, and a GeometryWarning).")
  warnings.warn(f"NIfTI file {path} has qform_code = sform_code = 0 (no orientation): assumed nibabel's fallback "
                f"affine, the voxel sizes (pixdim) on the diagonal {diagonal} (x, y, z) mm (x flipped: LAS) with the "
                "origin at the volume centre; the world positions and left/right may be wrong.", GeometryWarning,
                stacklevel=3)


def read_nifti(path: PathLike, allow_channels: bool = False, strict: bool = False) -> Volume:
  """Reads a .nii / .nii.gz file (NIfTI-1 or -2) into a Volume.

  The stored dtype is kept unless the header sets a scaling (scl_slope/scl_inter), in which case nibabel's
  scaled values (float) are returned. Trailing axes of size 1 beyond the third (beyond the fourth with
  `allow_channels`) are dropped, so (I, J, K, 1) files read as 3D. The header's sform/qform codes travel
  with the Volume (`Volume.xform_codes`), so that `write_nifti` writes them back.

  Args:
    path: the file.
    allow_channels: accept a 4D file (I, J, K, C) and return array (z, y, x, C).
    strict: raise instead of warning when the header has no orientation (qform_code = sform_code = 0).

  Returns:
    Volume with array (z, y, x) or (z, y, x, C), spacing from the affine, the affine in nibabel's convention
    (sform when its code is set, else qform, else nibabel's fallback), xform_codes (sform_code, qform_code).

  Raises:
    FileNotFoundError: no such file.
    ValueError: empty or unreadable file, a dimensionality other than the one expected, a zero, negative or
      NaN voxel size (pixdim) in the header, or (strict) no orientation.

  Warns:
    GeometryWarning: qform_code = sform_code = 0; the message names the file and the affine assumed.
  """
  import nibabel as nib

  path = check_readable_file(path, "NIfTI")
  try:
    # mmap=False: the returned array must not keep the file open or change with it.
    img = nib.load(path, mmap=False)
    if not isinstance(img.header, nib.Nifti1Header):  # Nifti2Header derives from it
      raise ValueError(f"nibabel reads it as {type(img).__name__}, not NIfTI")
    raw = _raw_header(img, path)
  except Exception as e:  # nibabel raises several types (ImageFileError, EOFError, zlib errors, ...)
    raise ValueError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from e
  _check_pixdim(raw, path)
  affine = np.asarray(img.affine, np.float64)
  _check_orientation(img.header, affine, path, strict)
  codes = (int(img.header["sform_code"]), int(img.header["qform_code"]))
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:
    raise ValueError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from e
  keep = 4 if allow_channels else 3
  while data.ndim > keep and data.shape[-1] == 1:
    data = data[..., 0]
  expected = "a 3D image or 4D (I, J, K, C) channels" if allow_channels else "a 3D image"
  if data.ndim != 3 and not (allow_channels and data.ndim == 4):
    hint = "; pass allow_channels=True to read channels" if data.ndim == 4 and not allow_channels else ""
    raise ValueError(f"expected {expected}, got {data.ndim}D shape {tuple(data.shape)} in {path} (nibabel order "
                     f"x, y, z, ...{hint}).")
  return Volume(from_nibabel_order(data), spacing_from_affine(affine), affine, codes)


def write_nifti(path: PathLike, volume: Volume, nifti2: Optional[bool] = None) -> None:
  """Writes a Volume to .nii or .nii.gz atomically (a temp file in the same folder, then os.replace).

  Voxels and dtype are written as they are (no scaling). The affine goes to the sform (and, as far as a
  rigid transform can express it, the qform), with the volume's `xform_codes` (sform_code, qform_code), so
  that a file read and written again (or a prediction on its grid) keeps its codes; a volume without codes
  is written as "scanner" (1) for both. NIfTI-1 stores the sform as float32; when the float64 affine is not
  exactly representable in float32 the file is written as NIfTI-2 (float64 sform) instead, so that
  `read_nifti` returns the affine bit for bit. Affines read from NIfTI-1 files are always float32-exact, so
  read -> write keeps NIfTI-1 files NIfTI-1.

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
  if not (path.endswith(SUFFIXES)):
    raise ValueError(f"NIfTI path must end with .nii or .nii.gz, got {path}.")
  if not isinstance(volume, Volume):
    raise ValueError(f"write_nifti({path}) expects a Volume, got {type(volume).__name__}.")
  affine = volume.affine
  exact_in_float32 = np.array_equal(affine.astype(np.float32).astype(np.float64), affine)
  if nifti2 is None:
    nifti2 = not exact_in_float32
  image_cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
  sform_code, qform_code = volume.xform_codes or DEFAULT_XFORM_CODES
  data = to_nibabel_order(volume.array)
  try:
    # dtype= is explicit so nibabel keeps int64 and never picks another storage type.
    img = image_cls(data, affine, dtype=data.dtype)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)  # strips shears; readers use the sform first
    img.header.set_xyzt_units(xyz="mm", t="sec")
  except Exception as e:
    raise ValueError(f"cannot write {volume.array.dtype} volume of shape {volume.array.shape} as NIfTI "
                     f"{path}: {e}") from e
  atomic.write_atomically(path, lambda tmp: nib.save(img, tmp))
