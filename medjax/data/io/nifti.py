"""NIfTI-1 and NIfTI-2 files (.nii, .nii.gz) through nibabel; the axis convention is in `medjax.data.io.volume`."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from medjax import atomic
from medjax.data.io.volume import (PathLike, Volume, check_readable_file, from_nibabel_order, spacing_from_affine,
                                  to_nibabel_order)


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

  path = check_readable_file(path, "NIfTI")
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
  return Volume(from_nibabel_order(data), spacing_from_affine(affine), affine)


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
  data = to_nibabel_order(volume.array)
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
