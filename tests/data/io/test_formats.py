"""read_image / write_image: one API over NIfTI, NRRD, MetaImage and DICOM folders; case names and file lists."""

import os
import warnings

import numpy as np
import pytest

from medjax.data import io
from medjax.data.io import formats
from tests.data.io import io_testing

pytest.importorskip("SimpleITK")
pytest.importorskip("nibabel")


def _volume(channels=None):
  shape = (3, 4, 5) if channels is None else (3, 4, 5, channels)
  array = (np.arange(np.prod(shape)).reshape(shape) - 20).astype(np.int16)
  return io.Volume.from_array(array, affine=io_testing.oblique_affine().astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("suffix", io.IMAGE_SUFFIXES)
def test_every_suffix_round_trips(tmp_path, suffix):
  assert suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
  path = tmp_path / f"case_01{suffix}"
  volume = _volume()
  io.write_image(path, volume)
  back = io.read_image(path)
  assert back.array.dtype == np.int16
  np.testing.assert_array_equal(back.array, volume.array)
  np.testing.assert_allclose(back.affine, volume.affine, atol=1e-12)
  assert io.image_suffix(path) == suffix and io.image_stem(path) == "case_01"
  channels = _volume(channels=2)
  io.write_image(path, channels)
  np.testing.assert_array_equal(io.read_image(path, allow_channels=True).array, channels.array)
  with pytest.raises(ValueError, match="allow_channels=True"):
    io.read_image(path)


def test_unsupported_paths_name_the_path_and_the_suffixes(tmp_path):
  (tmp_path / "scan.png").write_bytes(b"png")
  with pytest.raises(ValueError, match=r"cannot read .*scan\.png: unsupported file type; read_image reads \.nii\.gz, "
                                       r"\.nii, \.nrrd, \.nhdr, \.mha, \.mhd files and folders holding one DICOM"):
    io.read_image(tmp_path / "scan.png")
  with pytest.raises(FileNotFoundError, match=r"image not found: .*missing\.nrrd"):
    io.read_image(tmp_path / "missing.nrrd")
  with pytest.raises(ValueError, match=r"cannot write .*out\.dcm: unsupported file type; write_image writes \.nii\.gz, "
                                       r".*\.mhd files \(DICOM writing is not supported\)"):
    io.write_image(tmp_path / "out.dcm", _volume())
  assert io.image_suffix("a.nii.GZ") is None and io.image_stem("notes.txt") is None and io.image_stem(".nii") is None


def test_a_folder_is_a_dicom_series_and_strict_turns_its_warnings_into_errors(tmp_path, monkeypatch):
  calls = []

  def fake_series(folder):
    calls.append(os.fspath(folder))
    warnings.warn(f"DICOM series {folder}: slice positions rounded", io.GeometryWarning, stacklevel=2)
    return _volume()

  monkeypatch.setattr(formats.dicom, "read_dicom_series", fake_series)
  with pytest.warns(io.GeometryWarning, match="slice positions rounded"):
    volume = io.read_image(tmp_path)
  np.testing.assert_array_equal(volume.array, _volume().array)
  with pytest.raises(ValueError, match=r"DICOM series .*: slice positions rounded \(strict=True"):
    io.read_image(tmp_path, strict=True)
  assert calls == [str(tmp_path)] * 2


def test_list_images_and_image_files(tmp_path):
  io.write_image(tmp_path / "b.nii.gz", _volume())
  io.write_image(tmp_path / "a.mhd", _volume())  # header + a.zraw: the data file is not a case
  io.write_image(tmp_path / "c.nrrd", _volume())
  (tmp_path / ".d.nii.gz").write_bytes(b"hidden")  # e.g. another writer's temp file
  (tmp_path / "notes.txt").write_text("not an image")
  assert io.list_images(tmp_path) == {name: str(tmp_path / f) for name, f in
                                      (("a", "a.mhd"), ("b", "b.nii.gz"), ("c", "c.nrrd"))}
  assert io.image_files(tmp_path / "a.mhd") == [str(tmp_path / "a.mhd"), str(tmp_path / "a.zraw")]
  assert io.image_files(tmp_path / "b.nii.gz") == [str(tmp_path / "b.nii.gz")]
  io.write_image(tmp_path / "b.mha", _volume())
  with pytest.raises(ValueError, match=r"holds two image files for case 'b': b\.mha and b\.nii\.gz"):
    io.list_images(tmp_path)
