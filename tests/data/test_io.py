"""NIfTI/DICOM/PNG I/O: exact round trips, canonical reorientation, DICOM geometry and HU, clear errors."""

import os

import numpy as np
import pytest

from medjax.data import io

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")


def _oblique_affine(spacing_zyx=(3.0, 0.8, 0.6), flip_lps=False):
  """A rotated (not axis-aligned) affine with anisotropic spacing; columns are (x, y, z) voxel steps."""
  a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
  rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
  rotation = rz @ rx
  if flip_lps:
    rotation = np.diag([-1.0, -1.0, 1.0]) @ rotation
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag(spacing_zyx[::-1])
  affine[:3, 3] = [-101.25, 37.5, 12.3]
  return affine


# ------------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("affine_kind", ["float32_exact", "float64"])
def test_nifti_round_trip_is_exact(tmp_path, dtype, suffix, affine_kind):
  rng = np.random.default_rng(0)
  array = (rng.normal(size=(8, 10, 12)) * 50).astype(dtype)
  affine = _oblique_affine()
  if affine_kind == "float32_exact":  # as every affine read from a NIfTI-1 file: written as NIfTI-1
    affine = affine.astype(np.float32).astype(np.float64)
  volume = io.Volume.from_array(array, affine=affine)
  assert volume.spacing_mm == pytest.approx((3.0, 0.8, 0.6))
  path = tmp_path / f"img{suffix}"
  io.write_nifti(path, volume)
  expected_class = nib.Nifti1Image if affine_kind == "float32_exact" else nib.Nifti2Image
  assert type(nib.load(path)) is expected_class
  back = io.read_nifti(path)
  assert back.array.dtype == dtype and back.array.shape == (8, 10, 12)
  np.testing.assert_array_equal(back.array, array)
  np.testing.assert_array_equal(back.affine, volume.affine)  # bit for bit, float64
  assert back.spacing_mm == volume.spacing_mm
  # Writing again what was read gives the same file contents.
  io.write_nifti(tmp_path / f"again{suffix}", back)
  again = io.read_nifti(tmp_path / f"again{suffix}")
  np.testing.assert_array_equal(again.array, array)
  np.testing.assert_array_equal(again.affine, back.affine)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temp files left behind


def test_axis_convention_matches_nibabel(tmp_path):
  """array[z, y, x] == nibabel data[x, y, z]; world = affine @ (x, y, z, 1)."""
  array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
  volume = io.Volume.from_array(array, spacing_mm=(2.5, 1.0, 0.5))
  np.testing.assert_array_equal(volume.affine[:3, :3], np.diag([0.5, 1.0, 2.5]))
  io.write_nifti(tmp_path / "a.nii", volume)
  data = np.asarray(nib.load(tmp_path / "a.nii").dataobj)
  assert data.shape == (6, 5, 4)
  assert data[5, 3, 2] == array[2, 3, 5]
  assert nib.load(tmp_path / "a.nii").header.get_zooms() == pytest.approx((0.5, 1.0, 2.5))


def test_affine_not_float32_exact_still_round_trips(tmp_path):
  affine = _oblique_affine()
  affine[0, 3] = 1.0 / 3.0  # not representable in float32: written as NIfTI-2
  volume = io.Volume.from_array(np.zeros((3, 4, 5), np.float32), affine=affine)
  io.write_nifti(tmp_path / "b.nii.gz", volume)
  np.testing.assert_array_equal(io.read_nifti(tmp_path / "b.nii.gz").affine, affine)
  io.write_nifti(tmp_path / "b1.nii.gz", volume, nifti2=False)  # forced NIfTI-1: float32-rounded affine
  assert type(nib.load(tmp_path / "b1.nii.gz")) is nib.Nifti1Image
  np.testing.assert_allclose(io.read_nifti(tmp_path / "b1.nii.gz").affine, affine, atol=1e-5)


def test_channels_need_allow_channels(tmp_path):
  array = np.random.default_rng(1).normal(size=(4, 5, 6, 2)).astype(np.float32)
  io.write_nifti(tmp_path / "c.nii.gz", io.Volume.from_array(array, spacing_mm=(2.0, 1.0, 1.0)))
  with pytest.raises(ValueError, match=r"expected a 3D image, got 4D shape \(6, 5, 4, 2\) in .*c\.nii\.gz"):
    io.read_nifti(tmp_path / "c.nii.gz")
  back = io.read_nifti(tmp_path / "c.nii.gz", allow_channels=True)
  np.testing.assert_array_equal(back.array, array)


