"""The `Volume` (voxels with their geometry), orientation, and the checks every reader shares.

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

DICOM and the ITK formats (NRRD, MetaImage) store geometry in LPS patient coordinates; readers here convert to
nibabel's RAS (negating world x and y, `LPS_TO_RAS`) so that every `Volume` shares one world frame.

The package uses numpy, nibabel, pydicom, SimpleITK and PIL only (no jax): it runs on the host.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# Affines of an image and its label may differ by float32 rounding of the header fields (plus tools that
# recompute them); anything beyond this, in mm, is a real misalignment.
AFFINE_ATOL = 1e-4
# Allowed relative disagreement between a Volume's spacing_mm and the column lengths of its affine.
_SPACING_RTOL = 1e-3
# LPS (DICOM, ITK) -> RAS (nibabel) flips world x and y; the matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# NIfTI sform/qform codes (nibabel.nifti1.xform_codes): unknown, scanner, aligned, talairach, mni, template.
XFORM_CODES = (0, 1, 2, 3, 4, 5)


class GeometryWarning(UserWarning):
  """A file's geometry was accepted with an assumption (rounded slice positions, no orientation in the
  header, ...); the message names the file and what was assumed. `warnings.simplefilter("error",
  GeometryWarning)` turns every such case into an error."""


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
    xform_codes: (sform_code, qform_code) of the NIfTI header the volume was read from (0 unknown,
      1 scanner, 2 aligned, 3 talairach, 4 mni, 5 template), so that a volume written back (or a prediction
      on its grid) says the same thing about its world frame; None when the source had no such codes
      (ITK formats, DICOM, arrays): `write_nifti` then writes 1 ("scanner") for both.
  """
  array: np.ndarray
  spacing_mm: Tuple[float, float, float]
  affine: np.ndarray
  xform_codes: Optional[Tuple[int, int]] = None

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
    if self.xform_codes is not None:
      codes = tuple(self.xform_codes) if isinstance(self.xform_codes, (tuple, list)) else ()
      valid = [isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c in XFORM_CODES for c in codes]
      if len(codes) != 2 or not all(valid):
        raise ValueError(f"Volume.xform_codes must be None or (sform_code, qform_code), each one of "
                         f"{XFORM_CODES}, got {self.xform_codes!r}.")
      object.__setattr__(self, "xform_codes", tuple(int(c) for c in codes))

  @classmethod
  def from_array(cls, array: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
                 affine: Optional[np.ndarray] = None, xform_codes: Optional[Tuple[int, int]] = None) -> Volume:
    """A Volume from an array (z, y, x[, C]); without `affine`, an axis-aligned RAS one from `spacing_mm`."""
    if affine is None:
      affine = affine_from_spacing(spacing_mm)
    else:
      spacing_mm = spacing_from_affine(affine)
    return cls(np.asarray(array), tuple(spacing_mm), affine, xform_codes)

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


def to_nibabel_order(array: np.ndarray) -> np.ndarray:
  return array.transpose((2, 1, 0) + tuple(range(3, array.ndim)))


def from_nibabel_order(data: np.ndarray) -> np.ndarray:
  array = np.ascontiguousarray(data.transpose((2, 1, 0) + tuple(range(3, data.ndim))))
  if not array.flags.writeable:
    array = array.copy()
  return array


def check_readable_file(path: PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  if os.path.isdir(path):
    raise ValueError(f"expected a {what} file but {path} is a directory.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{what} file {path} is empty (0 bytes).")
  return path


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
    affine and xform_codes. `undo(canonical)` gives back the input exactly (array and affine). Both
    volumes keep the input's `xform_codes`: reorienting changes the voxel order, not the world frame.
  """
  from nibabel import orientations as ornt_lib

  start = ornt_lib.io_orientation(volume.affine)
  transform = ornt_lib.ornt_transform(start, ornt_lib.axcodes2ornt(("R", "A", "S")))
  inverse = ornt_lib.ornt_transform(ornt_lib.axcodes2ornt(("R", "A", "S")), start)
  nib_shape = volume.spatial_shape[::-1]
  data = ornt_lib.apply_orientation(to_nibabel_order(volume.array), transform)
  affine = volume.affine @ ornt_lib.inv_ornt_aff(transform, nib_shape)
  canonical = Volume(from_nibabel_order(data), spacing_from_affine(affine), affine, volume.xform_codes)
  original_affine = volume.affine
  original_spacing = volume.spacing_mm
  canonical_shape = canonical.spatial_shape

  def undo(v: Union[Volume, np.ndarray]) -> Volume:
    array = v.array if isinstance(v, Volume) else np.asarray(v)
    if tuple(array.shape[:3]) != canonical_shape:
      raise ValueError(f"to_canonical undo: expected spatial shape {canonical_shape} (z, y, x), got "
                       f"{tuple(array.shape)}.")
    back = ornt_lib.apply_orientation(to_nibabel_order(array), inverse)
    return Volume(from_nibabel_order(back), original_spacing, original_affine, volume.xform_codes)

  return canonical, undo


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
