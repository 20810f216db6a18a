"""ITK image formats through SimpleITK: NRRD (.nrrd, detached .nhdr) and MetaImage (.mha, detached .mhd).

Geometry. ITK maps a voxel index (i, j, k) = (x, y, z) to the LPS physical point

    p_LPS = origin + direction @ (spacing * index)

and a `Volume`'s affine maps (x, y, z, 1) to RAS+ (`medjax.data.io.volume`), so

    affine = LPS_TO_RAS @ [[direction @ diag(spacing), origin], [0, 0, 0, 1]]     (LPS_TO_RAS = diag(-1, -1, 1, 1))

exactly, in float64, both ways. SimpleITK's arrays are already in our order (z, y, x[, C]), so no transpose is
needed. Pixel types are kept (int8 ... uint64, float32, float64); vector pixels (NRRD "vector"/"list" axes,
MetaImage ElementNumberOfChannels) become channels (z, y, x, C), and so does the fourth axis of a 4D scalar
image, as for NIfTI. A one-component vector image is a scalar image to ITK, so it reads as (z, y, x).

Detached headers (.nhdr, .mhd) name their voxel file(s) (`data_files`); `write_itk` writes the data first and
the header last (see there), and datasets stamp every file of an image so their caches notice a changed voxel
file behind an unchanged header.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Callable, Dict, List, Tuple

import numpy as np

from medjax import atomic
from medjax.data.io.volume import (LPS_TO_RAS, GeometryWarning, PathLike, Volume, check_readable_file,
                                  spacing_from_affine)

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DETACHED_SUFFIXES = (".nhdr", ".mhd")
# Refused by read_itk: nibabel reads NIfTI (sform/qform codes, header checks), and DICOM series have their reader.
_NOT_ITK = (".nii", ".nii.gz", ".dcm")
_HEADER_CHUNK = 1 << 16
_MAX_HEADER_BYTES = 1 << 20


def _header_complete(head: bytes) -> bool:
  """Whether `head` reaches the end of a header: a NRRD blank line or a MetaImage ElementDataFile line
  (whose LIST of names may go on: callers then read on)."""
  if head.startswith(b"NRRD"):
    return b"\n\n" in head or b"\n\r\n" in head
  end = head.find(b"ElementDataFile")
  return end >= 0 and b"LIST" not in head[end:head.find(b"\n", end)]


def _suffix(path: str) -> str:
  name = os.path.basename(path).lower()
  return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def _itk_error(e: Exception) -> str:
  """The useful part of a SimpleITK exception: the lines from the first 'ERROR' on, on one line."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  for n, line in enumerate(lines):
    if "ERROR" in line:
      return " ".join(lines[n:])
  return " ".join(lines) or type(e).__name__


# ----------------------------------------------------------------------------------------------- headers