def test_nifti_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
    io.read_nifti(tmp_path / "missing.nii.gz")
  (tmp_path / "empty.nii.gz").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.nii\.gz is empty"):
    io.read_nifti(tmp_path / "empty.nii.gz")
  (tmp_path / "junk.nii").write_bytes(b"this is not a nifti header" * 20)
  with pytest.raises(ValueError, match=r"cannot read NIfTI file .*junk\.nii"):
    io.read_nifti(tmp_path / "junk.nii")
  # A truncated file: valid header, missing voxels.
  io.write_nifti(tmp_path / "full.nii", io.Volume.from_array(np.ones((8, 8, 8), np.float32)))
  (tmp_path / "cut.nii").write_bytes((tmp_path / "full.nii").read_bytes()[:600])
  with pytest.raises(ValueError, match=r"cut\.nii"):
    io.read_nifti(tmp_path / "cut.nii")


def test_failed_write_leaves_nothing(tmp_path):
  volume = io.Volume.from_array(np.zeros((2, 3, 4), np.float16))  # NIfTI cannot store float16
  with pytest.raises(ValueError, match=r"bad\.nii\.gz"):
    io.write_nifti(tmp_path / "bad.nii.gz", volume)
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match=r"\.nii"):
    io.write_nifti(tmp_path / "bad.png", io.Volume.from_array(np.zeros((2, 3, 4), np.float32)))


def test_volume_validates_spacing_against_affine():
  with pytest.raises(ValueError, match="disagrees"):
    io.Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0), io.affine_from_spacing((2.0, 1.0, 1.0)))
  with pytest.raises(ValueError, match="shape"):
    io.Volume.from_array(np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("channels", [False, True])
def test_canonical_and_undo_are_exact(channels):
  affine = _oblique_affine(flip_lps=True)
  assert io.orientation_codes(affine) != ("R", "A", "S")
  shape = (5, 6, 7, 2) if channels else (5, 6, 7)
  array = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  volume = io.Volume.from_array(array, affine=affine)
  canonical, undo = io.to_canonical(volume)
  assert io.orientation_codes(canonical.affine) == ("R", "A", "S")
  # Same voxels at the same world positions: check one voxel through both affines.
  z, y, x = 1, 2, 3
  world = volume.affine @ [x, y, z, 1]
  zc, yc, xc = np.round(np.linalg.solve(canonical.affine, world)[:3][::-1]).astype(int)
  np.testing.assert_allclose(np.linalg.solve(canonical.affine, world)[:3][::-1], (zc, yc, xc), atol=1e-9)
  np.testing.assert_array_equal(canonical.array[zc, yc, xc], array[z, y, x])
  assert sorted(canonical.spacing_mm) == pytest.approx(sorted(volume.spacing_mm))
  back = undo(canonical)
  np.testing.assert_array_equal(back.array, array)
  np.testing.assert_array_equal(back.affine, affine)
  assert back.spacing_mm == volume.spacing_mm
  # undo also takes a bare array in the canonical grid, e.g. a prediction.
  np.testing.assert_array_equal(undo(canonical.array).array, array)
  with pytest.raises(ValueError, match="spatial shape"):
    undo(np.zeros((1, 2, 3)))


def test_lps_axis_aligned_to_canonical():
  affine = np.diag([-0.7, -0.7, 2.0, 1.0])  # LPS
  array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
  canonical, undo = io.to_canonical(io.Volume.from_array(array, affine=affine))
  np.testing.assert_array_equal(canonical.array, array[:, ::-1, ::-1])
  assert np.all(np.diag(canonical.affine)[:3] > 0)
  np.testing.assert_array_equal(undo(canonical).array, array)


# ------------------------------------------------------------------------------------------------- DICOM


def _ds(value):
  """A decimal string within DICOM's 16-character DS limit."""
  return f"{float(value):.10g}"


def _write_dicom(path, pixels, *, position=None, orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.7, 0.9),
                 slope=2.0, intercept=-1024.0, series_uid="1.2.3.4", drop=()):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = CTImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "CT"
  ds.SeriesInstanceUID = series_uid
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0
  ds.PixelSpacing = [_ds(s) for s in pixel_spacing]
  if position is not None:
    ds.ImagePositionPatient = [_ds(p) for p in position]
    ds.ImageOrientationPatient = [_ds(o) for o in orientation]
    ds.SliceThickness = "1.5"  # thinner than the 3 mm step: a gap, spacing must come from positions
  if slope is not None:
    ds.RescaleSlope = str(slope)
    ds.RescaleIntercept = str(intercept)
  for keyword in drop:
    delattr(ds, keyword)
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def _write_series(folder, raw, orientation=(1, 0, 0, 0, 1, 0), origin=(-50.0, -40.0, 20.0), step=3.0, **kw):
  """Slice k of `raw` (z, y, x) at origin + k * step * normal, files in shuffled order (name != order)."""
  folder.mkdir(exist_ok=True)
  orientation = np.asarray(orientation, np.float64)
  normal = np.cross(orientation[:3], orientation[3:])
  order = np.random.default_rng(3).permutation(raw.shape[0])
  for file_index, k in enumerate(order):
    position = np.asarray(origin) + k * step * normal
    _write_dicom(folder / f"IM{file_index:04d}.dcm", raw[k], position=position, orientation=orientation, **kw)


