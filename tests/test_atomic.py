import os
import stat

import numpy as np
import pytest

from medjax import atomic


def test_text_write_replaces_whole_file(tmp_path):
  path = tmp_path / "config.json"
  atomic.write_text_atomically(path, "old")
  atomic.write_text_atomically(path, "new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "volume.nii.gz"
  path.write_text("previous")
  seen = []

  def failing(tmp):
    seen.append(tmp)
    with open(tmp, "w") as f:
      f.write("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    atomic.write_atomically(path, failing)
  assert path.read_text() == "previous" and os.listdir(tmp_path) == ["volume.nii.gz"]
  assert seen[0].endswith(".nii.gz")  # the temp name keeps the extension writers look at


# ------------------------------------------------------------------------------------ permissions


@pytest.fixture
def umask():
  """Sets the process umask for one test (`umask(0o027)`) and restores the previous one afterwards."""
  previous = os.umask(0o022)
  yield os.umask
  os.umask(previous)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions_not_0600(tmp_path, umask, mask, expected):
  umask(mask)
  text = atomic.write_text_atomically(tmp_path / "config.json", "{}")
  replaced = atomic.write_atomically(tmp_path / "cache.npz", lambda tmp: np.savez(tmp, x=np.arange(3)))
  assert (_mode(text), _mode(replaced)) == (expected, expected)
  atomic.write_text_atomically(tmp_path / "config.json", "{} ")  # an overwrite too
  assert _mode(tmp_path / "config.json") == expected


def test_temp_files_are_exclusive_and_keep_prefix_and_suffix(tmp_path, umask):
  first = atomic.create_temp_file(str(tmp_path), ".x.", ".tmp.npz")
  second = atomic.create_temp_file(str(tmp_path), ".x.", ".tmp.npz")
  assert first != second and os.path.basename(first).startswith(".x.") and first.endswith(".tmp.npz")
  assert os.path.getsize(first) == 0 and _mode(first) == 0o644


def test_preprocess_cache_entries_get_the_umask_permissions(tmp_path, umask):
  from medjax.data import preprocess
  preprocess.cached({"spacing_mm": 1.0}, "case 1", lambda: {"image": np.ones((2, 3), np.float32)}, tmp_path / "c")
  (entry,) = os.listdir(tmp_path / "c")
  assert entry.endswith(".npz") and _mode(tmp_path / "c" / entry) == 0o644


@pytest.mark.parametrize("name", ["image.nrrd", "image.mha", "image.nhdr", "image.mhd"])
def test_itk_writes_get_the_umask_permissions(tmp_path, umask, name):
  pytest.importorskip("SimpleITK")
  from medjax.data import io
  io.write_itk(tmp_path / name, io.Volume.from_array(np.zeros((2, 3, 4), np.int16)), compress=False)
  written = sorted(os.listdir(tmp_path))
  assert name in written and len(written) == (2 if name.endswith(("nhdr", "mhd")) else 1)  # header + .raw
  assert {f: _mode(tmp_path / f) for f in written} == dict.fromkeys(written, 0o644)
