"""Run provenance: `workdir/env.json` says which code, libraries and devices produced a run.

  {"git_commit": "8499654...", "git_dirty": false, "command": "python -m medjax.main --config ...",
   "versions": {"jax": "0.10.2", "jaxlib": ..., "flax": ..., "optax": ..., "orbax-checkpoint": ..., "numpy": ...},
   "python": "3.11.9", "device_kind": "cpu", "device_count": 8, "process_count": 1, "platform": "cpu",
   "hostname": ..., "started_at": "2026-12-05T03:10:00+00:00", "previous_sessions": [...]}

A resumed run rewrites the file with the current session on top and keeps the earlier sessions, so a run
that continued under another commit or library version says so. The commit is that of the git checkout
holding the medjax package (None outside one, e.g. an installed wheel).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

from medjax import atomic

ENV_FILE = "env.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _git(args: Sequence[str], cwd: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_state(path: Optional[str] = None) -> Dict[str, Any]:
  """{"git_commit": full hash or None, "git_dirty": bool or None} of the checkout holding `path` (default:
  the medjax package). Dirty means tracked files differ from the commit (untracked files do not count)."""
  path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = _git(["rev-parse", "HEAD"], path)
  if not commit:
    return {"git_commit": None, "git_dirty": None}
  status = _git(["status", "--porcelain", "--untracked-files=no"], path)
  return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def versions() -> Dict[str, Optional[str]]:
  """Installed versions of the packages that decide a run's numbers (None when one is missing)."""
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def command_line(argv: Sequence[str], main_module: Optional[str] = None) -> str:
  """The command as typed: `python -m medjax.main --config ...` for a module run with -m (whose argv[0] is
  the module's file), else `python script.py ...`. `main_module` defaults to `__main__`'s module name."""
  if main_module is None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    main_module = getattr(spec, "name", None)
  words = list(argv)
  if main_module and words:
    words = ["-m", main_module.removesuffix(".__main__")] + words[1:]
  return " ".join(shlex.quote(w) for w in [os.path.basename(sys.executable)] + words)


def collect(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """This process's provenance record (see the module docstring); `argv` defaults to `sys.argv`."""
  import jax  # here, not at the top: reading env.json (tables, reports) needs no JAX
  argv = list(sys.argv if argv is None else argv)
  devices = jax.devices()
  return {
      **git_state(),
      "command": command_line(argv),
      "cwd": os.getcwd(),
      "versions": versions(),
      "python": platform.python_version(),
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "hostname": socket.gethostname(),
      "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def read(workdir: str) -> Optional[Dict[str, Any]]:
  """`workdir/env.json`, or None when the run predates it (or the file is unreadable)."""
  path = os.path.join(workdir, ENV_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def write(workdir: str, env: Optional[Dict[str, Any]] = None) -> str:
  """Writes `env` (default `collect()`) to `workdir/env.json` atomically on process 0, keeping the earlier
  sessions of a resumed run under "previous_sessions"; returns the path."""
  import jax
  env = dict(collect() if env is None else env)
  path = os.path.join(workdir, ENV_FILE)
  old = read(workdir)
  previous: List[Dict[str, Any]] = []
  if old:
    previous = list(old.pop("previous_sessions", []) or []) + [old]
  env["previous_sessions"] = previous
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    atomic.write_text_atomically(path, json.dumps(env, indent=2, sort_keys=True) + "\n")
  return path


def short_commit(env: Optional[Dict[str, Any]]) -> str:
  """"8499654" or "8499654+dirty" for tables; "" when unknown."""
  if not env or not env.get("git_commit"):
    return ""
  return env["git_commit"][:7] + ("+dirty" if env.get("git_dirty") else "")