def test_dicom_series_order_spacing_and_hu(tmp_path):
  raw = np.random.default_rng(4).integers(0, 3000, size=(5, 6, 8)).astype(np.uint16)
  raw[:, 0, 0] = np.arange(5) * 100  # slice marker
  _write_series(tmp_path / "ct", raw)
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
  _write_series(tmp_path / "obl", raw, orientation=orientation, step=2.5, slope=1.0, intercept=0.0)
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
  _write_series(tmp_path / "mixed", raw)
  _write_dicom(tmp_path / "mixed" / "other.dcm", raw[0], position=(0, 0, 100), series_uid="9.9.9")
  with pytest.raises(ValueError, match=r"mixes 2 DICOM series.*series_uid="):
    io.read_dicom_series(tmp_path / "mixed")
  assert io.read_dicom_series(tmp_path / "mixed", series_uid="1.2.3.4").array.shape == (3, 4, 4)

  _write_series(tmp_path / "tilted", raw)
  _write_dicom(tmp_path / "tilted" / "IM0000.dcm", raw[0], position=(-50, -40, 20), orientation=(0, 1, 0, 0, 0, -1))
  with pytest.raises(ValueError, match=r"inconsistent ImageOrientationPatient.*IM0000\.dcm"):
    io.read_dicom_series(tmp_path / "tilted")

  _write_series(tmp_path / "notag", raw)
  _write_dicom(tmp_path / "notag" / "IM0001.dcm", raw[1], position=(-50, -40, 23), drop=("ImagePositionPatient",))
  with pytest.raises(ValueError, match=r"IM0001\.dcm is missing the ImagePositionPatient tag"):
    io.read_dicom_series(tmp_path / "notag")

  _write_series(tmp_path / "junk", raw)
  (tmp_path / "junk" / "notes.txt").write_text("not dicom")
  with pytest.raises(ValueError, match=r"notes\.txt is not a DICOM file"):
    io.read_dicom_series(tmp_path / "junk")

  _write_series(tmp_path / "dup", raw)
  _write_dicom(tmp_path / "dup" / "IM0009.dcm", raw[0], position=(-50, -40, 20))
  with pytest.raises(ValueError, match="same slice position"):
    io.read_dicom_series(tmp_path / "dup")


# ---------------------------------------------------------------------------------------------------- 2D


def test_read_single_dicom_2d(tmp_path):
  raw = np.random.default_rng(6).integers(0, 4000, size=(16, 20)).astype(np.uint16)
  _write_dicom(tmp_path / "xray.dcm", raw, pixel_spacing=(0.5, 0.25))
  array, spacing = io.read_image_2d(tmp_path / "xray.dcm")
  assert array.dtype == np.float32 and array.shape == (16, 20)
  np.testing.assert_array_equal(array, raw * 2.0 - 1024)
  assert spacing == (0.5, 0.25)
  _write_dicom(tmp_path / "noslope", raw, slope=None)  # no suffix: read as DICOM, stored dtype kept
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


# ---------------------------------------------------------------------------------------------- checks


def test_check_pair():
  affine = _oblique_affine()
  image = io.Volume.from_array(np.zeros((4, 5, 6, 2), np.float32), affine=affine)
  label = io.Volume.from_array(np.zeros((4, 5, 6), np.uint8), affine=affine + 5e-5 * np.eye(4))
  io.check_pair(image, label, "case_007")  # channels ignored, float32-level differences tolerated
  with pytest.raises(ValueError, match=r"case case_007: image spatial shape \(4, 5, 6\).*\(4, 5, 7\)"):
    io.check_pair(image, io.Volume.from_array(np.zeros((4, 5, 7), np.uint8), affine=affine), "case_007")
  moved = affine.copy()
  moved[0, 3] += 0.5
  with pytest.raises(ValueError, match="case case_007: image and label affines differ"):
    io.check_pair(image, io.Volume.from_array(np.zeros((4, 5, 6), np.uint8), affine=moved), "case_007")


def test_check_finite():
  io.check_finite(np.zeros((3, 3, 3), np.float32), "ok")
  io.check_finite(np.zeros((3, 3, 3), np.int16), "ints")
  array = np.zeros((3, 4, 5), np.float32)
  array[1, 2, 3] = np.nan
  array[2, 0, 0] = np.inf
  with pytest.raises(ValueError, match=r"case_3/image: 1 NaN and 1 inf voxels of 60 \(first at index \(1, 2, 3\)\)"):
    io.check_finite(array, "case_3/image")
