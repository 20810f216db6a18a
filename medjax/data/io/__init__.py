"""Reading and writing medical images: NIfTI (nibabel), DICOM (pydicom), ITK formats (SimpleITK), 2D images (PIL).

Every 3D reader returns a `Volume` (`medjax.data.io.volume`: the axis convention and the RAS world frame).
Modules: `volume` (Volume, orientation, checks), `nifti`, `itk` (NRRD, MetaImage), `dicom`, `image2d`, and
`formats`: `read_image` / `write_image`, one entry point that picks the format by suffix.
"""

from medjax.data.io.volume import (AFFINE_ATOL, GeometryWarning, PathLike, Volume, affine_from_spacing, check_finite,
                                  check_pair, orientation_codes, spacing_from_affine, to_canonical)
from medjax.data.io.nifti import read_nifti, write_nifti
from medjax.data.io.itk import read_itk, write_itk
from medjax.data.io.dicom import list_dicom_series, read_dicom, read_dicom_series
from medjax.data.io.image2d import read_image_2d
from medjax.data.io.formats import (IMAGE_SUFFIXES, image_files, image_stem, image_suffix, list_images, read_image,
                                   write_image)

__all__ = ["AFFINE_ATOL", "IMAGE_SUFFIXES", "GeometryWarning", "PathLike", "Volume", "affine_from_spacing",
           "check_finite", "check_pair", "image_files", "image_stem", "image_suffix", "list_dicom_series",
           "list_images", "orientation_codes", "read_dicom", "read_dicom_series", "read_image", "read_image_2d",
           "read_itk", "read_nifti", "spacing_from_affine", "to_canonical", "write_image", "write_itk", "write_nifti"]
