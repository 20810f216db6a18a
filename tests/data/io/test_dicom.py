"""DICOM: slice order, geometry, HU, spacing tolerance, several series, multi-frame, compression, clear errors."""


import re
import warnings

import numpy as np
import pytest

from medjax.data import io
from tests.data.io import dicom_testing

pydicom = pytest.importorskip("pydicom")

AXIAL_RAS = np.array([[-0.9, 0, 0, 50.0], [0, -0.7, 0, 40.0], [0, 0, 3.0, 20.0], [0, 0, 0, 1]])


def read_with_warnings(read, *args, **kw):
  """read(*args, **kw) and the GeometryWarning messages it gave."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = read(*args, **kw)
  return result, [str(w.message) for w in caught if issubclass(w.category, io.GeometryWarning)]


def test_dicom_series_order_spacing_and_hu(tmp_path):
  raw = np.random.default_rng(4).integers(0, 3000, size=(5, 6, 8)).astype(np.uint16)
  raw[:, 0, 0] = np.arange(5) * 100  # slice marker
  dicom_testing.write_series(tmp_path / "ct", raw)
  volume, messages = read_with_warnings(io.read_dicom_series, tmp_path / "ct")
  assert messages == []
  assert volume.array.dtype == np.float32 and volume.array.shape == (5, 6, 8)
  np.testing.assert_array_equal(volume.array, raw.astype(np.float32) * 2 - 1024)
  assert volume.spacing_mm == pytest.approx((3.0, 0.7, 0.9))
  # LPS (x, y) = (-50, -40) -> RAS (50, 40); columns: x step 0.9 along L -> -0.9 in R, y 0.7 along P.
  np.testing.assert_allclose(volume.affine, AXIAL_RAS, atol=1e-9)
  # The volume goes through NIfTI unchanged.
  io.write_nifti(tmp_path / "ct.nii.gz", volume)
  np.testing.assert_array_equal(io.read_nifti(tmp_path / "ct.nii.gz").array, volume.array)


def oblique_orientation():
  """Row and column directions rotated 30 degrees about z, then 20 degrees about the new row direction."""
  c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
  row = np.array([c, s, 0.0])
  col0 = np.array([-s, c, 0.0])
  normal0 = np.cross(row, col0)
  a = np.deg2rad(20)
  return tuple(row) + tuple(np.cos(a) * col0 + np.sin(a) * normal0)


def test_dicom_series_oblique_geometry(tmp_path):
  """Every voxel's world position from the affine matches the DICOM definition (converted to RAS)."""
  orientation = oblique_orientation()
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


def test_dicom_series_matches_simpleitk_on_an_oblique_series(tmp_path):
  sitk = pytest.importorskip("SimpleITK")
  raw = np.random.default_rng(15).integers(0, 2000, size=(5, 7, 6)).astype(np.uint16)
  dicom_testing.write_series(tmp_path / "obl", raw, orientation=oblique_orientation(), step=1.7, slope=1.0,
                             intercept=-100.0)
  volume = io.read_dicom_series(tmp_path / "obl")
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "obl")))
  image = reader.Execute()
  np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).astype(np.float32))  # both (z, y, x)
  for x, y, z in [(0, 0, 0), (5, 6, 4), (1, 3, 2), (5, 0, 4)]:
    lps = np.asarray(image.TransformIndexToPhysicalPoint((x, y, z)))  # SimpleITK: (x, y, z) index, LPS world
    np.testing.assert_allclose((volume.affine @ [x, y, z, 1])[:3], lps * [-1, -1, 1], atol=1e-4)


