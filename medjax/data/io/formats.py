"""One way in and out for every 3D image format: `read_image` / `write_image` pick the reader or writer by suffix.

  .nii, .nii.gz                NIfTI-1/2 (nibabel; `medjax.data.io.nifti`)
  .nrrd, .nhdr, .mha, .mhd     NRRD and MetaImage (SimpleITK; `medjax.data.io.itk`)
  a folder                     one DICOM series (pydicom; `medjax.data.io.dicom`), read only

Suffixes are matched as written (lower case). Every reader returns a `Volume` in the same RAS world frame,
so a case may mix formats (an .nrrd image with a .nii.gz label): `check_pair` compares their geometry.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

from medjax.data.io import dicom, itk, nifti
from medjax.data.io.volume import GeometryWarning, PathLike, Volume

NIFTI_SUFFIXES = nifti.SUFFIXES
ITK_SUFFIXES = itk.SUFFIXES
# ".nii.gz" before ".nii": the longer suffix wins.
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_WHAT = f"{', '.join(IMAGE_SUFFIXES)} files"


def image_suffix(path: PathLike) -> Optional[str]:
  """The supported suffix `path`'s file name ends with (one of IMAGE_SUFFIXES), or None."""
  name = os.path.basename(os.fspath(path))
  for suffix in IMAGE_SUFFIXES:
    if name.endswith(suffix) and len(name) > len(suffix):
      return suffix
  return None


def image_stem(path: PathLike) -> Optional[str]:
  """The file name without its supported suffix ("case_01.nii.gz" -> "case_01"), or None for another suffix."""
  suffix = image_suffix(path)
  return None if suffix is None else os.path.basename(os.fspath(path))[: -len(suffix)]


def list_images(folder: PathLike) -> Dict[str, str]:
  """{case name: path} of the image files in `folder` (sorted by name; hidden files and other suffixes
  skipped; a detached header's data file has no image suffix). Raises ValueError naming both files when two
  files give the same case name (`a.nii.gz` and `a.nrrd`)."""
  folder = os.fspath(folder)
  found: Dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    stem = image_stem(name)
    if stem is None or name.startswith(".") or not os.path.isfile(os.path.join(folder, name)):
      continue
    if stem in found:
      raise ValueError(f"{folder} holds two image files for case {stem!r}: {os.path.basename(found[stem])} and "
                       f"{name}; keep one.")
    found[stem] = os.path.join(folder, name)
  return found


def image_files(path: PathLike) -> List[str]:
  """Every file an image is read from: the file, plus the data file(s) a .nhdr / .mhd header names; for a
  DICOM folder its files (sorted). For cache keys that must change when any of them does."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
  if image_suffix(path) in ITK_SUFFIXES:
    return [path] + itk.data_files(path)
  return [path]


def read_image(path: PathLike, *, allow_channels: bool = False, strict: bool = False) -> Volume:
  """Reads a NIfTI, NRRD or MetaImage file (by suffix) or a folder holding one DICOM series into a Volume.

  Args:
    path: a file with one of IMAGE_SUFFIXES, or a DICOM folder.
    allow_channels: accept channels (4D NIfTI, vector pixels or 4D ITK images) as array (z, y, x, C);
      otherwise only (z, y, x) (trailing axes of size 1 dropped). A DICOM series is always 3D.
    strict: a header that states no orientation is an error instead of a `GeometryWarning` (NIfTI
      qform/sform codes 0, NRRD without 'space', ...; for DICOM every GeometryWarning becomes an error).

  Returns:
    Volume: array (z, y, x[, C]) in the stored dtype, affine voxel (x, y, z, 1) -> RAS+ mm, spacing_mm (z, y, x).

  Raises:
    FileNotFoundError: no such file or folder.
    ValueError: an unsupported suffix (the message names the supported ones), or the reader's error.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"image not found: {path}")
  if os.path.isdir(path):
    return _read_dicom(path, strict)
  suffix = image_suffix(path)
  if suffix in NIFTI_SUFFIXES:
    return nifti.read_nifti(path, allow_channels=allow_channels, strict=strict)
  if suffix in ITK_SUFFIXES:
    return itk.read_itk(path, allow_channels=allow_channels, strict=strict)
  raise ValueError(f"cannot read {path}: unsupported file type; read_image reads {_WHAT} and folders holding one "
                   "DICOM series.")


def _read_dicom(path: str, strict: bool) -> Volume:
  if not strict:
    return dicom.read_dicom_series(path)
  # catch_warnings changes process-wide filters; only strict DICOM reads pay for that.
  with warnings.catch_warnings():
    warnings.simplefilter("error", GeometryWarning)
    try:
      return dicom.read_dicom_series(path)
    except GeometryWarning as w:
      raise ValueError(f"DICOM series {path}: {w} (strict=True refuses what would be a GeometryWarning).") from None


def write_image(path: PathLike, volume: Volume) -> None:
  """Writes a Volume as NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd), by suffix, atomically
  (`write_nifti`, `write_itk`: exact voxels, dtype and affine; NIfTI keeps `volume.xform_codes`).

  Raises:
    ValueError: an unsupported suffix (DICOM is not written), or the writer's error; nothing is written.
  """
  path = os.fspath(path)
  suffix = image_suffix(path)
  if suffix in NIFTI_SUFFIXES:
    nifti.write_nifti(path, volume)
  elif suffix in ITK_SUFFIXES:
    itk.write_itk(path, volume)
  else:
    raise ValueError(f"cannot write {path}: unsupported file type; write_image writes {_WHAT} (DICOM writing is "
                     "not supported).")
