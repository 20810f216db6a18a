"""Key paths of a state tree as Orbax names them on disk, and what differs between a checkpoint and a target."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax

from medjax.typing import PyTree


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_str(path: Sequence[Any]) -> str:
  """A key path as Orbax names it on disk ("opt_state.0.mu.conv.kernel"), whatever the container types."""
  return ".".join(_key_name(p) for p in path)


def _shapes_by_path(tree: PyTree) -> Dict[str, Tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def _listed(items: Sequence[str], limit: int = 5, sep: str = ", ") -> str:
  more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
  return sep.join(items[:limit]) + more


def mismatch(saved: PyTree, wanted: PyTree, partial: bool = False) -> Optional[str]:
  """What differs between a checkpoint's metadata tree and the requested abstract state, or None.

  Names the key paths missing from the checkpoint, those the target lacks (allowed when `partial`), and
  those whose shapes differ, five of each at most; Orbax's own error names no leaf and runs to many lines.
  """
  saved, wanted = _shapes_by_path(saved), _shapes_by_path(wanted)
  missing = sorted(set(wanted) - set(saved))
  extra = [] if partial else sorted(set(saved) - set(wanted))
  bad = [f"{k}: checkpoint {saved[k]} vs requested {v}" for k, v in wanted.items()
         if k in saved and tuple(saved[k]) != v]
  problems = []
  if missing:
    problems.append(f"missing from the checkpoint: {_listed(missing)}")
  if extra:
    problems.append(f"not in the requested state: {_listed(extra)}")
  if bad:
    problems.append(f"shape mismatch at {_listed(bad, sep='; ')}")
  return "; ".join(problems) or None