def test_rounded_positions_are_read_on_the_mean_step_with_one_warning(tmp_path):
  """5 mm slices with a 2 mm gap, positions rounded to 0.1 mm: steps 7.0 and 7.1 (1.4% apart)."""
  raw = np.random.default_rng(6).integers(0, 1000, size=(5, 4, 3)).astype(np.uint16)
  positions = [(-50.0, -40.0, z) for z in (20.0, 27.0, 34.0, 41.1, 48.1)]
  dicom_testing.write_slices(tmp_path / "rounded", raw, positions)
  volume, messages = read_with_warnings(io.read_dicom_series, tmp_path / "rounded")
  assert len(messages) == 1
  assert str(tmp_path / "rounded") in messages[0] and "from 7 to 7.1 mm" in messages[0]
  np.testing.assert_array_equal(volume.array, raw * 2.0 - 1024)
  # Mean step (48.1 - 20.0) / 4 = 7.025 mm along S.
  expected = AXIAL_RAS.copy()
  expected[2, 2] = 7.025
  np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
  assert volume.spacing_mm == pytest.approx((7.025, 0.7, 0.9))
  # A tighter tolerance refuses the same series and names the values that would accept it.
  with pytest.raises(ValueError, match=r"slice_step_tolerance_mm=0\.08 and slice_step_tolerance_fraction=0\.02"):
    io.read_dicom_series(tmp_path / "rounded", slice_step_tolerance_mm=0.05)
  with warnings.catch_warnings():
    warnings.simplefilter("error", io.GeometryWarning)
    with pytest.raises(io.GeometryWarning):
      io.read_dicom_series(tmp_path / "rounded")


def test_a_missing_slice_is_refused_with_the_slices_steps_and_override(tmp_path):
  raw = np.random.default_rng(7).integers(0, 1000, size=(5, 4, 3)).astype(np.uint16)
  positions = [(-50.0, -40.0, z) for z in (20.0, 23.0, 26.0, 32.0, 35.0)]  # 29.0 is missing
  paths = dicom_testing.write_slices(tmp_path / "gap", raw, positions)
  with pytest.raises(ValueError) as error:
    io.read_dicom_series(tmp_path / "gap")
  message = str(error.value)
  assert message.startswith(f"unevenly spaced slices in {tmp_path / 'gap'}: a gap (missing slices?) between ")
  assert f"{paths[2]} at (-50, -40, 26)" in message and f"{paths[3]} at (-50, -40, 32)" in message
  # Steps 3, 3, 6, 3 around the mean 15 / 4 = 3.75 mm: the 6 mm step is 2.25 mm = 0.6 of the mean away.
  assert "a step of 6 mm along the slice normal against the mean step 3.75 mm" in message
  assert "steps range from 3 to 6 mm and 4 of 4 deviate" in message
  assert "pass slice_step_tolerance_mm=2.25 and slice_step_tolerance_fraction=0.6." in message
  volume, messages = read_with_warnings(io.read_dicom_series, tmp_path / "gap", slice_step_tolerance_mm=2.25,
                                        slice_step_tolerance_fraction=0.6)
  assert volume.spacing_mm[0] == pytest.approx(3.75) and len(messages) == 1


def test_several_series_listing_and_picking(tmp_path):
  folder = tmp_path / "study"
  raw = np.arange(3 * 4 * 4, dtype=np.uint16).reshape(3, 4, 4)
  dicom_testing.write_series(folder, raw, series_number=2, series_description="AX 3mm")
  for k in range(2):
    dicom_testing.write_dicom(folder / f"COR{k}.dcm", raw[k], position=(0, 10.0 * k, 0),
                              orientation=(1, 0, 0, 0, 0, -1), series_uid="9.9.9", series_number=7,
                              series_description="COR")
  expected = [
      {"uid": "1.2.3.4", "description": "AX 3mm", "number": 2, "num_files": 3, "num_frames": 3, "modality": "CT"},
      {"uid": "9.9.9", "description": "COR", "number": 7, "num_files": 2, "num_frames": 2, "modality": "CT"}]
  assert io.list_dicom_series(folder) == expected
  listing = (r"\n  series_uid=1\.2\.3\.4: 'AX 3mm', SeriesNumber 2, CT, 3 slices in 3 files"
             r"\n  series_uid=9\.9\.9: 'COR', SeriesNumber 7, CT, 2 slices in 2 files$")
  with pytest.raises(ValueError, match=re.escape(str(folder)) + r" holds 2 DICOM series; pass series_uid= .*" + listing):
    io.read_dicom_series(folder)
  with pytest.raises(ValueError, match=r"series_uid=1\.2\.3 is not in .*, which holds:" + listing):
    io.read_dicom_series(folder, series_uid="1.2.3")
  assert io.read_dicom_series(folder, series_uid="1.2.3.4").array.shape == (3, 4, 4)
  coronal = io.read_dicom_series(folder, series_uid="9.9.9")
  np.testing.assert_array_equal(coronal.array, raw[:2] * 2.0 - 1024)
  assert coronal.spacing_mm == pytest.approx((10.0, 0.7, 0.9))


