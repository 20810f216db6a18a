"""The first name of `medjax.data.datasets.image_folder`, which reads NRRD and MetaImage cases as well as NIfTI.

The dataset is registered under both names ("image_folder", "nifti_folder": the same builder); this module
keeps imports of the old one working. New code imports `image_folder`.
"""

from __future__ import annotations

from medjax.data.datasets.image_folder import (LAYOUT, RESERVED, SUFFIXES, ImageFolderDataset, NiftiFolderDataset,
                                               image_folder, nifti_folder, read_csv)

__all__ = ["LAYOUT", "RESERVED", "SUFFIXES", "ImageFolderDataset", "NiftiFolderDataset", "image_folder", "nifti_folder",
           "read_csv"]
