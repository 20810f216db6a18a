"""Atomic file writes: a crash or an error mid-write never leaves a half-written file behind.

Every file medjax writes next to a user's data or run (config.json, splits, NIfTI predictions, cache
entries) goes through `write_atomically`: the content is written to a temporary file in the same folder
(same file system), flushed to disk, then renamed over the target, which POSIX guarantees is atomic.

The temporary file is created with mode 0o666 filtered by the process umask, as `open(path, "w")` would
create the target, so the renamed file gets the user's usual permissions (0644 under umask 022), not the
owner-only 0600 of `tempfile.mkstemp`: a run shared with a group stays readable by it.
"""

from __future__ import annotations

import os
import secrets
from typing import Callable

# Mode requested for new files; the kernel removes the umask's bits, exactly as for `open(path, "w")`.
_FILE_MODE = 0o666
_ATTEMPTS = 100


def create_temp_file(folder: str, prefix: str, suffix: str) -> str:
  """Creates a new, empty file `folder/<prefix><random><suffix>` and returns its path.

  Like `tempfile.mkstemp` (exclusive creation, so two writers never share a temp file) but with the
  permissions of an ordinary new file: 0o666 minus the umask, not 0600.
  """
  for _ in range(_ATTEMPTS):
    path = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
      continue
    os.close(fd)
    return path
  raise FileExistsError(f"Could not create a temporary file {prefix}*{suffix} in {folder}: "
                        f"{_ATTEMPTS} names were taken.")


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> str:
  """Calls `write(tmp_path)` and renames the result over `path`; on any error the temp file is removed.

  The temporary name keeps the target's full extension (".nii.gz", ".npz", ...), because nibabel, numpy
  and PIL choose the format from the suffix. The file gets the umask's permissions (module docstring),
  also when `write` replaces the temp file instead of writing into it. Returns `path` as a string.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
  tmp = create_temp_file(folder, prefix=f".{name}.", suffix=f".tmp{suffix}")
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