def test_gantry_tilt_keeps_the_exact_sheared_affine_and_warns(tmp_path):
  """CT gantry tilted 15 degrees: image columns tilted in the y-z plane, the table (positions) moves along z."""
  sitk = pytest.importorskip("SimpleITK")
  c, s = np.cos(np.deg2rad(15)), np.sin(np.deg2rad(15))
  raw = np.random.default_rng(8).integers(0, 1000, size=(4, 5, 6)).astype(np.uint16)
  positions = [(-50.0, -40.0, 20.0 + 3.0 * k) for k in range(4)]
  dicom_testing.write_slices(tmp_path / "tilt", raw, positions, orientation=(1, 0, 0, 0, c, -s))
  volume, messages = read_with_warnings(io.read_dicom_series, tmp_path / "tilt")
  assert len(messages) == 1 and messages[0].startswith(f"{tmp_path / 'tilt'}: gantry tilt of 15.00 degrees")
  # LPS columns: row (1, 0, 0) * 0.9, column (0, cos, -sin) * 0.7, the position step (0, 0, 3), the first position.
  expected = np.array([[-0.9, 0, 0, 50.0], [0, -0.7 * c, 0, 40.0], [0, -0.7 * s, 3.0, 20.0], [0, 0, 0, 1]])
  np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
  assert volume.spacing_mm == pytest.approx((3.0, 0.7, 0.9))
  for k, position in enumerate(positions):  # every slice where its header puts it
    np.testing.assert_allclose(volume.affine @ [0, 0, k, 1], list(position * np.array([-1, -1, 1])) + [1], atol=1e-9)
  # SimpleITK keeps an orthogonal direction: the same voxels, its last slice away from its recorded position.
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "tilt")))
  image = reader.Execute()
  np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))  # GDCM applies the rescale too
  assert np.linalg.norm(np.asarray(image.TransformIndexToPhysicalPoint((0, 0, 3))) - positions[3]) > 2.0


