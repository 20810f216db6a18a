"""ITK formats (NRRD, MetaImage) through SimpleITK: LPS <-> RAS geometry, dtypes, channels, atomic writes, errors."""

import os
import warnings

import numpy as np
import pytest

from medjax.data import io
from medjax.data.io import itk

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SPACING_XYZ = (0.7, 0.9, 2.5)  # anisotropic, ITK order (x, y, z)
ORIGIN_LPS = (10.1, -20.3, 5.5)
VOXELS = [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2, 0, 4)]  # (z, y, x)


def oblique_direction():
  """Rotations about z and x, and a mirrored y axis: nothing is axis-aligned and the determinant is -1."""
  a, b = np.deg2rad(25.0), np.deg2rad(-10.0)
  rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
  return rz @ rx @ np.diag([1.0, -1.0, 1.0])


def sitk_image(array, is_vector=False):
  image = sitk.GetImageFromArray(array, isVector=is_vector)
  image.SetDirection(oblique_direction().ravel().tolist())
  image.SetSpacing(SPACING_XYZ)
  image.SetOrigin(ORIGIN_LPS)
  return image


def ras_point(image, z, y, x):
  """SimpleITK's own index -> physical point (LPS), converted to RAS."""
  return np.asarray(image.TransformIndexToPhysicalPoint((x, y, z))) * (-1.0, -1.0, 1.0)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_sitk_files_read_with_its_geometry_and_match_nifti(tmp_path, suffix, dtype):
  array = (np.random.default_rng(0).normal(size=(4, 5, 6)) * 40).astype(dtype)
  image = sitk_image(array)
  path = tmp_path / f"img{suffix}"
  sitk.WriteImage(image, str(path))
  volume = io.read_itk(path)
  assert volume.array.dtype == dtype and volume.array.shape == (4, 5, 6) and volume.xform_codes is None
  np.testing.assert_array_equal(volume.array, array)
  assert volume.spacing_mm == pytest.approx(SPACING_XYZ[::-1], abs=1e-12)
  for z, y, x in VOXELS:
    np.testing.assert_allclose((volume.affine @ [x, y, z, 1])[:3], ras_point(image, z, y, x), atol=1e-9)
  # The same image as NIfTI, written by nibabel with the affine built from ITK's geometry here.
  lps = np.eye(4)
  lps[:3, :3] = oblique_direction() @ np.diag(SPACING_XYZ)
  lps[:3, 3] = ORIGIN_LPS
  nifti_path = tmp_path / "same.nii.gz"
  nib.save(nib.Nifti2Image(array.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), nifti_path)
  same = io.read_nifti(nifti_path)
  np.testing.assert_array_equal(same.array, volume.array)
  np.testing.assert_allclose(same.affine, volume.affine, atol=1e-12)
  # And as NIfTI written by SimpleITK itself (its own LPS -> RAS conversion; float32 header fields).
  sitk.WriteImage(image, str(tmp_path / "by_itk.nii.gz"))
  by_itk = io.read_nifti(tmp_path / "by_itk.nii.gz")
  np.testing.assert_array_equal(by_itk.array, volume.array)
  np.testing.assert_allclose(by_itk.affine, volume.affine, atol=1e-5)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_itk_round_trips_and_simpleitk_reads_the_same_geometry(tmp_path, suffix):
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block([[oblique_direction() @ np.diag(SPACING_XYZ),
                                                       np.reshape(ORIGIN_LPS, (3, 1))], [np.zeros((1, 3)), 1.0]])
  array = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5) - 7
  volume = io.Volume.from_array(array, affine=affine)
  path = tmp_path / f"out{suffix}"
  io.write_itk(path, volume)
  image = sitk.ReadImage(str(path))
  np.testing.assert_allclose(image.GetDirection(), oblique_direction().ravel(), atol=1e-12)
  np.testing.assert_allclose(image.GetOrigin(), ORIGIN_LPS, atol=1e-12)
  np.testing.assert_allclose(image.GetSpacing(), SPACING_XYZ, atol=1e-12)
  np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
  back = io.read_itk(path)
  assert back.array.dtype == np.int32
  np.testing.assert_array_equal(back.array, array)
  np.testing.assert_allclose(back.affine, affine, atol=1e-12)
  assert itk.geometry(volume)[0] == pytest.approx(ORIGIN_LPS, abs=1e-12)
  names = sorted(os.listdir(tmp_path))
  assert not [n for n in names if n.startswith(".")]  # no temp file or folder left
  if suffix == ".mhd":
    assert names == ["out.mhd", "out.zraw"] and itk.data_files(path) == [str(tmp_path / "out.zraw")]
  elif suffix == ".nhdr":
    assert names == ["out.nhdr", "out.raw.gz"] and itk.data_files(path) == [str(tmp_path / "out.raw.gz")]
  else:
    assert names == [f"out{suffix}"] and itk.data_files(path) == []
  # Writing again over the pair replaces it (uncompressed: a new data file name beside the old one).
  io.write_itk(path, volume.replace(array=array * 2), compress=False)
  np.testing.assert_array_equal(io.read_itk(path).array, array * 2)