def read_header(path: PathLike) -> Dict[str, str]:
  """The text header of a NRRD / MetaImage file as {field: value} (NRRD fields lower-cased, MetaImage keys as
  written), plus "_lines": the lines after the data-file field, which a "LIST" data file uses. Reads at most
  1 MiB and stops where attached voxel data begins."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(_HEADER_CHUNK)
    if len(head) == _HEADER_CHUNK and not _header_complete(head):  # a long LIST of data files
      head += f.read(_MAX_HEADER_BYTES - _HEADER_CHUNK)
  lines = head.decode("latin-1").split("\n")
  fields: Dict[str, str] = {}
  nrrd = lines[0].startswith("NRRD")
  for n, line in enumerate(lines[1:] if nrrd else lines, start=1 if nrrd else 0):
    line = line.rstrip("\r")
    if nrrd:
      if not line:  # a blank line ends a NRRD header; attached data follows
        break
      if line.startswith("#") or ":" not in line:
        continue
      key, value = line.split(":", 1)
      fields[key.strip().lower()] = value.lstrip("=").strip()
      if key.strip().lower() in ("data file", "datafile"):
        fields["_lines"] = "\n".join(x.strip() for x in lines[n + 1:] if x.strip())
        break
    else:
      if "=" not in line:
        break
      key, value = line.split("=", 1)
      fields[key.strip()] = value.strip()
      if key.strip() == "ElementDataFile":  # always the last MetaImage field; binary data may follow
        fields["_lines"] = "\n".join(x.strip() for x in lines[n + 1:] if x.strip())
        break
  return fields


def _expand(spec: str, rest: str, folder: str) -> List[str]:
  """Data file names of a header's data-file field: one name, "LIST" (one per following line), or a
  printf pattern with min max step."""
  parts = spec.split()
  if not parts or parts[0].upper() == "LOCAL":
    return []
  if parts[0].upper() == "LIST":
    names = rest.split("\n") if rest else []
  elif "%" in parts[0] and len(parts) >= 4:
    first, last, step = (int(p) for p in parts[1:4])
    names = [parts[0] % i for i in range(first, last + (1 if step > 0 else -1), step)]
  else:
    names = [spec]
  return [n if os.path.isabs(n) else os.path.join(folder, n) for n in names]


def data_files(path: PathLike) -> List[str]:
  """The separate voxel files a NRRD / MetaImage header names (relative names joined to the header's folder as
  `path` gives it), [] when the data is attached (.nrrd, .mha normally are). Not checked for existence.
  Raises OSError for an unreadable file, ValueError for a malformed file-name pattern."""
  path = os.fspath(path)
  fields = read_header(path)
  folder = os.path.dirname(path)
  spec = fields.get("ElementDataFile", fields.get("data file", fields.get("datafile")))
  try:
    return [] if spec is None else _expand(spec, fields.get("_lines", ""), folder)
  except (ValueError, TypeError) as e:  # a malformed file-name pattern
    raise ValueError(f"{path}: cannot parse the data file field {spec!r}: {e}") from None


def _orientation_missing(path: str, reader) -> str:
  """Why the file states no patient orientation ('' when it does)."""
  io_name = reader.GetMetaData("ITK_InputFilterName") if reader.HasMetaDataKey("ITK_InputFilterName") else ""
  # 'space dimension' with 'space directions' but no named 'space' is how ITK itself writes a 4D NRRD: the
  # directions are given. Only a file without directions states nothing about orientation.
  nrrd_unnamed = io_name == "NrrdImageIO" and not reader.HasMetaDataKey("NRRD_space")
  if nrrd_unnamed and "space directions" not in read_header(path):
    return "no 'space' or 'space directions' field (no patient orientation)"
  if io_name == "MetaImageIO":
    keys = set(read_header(path))
    if not keys & {"TransformMatrix", "Rotation", "Orientation", "AnatomicalOrientation"}:
      return "no TransformMatrix / AnatomicalOrientation (no patient orientation)"
  return ""


# ------------------------------------------------------------------------------------------------- read


def read_itk(path: PathLike, allow_channels: bool = False, strict: bool = False) -> Volume:
  """Reads a NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, or another format SimpleITK reads, into a Volume.

  Args:
    path: the file (for .nhdr / .mhd the header; its data file(s) beside it).
    allow_channels: accept vector pixels or a 4D scalar image and return array (z, y, x, C).
    strict: raise instead of warning when the header states no orientation (a NRRD without 'space', a
      MetaImage without TransformMatrix): ITK then assumes the voxel axes are the LPS axes.

  Returns:
    Volume with array (z, y, x) or (z, y, x, C) in the file's dtype, the affine LPS_TO_RAS @ ITK's
    index-to-LPS matrix (module doc), spacing_mm its column lengths (z, y, x); xform_codes None.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a NIfTI / DICOM suffix (use their readers), an empty or unreadable file (ITK's message,
      e.g. a missing data file or zero spacing), a dimensionality other than the one expected, a
      non-positive or NaN spacing, or (strict) no orientation.

  Warns:
    GeometryWarning: no orientation in the header; the message names the file and the geometry assumed.
  """
  import SimpleITK as sitk  # noqa: N813  (the name its documentation uses)

  path = check_readable_file(path, "ITK image")
  if _suffix(path) in _NOT_ITK:
    raise ValueError(f"read_itk does not read {path}: NIfTI goes through read_nifti and DICOM through "
                     "read_dicom_series (or read_image for either).")
  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    image = reader.Execute()
  except RuntimeError as e:
    raise ValueError(f"cannot read image file {path}: {_itk_error(e)}") from None
  dim, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
  array = sitk.GetArrayFromImage(image)  # (z, y, x[, C]), or (t, z, y, x) for a 4D scalar image
  if dim == 4 and components == 1:
    array = np.moveaxis(array, 0, -1)
  elif dim != 3:
    array = None
  if array is not None and not allow_channels and array.ndim == 4 and array.shape[-1] == 1:
    array = array[..., 0]
  if array is None or (array.ndim == 4 and not allow_channels):
    expected = "a 3D image or 3D channels (vector pixels / a 4D image)" if allow_channels else "a 3D scalar image"
    hint = "; pass allow_channels=True to read channels" if array is not None else ""
    raise ValueError(f"expected {expected}, got a {dim}D image of size {image.GetSize()} (x, y, z, ...) with "
                     f"{components} component(s) per pixel in {path}{hint}.")
  spacing = np.asarray(image.GetSpacing()[:3], np.float64)
  if not np.all(np.isfinite(spacing) & (spacing > 0)):
    raise ValueError(f"image file {path}: voxel spacing {tuple(float(s) for s in spacing)} mm (x, y, z) holds "
                     "zero, negative or NaN values.")
  direction = np.asarray(image.GetDirection(), np.float64).reshape(dim, dim)[:3, :3]
  lps = np.eye(4)
  lps[:3, :3] = direction * spacing[None, :]  # direction @ diag(spacing)
  lps[:3, 3] = image.GetOrigin()[:3]
  affine = LPS_TO_RAS @ lps
  missing = _orientation_missing(path, reader)
  if missing:
    assumed = (f"the voxel axes mapped to LPS by direction {direction.round(6).tolist()}, origin "
               f"{tuple(float(o) for o in lps[:3, 3])} mm")
    if strict:
      raise ValueError(f"image file {path} has {missing} (strict=True refuses it; without strict it is read "
                       f"with {assumed} and a GeometryWarning).")
    warnings.warn(f"image file {path} has {missing}: assumed {assumed}, as ITK reads it; world positions and "
                  "left/right may be wrong.", GeometryWarning, stacklevel=2)
  try:
    return Volume(np.ascontiguousarray(array), spacing_from_affine(affine), affine)
  except ValueError as e:
    raise ValueError(f"image file {path}: {e}") from None


# ------------------------------------------------------------------------------------------------ write


def to_sitk(volume: Volume):
  """A SimpleITK image with `volume`'s voxels (channels as vector pixels), dtype and geometry (module doc).

  Raises TypeError for a dtype SimpleITK cannot hold (bool, float16, ...)."""
  import SimpleITK as sitk  # noqa: N813  (the name its documentation uses)

  image = sitk.GetImageFromArray(volume.array, isVector=volume.array.ndim == 4)
  origin, spacing, direction = geometry(volume)
  image.SetSpacing(spacing)
  image.SetDirection(direction)
  image.SetOrigin(origin)
  return image


def geometry(volume: Volume) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
  """(origin, spacing, direction) as SimpleITK's LPS Get/SetOrigin, Get/SetSpacing, Get/SetDirection (x, y, z
  order; direction row-major 3x3) for `volume`'s affine."""
  lps = LPS_TO_RAS @ volume.affine
  spacing = np.sqrt(np.sum(lps[:3, :3] ** 2, axis=0))  # (x, y, z); the affine is exact, spacing_mm rounded
  return (tuple(float(o) for o in lps[:3, 3]), tuple(float(s) for s in spacing),
          tuple(float(d) for d in (lps[:3, :3] / spacing[None, :]).ravel()))