def test_enhanced_multiframe_ct(tmp_path):
  """Frames stored out of order, oblique shared geometry, per-frame rescale, read as a file and as a folder."""
  orientation = oblique_orientation()
  row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
  normal = np.cross(row_dir, col_dir)
  origin = np.array([10.0, -20.0, 30.0])
  stored_slice = [2, 0, 3, 1]  # frame f of the file is slice stored_slice[f]
  raw = np.random.default_rng(9).integers(0, 1000, size=(4, 5, 6)).astype(np.uint16)
  frames = raw[stored_slice]
  positions = [origin + 1.25 * k * normal for k in stored_slice]
  intercepts = [-1000.0 - 10 * k for k in stored_slice]
  (tmp_path / "mf").mkdir()
  path = tmp_path / "mf" / "enhanced.dcm"
  dicom_testing.write_enhanced_ct(path, frames, positions, orientation=orientation, pixel_spacing=(0.5, 0.8),
                                  slopes=[0.5] * 4, intercepts=intercepts)
  volume, messages = read_with_warnings(io.read_dicom, path)
  assert messages == [] and volume.array.shape == (4, 5, 6)
  expected = raw * 0.5 + (-1000.0 - 10 * np.arange(4))[:, None, None]
  np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
  lps = np.eye(4)
  lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = 0.8 * row_dir, 0.5 * col_dir, 1.25 * normal, origin
  np.testing.assert_allclose(volume.affine, np.diag([-1.0, -1, 1, 1]) @ lps, atol=1e-7)
  assert volume.spacing_mm == pytest.approx((1.25, 0.5, 0.8), abs=1e-6)
  from_folder = io.read_dicom_series(tmp_path / "mf")
  np.testing.assert_array_equal(from_folder.array, volume.array)
  np.testing.assert_array_equal(from_folder.affine, volume.affine)
  assert io.list_dicom_series(tmp_path / "mf")[0]["num_frames"] == 4

  # Shared rescale; two frames at one position (two time points) are refused, naming both frames.
  dicom_testing.write_enhanced_ct(tmp_path / "twice.dcm", frames[:2], [origin, origin], shared_rescale=(1.0, -5.0))
  with pytest.raises(ValueError, match=r"twice\.dcm frame 1/2 and .*twice\.dcm frame 2/2 are at the same slice"):
    io.read_dicom(tmp_path / "twice.dcm")


def test_read_dicom_single_slice(tmp_path):
  raw = np.random.default_rng(10).integers(0, 1000, size=(4, 5)).astype(np.uint16)
  dicom_testing.write_dicom(tmp_path / "one.dcm", raw, position=(-50, -40, 20))
  volume, messages = read_with_warnings(io.read_dicom, tmp_path / "one.dcm")
  assert messages == [] and volume.array.shape == (1, 4, 5)
  np.testing.assert_array_equal(volume.array[0], raw * 2.0 - 1024)
  expected = AXIAL_RAS.copy()
  expected[2, 2] = 1.5  # SliceThickness along the normal
  np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
  dicom_testing.write_dicom(tmp_path / "thin.dcm", raw, position=(-50, -40, 20), drop=("SliceThickness",))
  volume, messages = read_with_warnings(io.read_dicom, tmp_path / "thin.dcm")
  assert volume.spacing_mm[0] == 1.0 and len(messages) == 1 and "assuming 1 mm" in messages[0]
  with pytest.raises(FileNotFoundError, match="nothing.dcm"):
    io.read_dicom(tmp_path / "nothing.dcm")


@pytest.mark.parametrize("syntax_name", ["RLELossless", "DeflatedExplicitVRLittleEndian", "JPEG2000Lossless"])
def test_compressed_series_round_trip_exactly(tmp_path, syntax_name):
  syntax = getattr(pydicom.uid, syntax_name)
  if syntax.is_encapsulated and not pydicom.pixels.get_encoder(syntax).is_available:
    pytest.skip(f"no {syntax.name} encoder: pip install medjax[dicom]")
  # openjpeg refuses images smaller than 32 x 32 with its default resolutions.
  raw = np.random.default_rng(11).integers(0, 4096, size=(3, 32, 33)).astype(np.uint16)
  paths = dicom_testing.write_series(tmp_path / "c", raw, transfer_syntax=syntax)
  assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
  volume = io.read_dicom_series(tmp_path / "c")
  np.testing.assert_array_equal(volume.array, raw * 2.0 - 1024)
  np.testing.assert_allclose(volume.affine, AXIAL_RAS, atol=1e-9)
  np.testing.assert_array_equal(io.read_dicom(paths[1]).array[0], raw[1] * 2.0 - 1024)


def make_decoder_unavailable(monkeypatch, syntax):
  """Simulates a missing plugin: pydicom's decoder for `syntax` reports that no plugin is available."""
  from pydicom.pixels.decoders.base import Decoder

  available = Decoder.is_available
  monkeypatch.setattr(Decoder, "is_available", property(lambda self: syntax != self.UID and available.fget(self)))
  assert not pydicom.pixels.get_decoder(syntax).is_available


