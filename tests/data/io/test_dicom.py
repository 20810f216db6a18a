"""DICOM series: slice order, geometry, HU, clear errors."""


import numpy as np
import pytest

from medjax.data import io
from tests.data.io import dicom_testing

pydicom = pytest.importorskip("pydicom")


def test_dicom_series_order_spacing_and_hu(tmp_path):
  raw = np.random.default_rng(4).integers(0, 3000, size=(5, 6, 8)).astype(np.uint16)
  raw[:, 0, 0] = np.arange(5) * 100  # slice marker
  dicom_testing.write_series(tmp_path / "ct", raw)
  volume = io.read_dicom_series(tmp_path / "ct")
  assert volume.array.dtype == np.float32 and volume.array.shape == (5, 6, 8)
  np.testing.assert_array_equal(volume.array, raw.astype(np.float32) * 2 - 1024)
  assert volume.spacing_mm == pytest.approx((3.0, 0.7, 0.9))
  # LPS (x, y) = (-50, -40) -> RAS (50, 40); columns: x step 0.9 along L -> -0.9 in R, y 0.7 along P.
  expected = np.array([[-0.9, 0, 0, 50.0], [0, -0.7, 0, 40.0], [0, 0, 3.0, 20.0], [0, 0, 0, 1]])
  np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
  # The volume goes through NIfTI unchanged.
  io.write_nifti(tmp_path / "ct.nii.gz", volume)
  np.testing.assert_array_equal(io.read_nifti(tmp_path / "ct.nii.gz").array, volume.array)


def test_dicom_series_oblique_geometry(tmp_path):
  """Every voxel's world position from the affine matches the DICOM definition (converted to RAS)."""
  c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
  orientation = (c, s, 0.0, 0.0, 0.0, -1.0)  # a rotated coronal-ish plane, normal pointing at -y rotated
  raw = np.random.default_rng(5).integers(0, 1000, size=(4, 5, 6)).astype(np.uint16)
  dicom_testing.write_series(tmp_path / "obl", raw, orientation=orientation, step=2.5, slope=1.0, intercept=0.0)
  volume = io.read_dicom_series(tmp_path / "obl")
  np.testing.assert_array_equal(volume.array, raw.astype(np.float32))
  assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.9), abs=1e-5)
  row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
  normal = np.cross(row_dir, col_dir)
  for z, y, x in [(0, 0, 0), (3, 4, 5), (2, 1, 3)]:
    lps = np.array([-50.0, -40.0, 20.0]) + z * 2.5 * normal + x * 0.9 * row_dir + y * 0.7 * col_dir
    ras = lps * [-1, -1, 1]
    np.testing.assert_allclose((volume.affine @ [x, y, z, 1])[:3], ras, atol=1e-4)


def test_dicom_series_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    io.read_dicom_series(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no DICOM files in .*empty"):
    io.read_dicom_series(tmp_path / "empty")

  raw = np.zeros((3, 4, 4), np.uint16)
  dicom_testing.write_series(tmp_path / "mixed", raw)
  dicom_testing.write_dicom(tmp_path / "mixed" / "other.dcm", raw[0], position=(0, 0, 100), series_uid="9.9.9")
  with pytest.raises(ValueError, match=r"mixes 2 DICOM series.*series_uid="):
    io.read_dicom_series(tmp_path / "mixed")
  assert io.read_dicom_series(tmp_path / "mixed", series_uid="1.2.3.4").array.shape == (3, 4, 4)

  dicom_testing.write_series(tmp_path / "tilted", raw)
  dicom_testing.write_dicom(tmp_path / "tilted" / "IM0000.dcm", raw[0], position=(-50, -40, 20), orientation=(0, 1, 0, 0, 0, -1))
  with pytest.raises(ValueError, match=r"inconsistent ImageOrientationPatient.*IM0000\.dcm"):
    io.read_dicom_series(tmp_path / "tilted")

  dicom_testing.write_series(tmp_path / "notag", raw)
  dicom_testing.write_dicom(tmp_path / "notag" / "IM0001.dcm", raw[1], position=(-50, -40, 23), drop=("ImagePositionPatient",))
  with pytest.raises(ValueError, match=r"IM0001\.dcm is missing the ImagePositionPatient tag"):
    io.read_dicom_series(tmp_path / "notag")

  dicom_testing.write_series(tmp_path / "junk", raw)
  (tmp_path / "junk" / "notes.txt").write_text("not dicom")
  with pytest.raises(ValueError, match=r"notes\.txt is not a DICOM file"):
    io.read_dicom_series(tmp_path / "junk")

  dicom_testing.write_series(tmp_path / "dup", raw)
  dicom_testing.write_dicom(tmp_path / "dup" / "IM0009.dcm", raw[0], position=(-50, -40, 20))
  with pytest.raises(ValueError, match="same slice position"):
    io.read_dicom_series(tmp_path / "dup")


