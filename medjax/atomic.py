"""Atomic file writes: a crash or an error mid-write never leaves a half-written file behind.

Every file medjax writes next to a user's data or run (config.json, splits, NIfTI predictions, cache
entries) goes through `write_atomically`: the content is written to a temporary file in the same folder
(same file system), flushed to disk, then renamed over the target, which POSIX guarantees is atomic.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> str:
  """Calls `write(tmp_path)` and renames the result over `path`; on any error the temp file is removed.

  The temporary name keeps the target's full extension (".nii.gz", ".npz", ...), because nibabel, numpy
  and PIL choose the format from the suffix. Returns `path` as a string.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
  """`write_atomically` for a text file (UTF-8)."""

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  return write_atomically(path, write)
