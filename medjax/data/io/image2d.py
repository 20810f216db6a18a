"""Single 2D images: PNG/JPEG/TIFF/BMP through PIL, anything else as one DICOM file."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from medjax.data.io import dicom
from medjax.data.io.volume import PathLike, check_readable_file

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


def read_image_2d(path: PathLike) -> Tuple[np.ndarray, Tuple[float, float]]:
  """Reads a single 2D image: PNG/JPEG/TIFF/BMP (PIL) by suffix, anything else as one DICOM file.

  Returns:
    (array, spacing_mm): array (y, x) for grey or (y, x, C) for colour; spacing_mm (y, x) in mm.
    DICOM: float32 after RescaleSlope/Intercept when the file has them, else the stored dtype; spacing
    from PixelSpacing, else ImagerPixelSpacing (radiographs), else (1, 1). MONOCHROME1 is not inverted.
    Compressed transfer syntaxes are decoded by pydicom's plugins as in `dicom.read_pixels` (RLE and
    Deflated built in; JPEG, JPEG-LS and JPEG 2000 with the `dicom` extra: pip install "medjax[dicom]").
    PIL: the stored dtype (palette images are expanded to RGB/RGBA); spacing from the file's DPI
    (25.4 / dpi), else (1, 1).

  Raises:
    FileNotFoundError: no such file.  ValueError: empty, unreadable, multi-frame or not 2D; a compressed DICOM
    whose decoder is not installed (naming the file, the transfer syntax and its UID, and the package to install).
  """
  path = check_readable_file(path, "image")
  if path.lower().endswith(PIL_SUFFIXES):
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

  ds = dicom.dcmread(path)
  if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
    raise ValueError(f"DICOM file {path} has {ds.NumberOfFrames} frames; read_image_2d expects one.")
  array = dicom.read_pixels(ds, path)
  if array.ndim not in (2, 3):
    raise ValueError(f"DICOM file {path} has pixel shape {array.shape}; expected (y, x) or (y, x, C).")
  if "RescaleSlope" in ds or "RescaleIntercept" in ds:
    array = dicom.rescale(array, ds)
  spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
  spacing = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
  return array, spacing
