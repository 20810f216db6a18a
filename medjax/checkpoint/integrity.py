"""Damaged checkpoints: how a step directory is checked, hidden from Orbax, and (only when needed) moved aside.

A step is damaged when a file it needs is missing or truncated: `state/_METADATA` (the tree of the state),
the OCDBT manifest and b-tree nodes, the array data files they point into (`state/ocdbt.process_*/d/*`), or
any of Orbax's JSON files (`_CHECKPOINT_METADATA`, `state/_sharding`, `state/array_metadatas/*`,
`metrics/metrics`) when it no longer parses. `step_damage` checks this by reading only the small files and
comparing the data files' sizes with the byte ranges the b-tree points to, so it costs milliseconds whatever
the size of the state.

`Checkpointer` checks every step when it opens a directory and gives Orbax a step-name format that skips the
damaged ones (`IntactSteps`): Orbax never lists, ranks, restores or garbage-collects them, so a damaged step
stays on disk exactly as it was. The one exception is a run that must save that same step number again (it
resumed from an older step): the damaged directory is then renamed to `<step>.damaged` (`.damaged.1`, ...
if taken) in the same folder, every file kept, which Orbax does not take for a step.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import re
import sys
import types
from typing import Dict, Iterator, List, Mapping, Optional

import orbax.checkpoint as ocp

_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")  # Orbax's default step directory names
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names the directory and the step."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No such workdir, checkpoint directory or step (also a FileNotFoundError)."""


class DamagedCheckpointError(CheckpointError):
  """The requested step exists on disk but cannot be read; `.step` and `.reason` say which and why."""

  def __init__(self, message: str, step: int, reason: str):
    super().__init__(message)
    self.step, self.reason = step, reason


class DamagedCheckpointWarning(UserWarning):
  """A damaged step was skipped (a resume fell back to an older one) or moved aside to be saved again."""


def one_line(error: BaseException | str, limit: int = 200) -> str:
  """The first line of an error message, at most `limit` characters (TensorStore's run to many lines)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------ read errors


# A TensorStore status at the start of a message ("NOT_FOUND: ...", "FAILED_PRECONDITION: ...") means the files
# could not be read, as opposed to a tree that does not fit the requested state.
_READ_STATUS = re.compile(r"^[A-Z][A-Z_]{3,}: ")


def _chain(error: BaseException) -> List[BaseException]:
  chain: List[BaseException] = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def read_failure(error: BaseException) -> Optional[str]:
  """One line saying why reading failed when `error` (or what caused it) is a read error, else None.

  Orbax wraps TensorStore's status error (e.g. "FAILED_PRECONDITION: ... ZSTD_decompressStream() failed") in
  a bare Exception whose text points to a many-line spec; the status error is the useful line.
  """
  chain = _chain(error)
  statuses = [e for e in chain if _READ_STATUS.match(str(e))]
  if statuses:
    return one_line(statuses[-1])
  if isinstance(error, OSError) or not isinstance(error, (ValueError, TypeError, KeyError)):
    return one_line(str(error).split(" See full TensorStore details")[0])
  return None


def collect_abandoned_reads() -> None:
  """Collects, without a word, the read coroutines a failed Orbax restore leaves behind.

  When one array of a restore cannot be read, Orbax abandons the other reads of that restore as coroutines that
  hold an exception nobody retrieves; Python prints each (a many-line TensorStore spec) whenever the garbage
  collector happens to free it. The failure itself is reported by the caller in one line, so these are freed
  here, dropping what abandoned coroutines report during this one collection and passing on anything else.
  """
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if not isinstance(unraisable.object, types.CoroutineType):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    gc.collect()
  finally:
    sys.unraisablehook = previous


# ------------------------------------------------------------------------------------------ checking


def _json_damage(path: str, relative: str) -> Optional[str]:
  try:
    with open(path, "rb") as f:
      json.loads(f.read())
  except (ValueError, UnicodeDecodeError):
    return f"{relative} is truncated or not valid JSON"
  except OSError as e:
    return f"{relative} cannot be read ({one_line(e)})"
  return None


def _parse_location(location: str):
  """(file relative to the state directory, end offset) of an OCDBT reference, or None if unparsable.

  TensorStore writes `btreenode:<base>:<path>:<offset>:<length>` and `value:<base>:<path>:<offset>:<length>`
  (`<base>` is "" or e.g. "ocdbt.process_0/").
  """
  try:
    _, rest = location.split(":", 1)
    where, offset, length = rest.rsplit(":", 2)
    base, path = where.split(":", 1)
    return base + path, int(offset) + int(length)
  except ValueError:
    return None


def _ocdbt_damage(state_dir: str) -> Optional[str]:
  """Checks the OCDBT database of a PyTree checkpoint: manifest, b-tree nodes, and every data file's size."""
  import tensorstore as ts  # Orbax's own storage layer; imported here because only this check uses it

  if not os.path.isfile(os.path.join(state_dir, "manifest.ocdbt")):
    if glob.glob(os.path.join(state_dir, "ocdbt.process_*")):
      return "state/manifest.ocdbt is missing"
    return None  # not an OCDBT checkpoint (one zarr folder per array): nothing more to check cheaply
  sizes: Dict[str, Optional[int]] = {}

  def file_damage(location: str) -> Optional[str]:
    parsed = _parse_location(location)
    if parsed is None:
      return None  # an unknown reference format: reading it below will tell
    relative, end = parsed
    if relative not in sizes:
      full = os.path.join(state_dir, relative)
      sizes[relative] = os.path.getsize(full) if os.path.isfile(full) else None
    if sizes[relative] is None:
      return f"state/{relative} is missing"
    if sizes[relative] < end:
      return f"state/{relative} is truncated ({sizes[relative]} bytes, data up to byte {end} expected)"
    return None

  try:
    store = ts.KvStore.open({"driver": "file", "path": state_dir.rstrip("/") + "/"}).result()
    versions = ts.ocdbt.dump(store).result().get("versions") or []
    pending = [versions[-1].get("root", {}).get("location")] if versions else []
    while pending:
      location = pending.pop()
      if not location:
        continue  # an empty tree has no root node
      problem = file_damage(location)
      if problem:
        return problem
      for entry in ts.ocdbt.dump(store, location).result().get("entries", []):
        for value in entry.values():
          if isinstance(value, str) and value.startswith("btreenode:"):
            pending.append(value)
          elif isinstance(value, str) and value.startswith("value:"):
            problem = file_damage(value)
            if problem:
              return problem
  except Exception as e:  # TensorStore raises ValueError with a status ("OUT_OF_RANGE: ..."), or others
    return f"state/manifest.ocdbt or a b-tree node cannot be read ({one_line(e, 120)})"
  return None