def test_vector_pixels_and_4d_images_read_as_channels(tmp_path):
  array = np.random.default_rng(1).normal(size=(3, 4, 5, 2)).astype(np.float32)
  sitk.WriteImage(sitk_image(array, is_vector=True), str(tmp_path / "vec.nrrd"))
  with pytest.raises(ValueError, match=r"expected a 3D scalar image, got a 3D image of size \(5, 4, 3\) .* with 2 "
                                       r"component\(s\) per pixel in .*vec\.nrrd; pass allow_channels=True"):
    io.read_itk(tmp_path / "vec.nrrd")
  volume = io.read_itk(tmp_path / "vec.nrrd", allow_channels=True)
  assert volume.array.shape == (3, 4, 5, 2) and volume.num_channels == 2
  np.testing.assert_array_equal(volume.array, array)
  io.write_itk(tmp_path / "vec.mha", volume)  # channels go back as vector pixels
  assert sitk.ReadImage(str(tmp_path / "vec.mha")).GetNumberOfComponentsPerPixel() == 2
  np.testing.assert_array_equal(io.read_itk(tmp_path / "vec.mha", allow_channels=True).array, array)
  series = sitk.JoinSeries([sitk.GetImageFromArray(array[..., c]) for c in range(2)])  # 4D scalar (x, y, z, t)
  sitk.WriteImage(series, str(tmp_path / "four.nrrd"))
  np.testing.assert_array_equal(io.read_itk(tmp_path / "four.nrrd", allow_channels=True).array, array)
  with pytest.raises(ValueError, match=r"got a 4D image of size \(5, 4, 3, 2\)"):
    io.read_itk(tmp_path / "four.nrrd")


def test_nrrd_without_space_warns_or_raises_when_strict(tmp_path):
  path = tmp_path / "nospace.nrrd"
  sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(path))
  raw = path.read_bytes()
  head, data = raw.split(b"\n\n", 1)
  lines = [line for line in head.split(b"\n") if not line.startswith((b"space", b"space directions", b"space origin"))]
  path.write_bytes(b"\n".join(lines + [b"spacings: 0.5 0.5 2"]) + b"\n\n" + data)
  with pytest.warns(io.GeometryWarning, match=r"nospace\.nrrd has no 'space' or 'space directions' field .*assumed the voxel axes mapped "
                                              r"to LPS"):
    volume = io.read_itk(path)
  assert volume.spacing_mm == (2.0, 0.5, 0.5)
  with pytest.raises(ValueError, match=r"nospace\.nrrd has no 'space' .*strict=True"):
    io.read_itk(path, strict=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # SimpleITK's own files state their orientation: no warning
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(tmp_path / "ok.mha"))
    io.read_itk(tmp_path / "ok.mha", strict=True)


def test_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing\.nrrd"):
    io.read_itk(tmp_path / "missing.nrrd")
  (tmp_path / "junk.nrrd").write_bytes(b"not an image" * 10)
  with pytest.raises(ValueError, match=r"cannot read image file .*junk\.nrrd: .*ERROR"):
    io.read_itk(tmp_path / "junk.nrrd")
  io.write_itk(tmp_path / "pair.mhd", io.Volume.from_array(np.zeros((2, 3, 4), np.int16)), compress=False)
  os.remove(tmp_path / "pair.raw")
  with pytest.raises(ValueError, match=r"cannot read image file .*pair\.mhd"):
    io.read_itk(tmp_path / "pair.mhd")
  header = (tmp_path / "pair.mhd").read_text().replace("ElementSpacing = 1 1 1", "ElementSpacing = 0 1 1")
  (tmp_path / "zero.mhd").write_text(header)
  with pytest.raises(ValueError, match=r"zero\.mhd: .*Zero-valued spacing"):
    io.read_itk(tmp_path / "zero.mhd")
  io.write_nifti(tmp_path / "a.nii.gz", io.Volume.from_array(np.zeros((2, 3, 4), np.int16)))
  with pytest.raises(ValueError, match="read_nifti"):
    io.read_itk(tmp_path / "a.nii.gz")
  with pytest.raises(ValueError, match=r"bool volume .*bad\.nrrd"):
    io.write_itk(tmp_path / "bad.nrrd", io.Volume.from_array(np.zeros((2, 3, 4), bool)))
  with pytest.raises(ValueError, match=r"must end with one of .nrrd, .nhdr, .mha, .mhd, got .*bad\.png"):
    io.write_itk(tmp_path / "bad.png", io.Volume.from_array(np.zeros((2, 3, 4), np.float32)))
  assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "junk.nrrd", "pair.mhd", "zero.mhd"]


def test_data_files_of_detached_headers(tmp_path):
  (tmp_path / "list.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                      "data file: LIST\nslice0.raw\nslice1.raw\n")
  assert itk.data_files(tmp_path / "list.nhdr") == [str(tmp_path / "slice0.raw"), str(tmp_path / "slice1.raw")]
  (tmp_path / "pattern.mhd").write_text("NDims = 3\nDimSize = 2 2 3\nElementType = MET_SHORT\n"
                                        "ElementDataFile = sl%02d.raw 1 3 1\n")
  assert itk.data_files(tmp_path / "pattern.mhd") == [str(tmp_path / f"sl0{i}.raw") for i in (1, 2, 3)]
  assert io.image_files(tmp_path / "pattern.mhd")[1:] == itk.data_files(tmp_path / "pattern.mhd")