def test_missing_decoder_names_file_syntax_and_package(tmp_path, monkeypatch):
  syntax = pydicom.uid.JPEG2000Lossless
  raw = np.zeros((3, 4, 4), np.uint16)
  paths = dicom_testing.write_series(tmp_path / "j2k", raw, transfer_syntax=syntax, encapsulated_frames=[b"\0" * 8])
  make_decoder_unavailable(monkeypatch, syntax)
  expected = (r"cannot decode DICOM file .*IM000\d\.dcm: its transfer syntax JPEG 2000 Image Compression \(Lossless "
              r"Only\) \(1\.2\.840\.10008\.1\.2\.4\.90\) needs a pixel decoder that is not installed .*"
              r"pip install \"medjax\[dicom\]\" \(pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg\)\.$")
  with pytest.raises(ValueError, match=expected):
    io.read_dicom_series(tmp_path / "j2k")
  with pytest.raises(ValueError, match=re.escape(str(paths[0])) + ": its transfer syntax JPEG 2000"):
    io.read_dicom(paths[0])
  with pytest.raises(ValueError, match=re.escape(str(paths[0])) + ": its transfer syntax JPEG 2000"):
    io.read_image_2d(paths[0])
  # A syntax pydicom cannot decode at all (MPEG-2 video).
  dicom_testing.write_dicom(tmp_path / "video.dcm", raw[0], position=(0, 0, 0),
                            transfer_syntax=pydicom.uid.MPEG2MPML, encapsulated_frames=[b"\0" * 8])
  with pytest.raises(ValueError, match=r"video\.dcm uses the transfer syntax MPEG2 Main Profile / Main Level "
                                       r"\(1\.2\.840\.10008\.1\.2\.4\.100\), which pydicom has no pixel decoder"):
    io.read_dicom(tmp_path / "video.dcm")


def test_dicom_series_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    io.read_dicom_series(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    io.list_dicom_series(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no DICOM files in .*empty"):
    io.read_dicom_series(tmp_path / "empty")

  raw = np.zeros((3, 4, 4), np.uint16)
  dicom_testing.write_series(tmp_path / "tilted", raw)
  dicom_testing.write_dicom(tmp_path / "tilted" / "IM0000.dcm", raw[0], position=(-50, -40, 20),
                            orientation=(0, 1, 0, 0, 0, -1))
  with pytest.raises(ValueError, match=r"inconsistent ImageOrientationPatient.*IM0000\.dcm"):
    io.read_dicom_series(tmp_path / "tilted")

  dicom_testing.write_series(tmp_path / "notag", raw)
  dicom_testing.write_dicom(tmp_path / "notag" / "IM0001.dcm", raw[1], position=(-50, -40, 23),
                            drop=("ImagePositionPatient",))
  with pytest.raises(ValueError, match=r"IM0001\.dcm is missing the ImagePositionPatient tag"):
    io.read_dicom_series(tmp_path / "notag")

  dicom_testing.write_series(tmp_path / "junk", raw)
  (tmp_path / "junk" / "notes.txt").write_text("not dicom")
  with pytest.raises(ValueError, match=r"notes\.txt is not a DICOM file"):
    io.read_dicom_series(tmp_path / "junk")
  with pytest.raises(ValueError, match=r"notes\.txt is not a DICOM file"):
    io.list_dicom_series(tmp_path / "junk")

  dicom_testing.write_series(tmp_path / "dup", raw)
  dicom_testing.write_dicom(tmp_path / "dup" / "IM0009.dcm", raw[0], position=(-50, -40, 20))
  with pytest.raises(ValueError, match="same slice position"):
    io.read_dicom_series(tmp_path / "dup")

  dicom_testing.write_series(tmp_path / "tol", raw)
  with pytest.raises(ValueError, match=r"slice_step_tolerance_mm \(-1\.0\) .* must be >= 0"):
    io.read_dicom_series(tmp_path / "tol", slice_step_tolerance_mm=-1.0)
