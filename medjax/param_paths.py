"""Parameter paths and the patterns that select them, one convention for every config key that names
parameters (`config.optim.freeze` / `train_only` / `lr_multipliers` / `unfreeze`, `config.init_from.exclude`,
`config.pruning.exclude`).

A path is the "/"-joined key path inside a collection, without the collection: "layer1/block0/conv1/kernel".
A pattern is a shell glob (`fnmatch.fnmatchcase`, case-sensitive) matched against the whole path, where `*`
also matches "/"; a pattern also selects everything below a matching path, so "stem" == "stem/*".
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence, Tuple


def path_str(path: Sequence[Any]) -> str:
  """A pytree key path (`jax.tree_util` DictKey / GetAttrKey / SequenceKey entries, or plain strings) as
  "a/b/c"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def selects(pattern: str, path: str) -> bool:
  """True if the glob `pattern` matches `path` or one of its ancestors (so "stem" selects "stem/conv/kernel")."""
  return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def patterns(value: Any, where: str) -> Tuple[str, ...]:
  """A config value naming parameters (one pattern, a sequence of them, or None) as a tuple of patterns.
  Raises ValueError naming `where` for anything but non-empty strings."""
  value = (value,) if isinstance(value, str) else tuple(value or ())
  if not all(isinstance(v, str) and v for v in value):
    raise ValueError(f"{where} must be a non-empty pattern string or a sequence of them, got {value!r}.")
  return value