def _fsync(path: str) -> None:
  with open(path, "rb+") as f:
    os.fsync(f.fileno())


def _write_detached(path: str, write: Callable[[str], None]) -> None:
  """Writes header + data file(s) of a .nhdr / .mhd: `write(header_path)` into a temp folder beside `path`, then
  the data files renamed into place, the header last.

  The header names its data files and is what readers open, so the order means a reader never finds a new
  header without its data. A previous header at `path` is removed before the new data arrive, so no reader
  pairs an old header with new data; a crash in between leaves no header (the image is missing, never
  wrong). A data file of the previous header that the new one no longer names (a .raw where compression
  now writes a .zraw) is left in place: another header may name it too.
  """
  folder = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  tmp_dir = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
  try:
    write(os.path.join(tmp_dir, name))
    written = sorted(os.listdir(tmp_dir))
    for f in written:
      _fsync(os.path.join(tmp_dir, f))
    if os.path.isfile(path):
      os.remove(path)
    for f in written:
      if f != name:
        os.replace(os.path.join(tmp_dir, f), os.path.join(folder, f))
    os.replace(os.path.join(tmp_dir, name), path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def write_itk(path: PathLike, volume: Volume, compress: bool = True) -> None:
  """Writes a Volume as NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd), atomically.

  Voxels, dtype and geometry are written exactly (module doc; `read_itk` gives back the array and the affine
  to float64 rounding). Channels (z, y, x, C) become vector pixels. `volume.xform_codes` has no place in
  these formats (their world frame is the scanner's LPS) and is not written.

  .nrrd / .mha are one file, written to a temp file in the same folder and renamed (`atomic`). .nhdr / .mhd
  write a header and a data file (.raw / .raw.gz for NRRD, .raw / .zraw for MetaImage, named after the
  header): the data file is renamed into place first and the header last (`_write_detached`).

  Args:
    path: destination; the suffix picks the format.
    volume: the Volume to write.
    compress: gzip (NRRD) / zlib (MetaImage) the voxels.

  Raises:
    ValueError: another suffix, or a dtype ITK cannot store (bool, float16, ...); nothing is written.
  """
  import SimpleITK as sitk  # noqa: N813  (the name its documentation uses)

  path = os.fspath(path)
  suffix = _suffix(path)
  if suffix not in SUFFIXES or not path.endswith(suffix):
    raise ValueError(f"ITK image path must end with one of {', '.join(SUFFIXES)}, got {path}.")
  if not isinstance(volume, Volume):
    raise ValueError(f"write_itk({path}) expects a Volume, got {type(volume).__name__}.")
  try:
    image = to_sitk(volume)
  except (TypeError, RuntimeError) as e:
    raise ValueError(f"cannot write {volume.array.dtype} volume of shape {volume.array.shape} as {path}: "
                     f"{_itk_error(e)}") from e

  def write(target: str) -> None:
    try:
      sitk.WriteImage(image, target, useCompression=compress)
    except RuntimeError as e:
      raise ValueError(f"cannot write {path}: {_itk_error(e)}") from None

  if suffix in DETACHED_SUFFIXES:
    _write_detached(path, write)
  else:
    atomic.write_atomically(path, write)

