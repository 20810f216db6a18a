"""Single 2D images: DICOM and PNG."""


import numpy as np
import pytest

from medjax.data import io
from tests.data.io import dicom_testing

pydicom = pytest.importorskip("pydicom")


# ---------------------------------------------------------------------------------------------------- 2D


def test_read_single_dicom_2d(tmp_path):
  raw = np.random.default_rng(6).integers(0, 4000, size=(16, 20)).astype(np.uint16)
  dicom_testing.write_dicom(tmp_path / "xray.dcm", raw, pixel_spacing=(0.5, 0.25))
  array, spacing = io.read_image_2d(tmp_path / "xray.dcm")
  assert array.dtype == np.float32 and array.shape == (16, 20)
  np.testing.assert_array_equal(array, raw * 2.0 - 1024)
  assert spacing == (0.5, 0.25)
  dicom_testing.write_dicom(tmp_path / "noslope", raw, slope=None)  # no suffix: read as DICOM, stored dtype kept
  array, _ = io.read_image_2d(tmp_path / "noslope")
  assert array.dtype == np.uint16
  np.testing.assert_array_equal(array, raw)


def test_read_png(tmp_path):
  from PIL import Image

  grey = np.random.default_rng(7).integers(0, 256, size=(16, 24)).astype(np.uint8)
  Image.fromarray(grey).save(tmp_path / "g.png", dpi=(254, 127))  # (x, y) dpi -> 0.1 mm x, 0.2 mm y
  array, spacing = io.read_image_2d(tmp_path / "g.png")
  np.testing.assert_array_equal(array, grey)
  assert spacing == pytest.approx((0.2, 0.1), rel=1e-3)
  rgb = np.random.default_rng(8).integers(0, 256, size=(16, 24, 3)).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "c.png")
  array, spacing = io.read_image_2d(tmp_path / "c.png")
  assert array.shape == (16, 24, 3) and spacing == (1.0, 1.0)
  np.testing.assert_array_equal(array, rgb)
  (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
  with pytest.raises(ValueError, match=r"cannot read image file .*bad\.png"):
    io.read_image_2d(tmp_path / "bad.png")
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    io.read_image_2d(tmp_path / "empty.png")




def test_read_compressed_dicom_2d(tmp_path):
  raw = np.random.default_rng(9).integers(0, 4000, size=(32, 40)).astype(np.uint16)
  syntaxes = [pydicom.uid.RLELossless]
  if pydicom.pixels.get_encoder(pydicom.uid.JPEG2000Lossless).is_available:
    syntaxes.append(pydicom.uid.JPEG2000Lossless)
  for syntax in syntaxes:
    path = tmp_path / f"{syntax.keyword}.dcm"
    dicom_testing.write_dicom(path, raw, pixel_spacing=(0.5, 0.25), transfer_syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    array, spacing = io.read_image_2d(path)
    np.testing.assert_array_equal(array, raw * 2.0 - 1024)
    assert spacing == (0.5, 0.25)
