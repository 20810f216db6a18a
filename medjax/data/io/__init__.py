"""Reading and writing medical images: NIfTI (nibabel), DICOM (pydicom), ITK formats (SimpleITK), 2D images (PIL).

Every 3D reader returns a `Volume` (`medjax.data.io.volume`: the axis convention and the RAS world frame).
Modules: `volume` (Volume, orientation, checks), `nifti`, `dicom`, `image2d`.
"""

from medjax.data.io.volume import (AFFINE_ATOL, GeometryWarning, PathLike, Volume, affine_from_spacing, check_finite,
                                  check_pair, orientation_codes, spacing_from_affine, to_canonical)
from medjax.data.io.nifti import read_nifti, write_nifti
from medjax.data.io.dicom import read_dicom_series
from medjax.data.io.image2d import read_image_2d

__all__ = ["AFFINE_ATOL", "GeometryWarning", "PathLike", "Volume", "affine_from_spacing", "check_finite", "check_pair",
           "orientation_codes", "read_dicom_series", "read_image_2d", "read_nifti", "spacing_from_affine",
           "to_canonical", "write_nifti"]
