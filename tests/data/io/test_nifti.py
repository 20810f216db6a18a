"""NIfTI: exact round trips, the axis convention, clear errors."""

import os

import numpy as np
import pytest

from medjax.data import io
from tests.data.io import io_testing

nib = pytest.importorskip("nibabel")


# ------------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("affine_kind", ["float32_exact", "float64"])
def test_nifti_round_trip_is_exact(tmp_path, dtype, suffix, affine_kind):
  rng = np.random.default_rng(0)
  array = (rng.normal(size=(8, 10, 12)) * 50).astype(dtype)
  affine = io_testing.oblique_affine()
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
  affine = io_testing.oblique_affine()
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




# ------------------------------------------------------------------------------------- headers that lie


def _patch_header(path, **fields):
  """Rewrites header fields of an uncompressed .nii in place, bypassing nibabel's repairs (as a buggy tool would)."""
  with open(path, "rb") as f:
    header = type(nib.load(path).header).from_fileobj(f, check=False)
  for key, value in fields.items():
    if key.startswith("pixdim"):
      header["pixdim"][int(key[6:])] = value
    else:
      header[key] = value
  with open(path, "r+b") as f:
    f.write(header.binaryblock)


def test_no_orientation_warns_naming_the_assumed_affine_and_strict_raises(tmp_path):
  array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
  img = nib.Nifti1Image(io.volume.to_nibabel_order(array), np.diag([0.5, 0.8, 2.0, 1.0]))
  img.set_sform(None, code=0)
  img.set_qform(None, code=0)
  nib.save(img, tmp_path / "bare.nii")
  with pytest.warns(io.GeometryWarning, match=r"bare\.nii has qform_code = sform_code = 0 \(no orientation\): "
                                              r"assumed nibabel's fallback affine, .*\(-0\.5, 0\.8, 2\.0\)"):
    volume = io.read_nifti(tmp_path / "bare.nii")
  np.testing.assert_array_equal(volume.array, array)
  assert volume.xform_codes == (0, 0) and volume.spacing_mm == pytest.approx((2.0, 0.8, 0.5))
  np.testing.assert_allclose(np.diag(volume.affine), (-0.5, 0.8, 2.0, 1.0))
  for read in (lambda p: io.read_nifti(p, strict=True), lambda p: io.read_image(p, strict=True)):
    with pytest.raises(ValueError, match=r"bare\.nii has qform_code = sform_code = 0: no orientation \(strict=True"):
      read(tmp_path / "bare.nii")
  # Written back (e.g. a prediction on its grid), the file still says it has no orientation.
  with pytest.warns(io.GeometryWarning):
    io.write_nifti(tmp_path / "again.nii", volume)
    again = io.read_nifti(tmp_path / "again.nii")
  assert again.xform_codes == (0, 0)
  np.testing.assert_array_equal(again.affine, volume.affine)


@pytest.mark.parametrize("bad", [0.0, -0.75, np.nan])
def test_zero_negative_or_nan_voxel_size_is_an_error(tmp_path, bad):
  path = tmp_path / "lying.nii"
  io.write_nifti(path, io.Volume.from_array(np.zeros((3, 4, 5), np.float32), spacing_mm=(2.0, 0.8, 0.5)))
  assert type(nib.load(path)) is nib.Nifti2Image  # 0.8 is not float32-exact; NIfTI-1 is checked below
  _patch_header(path, pixdim2=bad)
  shown = "nan" if np.isnan(bad) else repr(bad)
  with pytest.raises(ValueError, match=rf"NIfTI file .*lying\.nii: voxel spacing pixdim\[1:4\] = \(0\.5, {shown}, "
                                       r"2\.0\) mm \(x, y, z\) holds zero, negative or NaN values"):
    io.read_nifti(path)
  with pytest.raises(ValueError, match=r"lying\.nii: voxel spacing"):
    io.read_image(path)
  io.write_nifti(tmp_path / "one.nii", io.Volume.from_array(np.zeros((3, 4, 5), np.int16), spacing_mm=(2.0, 1, 0.5)))
  _patch_header(tmp_path / "one.nii", pixdim1=bad)
  with pytest.raises(ValueError, match=rf"one\.nii: voxel spacing pixdim\[1:4\] = \({shown}, 1\.0, 2\.0\)"):
    io.read_nifti(tmp_path / "one.nii")


@pytest.mark.parametrize("codes", [(2, 2), (2, 1), (4, 0), (0, 2)])
def test_sform_and_qform_codes_survive_read_write_read(tmp_path, codes):
  affine = io_testing.oblique_affine().astype(np.float32).astype(np.float64)
  img = nib.Nifti1Image(np.zeros((5, 4, 3), np.int16), affine)
  img.set_sform(affine, code=codes[0])
  img.set_qform(affine, code=codes[1])
  nib.save(img, tmp_path / "in.nii.gz")
  volume = io.read_nifti(tmp_path / "in.nii.gz")
  assert volume.xform_codes == codes
  io.write_nifti(tmp_path / "out.nii.gz", volume)
  header = nib.load(tmp_path / "out.nii.gz").header
  assert (int(header["sform_code"]), int(header["qform_code"])) == codes
  back = io.read_image(tmp_path / "out.nii.gz")
  assert back.xform_codes == codes
  np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
  # Through reorientation and back (as a prediction is written), and with no codes: "scanner".
  canonical, undo = io.to_canonical(volume)
  assert canonical.xform_codes == codes and undo(canonical.array).xform_codes == codes
  io.write_nifti(tmp_path / "plain.nii.gz", io.Volume.from_array(np.zeros((3, 4, 5), np.int16)))
  header = nib.load(tmp_path / "plain.nii.gz").header
  assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
