import os

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