def step_damage(step_dir: str | os.PathLike) -> Optional[str]:
  """Why the checkpoint in `step_dir` (`checkpoints/<step>`) cannot be restored, or None if it looks intact.

  Reads only the small files (JSON metadata, OCDBT manifest and b-tree nodes) and compares data-file sizes
  with the byte ranges the b-tree references; the arrays themselves are not read. The reason is one line
  naming the file relative to `step_dir`, e.g. "state/_METADATA is missing".
  """
  step_dir = os.fspath(step_dir)
  state_dir = os.path.join(step_dir, "state")
  if not os.path.isdir(state_dir):
    return "its state directory is missing"
  if not os.path.isfile(os.path.join(state_dir, "_METADATA")):
    return "state/_METADATA is missing"
  optional = [os.path.join(step_dir, "_CHECKPOINT_METADATA"), os.path.join(state_dir, "_sharding"),
              os.path.join(step_dir, "metrics", "metrics"),
              *sorted(glob.glob(os.path.join(state_dir, "array_metadatas", "*")))]
  for path in [os.path.join(state_dir, "_METADATA")] + [p for p in optional if os.path.isfile(p)]:
    problem = _json_damage(path, os.path.relpath(path, step_dir))
    if problem:
      return problem
  return _ocdbt_damage(state_dir)


def step_dirs(directory: str) -> Dict[int, str]:
  """{step: path} of the step directories Orbax would list under `directory` (names that are integers)."""
  if not os.path.isdir(directory):
    return {}
  return {int(name): os.path.join(directory, name) for name in os.listdir(directory)
          if _STEP_NAME.match(name) and os.path.isdir(os.path.join(directory, name))}


def find_damaged(directory: str) -> Dict[int, str]:
  """{step: reason} for every damaged step directory under `directory` (see `step_damage`)."""
  damaged = {}
  for step, path in sorted(step_dirs(directory).items()):
    reason = step_damage(path)
    if reason is not None:
      damaged[step] = reason
  return damaged


def read_metrics(directory: str, step: int) -> Optional[dict]:
  """The metrics saved with `step` read straight from disk (for a step Orbax does not list), or None."""
  try:
    with open(os.path.join(directory, str(step), "metrics", "metrics")) as f:
      metrics = json.load(f)
  except (OSError, ValueError):
    return None
  return metrics if isinstance(metrics, dict) else None


# ------------------------------------------------------------------------------------------ Orbax side


class IntactSteps:
  """Orbax step-name format (`CheckpointManagerOptions.step_name_format`) that hides the steps in `damaged`.

  Names and everything else are Orbax's default (`ocp.step.standard_name_format()`: the step number). The
  `damaged` mapping is shared with the Checkpointer, which adds a step found damaged while reading it and
  then reloads the manager.
  """

  def __init__(self, damaged: Mapping[int, str]):
    self._standard = ocp.step.standard_name_format()
    self._damaged = damaged

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path) -> Iterator:
    return (m for m in self._standard.find_all(base_path) if m.step not in self._damaged)

  def find_step(self, base_path, step: int):
    if step in self._damaged:
      raise ValueError(f"Checkpoint step {step} in {base_path} is damaged: {self._damaged[step]}.")
    return self._standard.find_step(base_path, step)


def move_aside(directory: str, step: int) -> str:
  """Renames `directory/<step>` to `directory/<step>.damaged` (or `.damaged.1`, ...); returns the new path.

  A rename in the same folder: every file is kept as it was, and Orbax does not take the new name for a step.
  """
  target = os.path.join(directory, f"{step}{DAMAGED_SUFFIX}")
  n = 0
  while os.path.exists(target):
    n += 1
    target = os.path.join(directory, f"{step}{DAMAGED_SUFFIX}.{n}")
  os.rename(os.path.join(directory, str(step)), target)
  return target
