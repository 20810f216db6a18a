"""Partial loading: pretrained variables merged into a freshly initialised model, with a report by path.

`merge(target, source, ...)` takes the new model's variables (`{"params": ..., "batch_stats": ...}`, freshly
initialised) and pretrained ones in medjax names (from a medjax checkpoint, or a torch file through
`from_torch`). Every target variable ends up in exactly one list of the `LoadReport`:

  loaded       copied from the source unchanged;
  adapted      copied after a documented change: 2D -> 3D inflation (`inflate`), another number of input
               channels (`adapt_channels`);
  initialised  kept from the fresh initialisation: matched by an `exclude` pattern (a new head), or absent
               from the source and allowed by `allow_missing`.

and every source variable not used is in `skipped` (excluded, or not in the model). Anything else (a
variable the source lacks, a shape no option adapts) is an error that lists all of them at once.

Patterns are those of `medjax.param_paths` (as in `config.optim.freeze`): fnmatch globs on "/"-joined paths
without the collection ("head/kernel", "stage4_*"); a pattern also selects everything under a path it matches
("head" is the head's kernel and bias).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax.param_paths import selects
from medjax.transfer import adapt
from medjax.transfer.mapping import WeightMismatchError, flatten, unflatten

Path = Tuple[str, ...]


def _name(path: Path) -> str:
  return "/".join(path)


def matches(path: Path, pattern: str) -> bool:
  """Whether the variable at `path` (collection first) is selected by `pattern` (`param_paths.selects` on the
  path without its collection)."""
  return selects(pattern, "/".join(path[1:]))


@dataclasses.dataclass
class LoadReport:
  """What `merge` did, by "/"-joined variable path (collection first)."""
  source: str = ""
  loaded: List[str] = dataclasses.field(default_factory=list)
  adapted: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, how)
  initialised: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why)
  skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (source path, why)

  def to_json(self) -> Dict[str, Any]:
    return {"source": self.source, "counts": self.counts(), "loaded": self.loaded,
            "adapted": [{"path": p, "how": h} for p, h in self.adapted],
            "initialised": [{"path": p, "why": w} for p, w in self.initialised],
            "skipped": [{"path": p, "why": w} for p, w in self.skipped]}

  def counts(self) -> Dict[str, int]:
    return {k: len(getattr(self, k)) for k in ("loaded", "adapted", "initialised", "skipped")}

  def summary(self, max_lines: int = 12) -> str:
    """A few lines for the log: the counts, then the adapted, initialised and skipped paths (truncated)."""
    counts = self.counts()
    lines = [f"init_from {self.source}: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    for title, items in (("adapted", self.adapted), ("initialised", self.initialised), ("skipped", self.skipped)):
      for path, why in items[:max_lines]:
        lines.append(f"  {title}: {path} ({why})")
      if len(items) > max_lines:
        lines.append(f"  ... {len(items) - max_lines} more {title} (see the saved report)")
    return "\n".join(lines)

  def write(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1)


def _adapt(path: Path, value: np.ndarray, shape: Tuple[int, ...], *, inflate: Optional[str],
           adapt_channels: bool) -> Tuple[Optional[np.ndarray], str]:
  """`value` reshaped to the target `shape` by the allowed options, and how; (None, why not) if none fits."""
  how = []
  if path[-1] == "kernel" and inflate and value.ndim == 4 and len(shape) == 5:
    value = adapt.inflate_kernel(value, shape[0], inflate)
    how.append(f"inflated to depth {shape[0]} ({inflate})")
  if (path[-1] == "kernel" and adapt_channels and value.ndim == len(shape) >= 3
      and value.shape[:-2] == shape[:-2] and value.shape[-1] == shape[-1] and value.shape[-2] != shape[-2]):
    how.append(f"input channels {value.shape[-2]} -> {shape[-2]}")
    value = adapt.adapt_input_channels(value, shape[-2])
  if tuple(value.shape) == tuple(shape):
    return value, ", ".join(how)
  if path[-1] == "kernel" and value.ndim == 4 and len(shape) == 5 and not inflate:
    return None, "a 2D kernel for a 3D model: set inflate ('average' or 'center')"
  return None, "no option adapts it"


def merge(target: Mapping[str, Any], source: Mapping[str, Any], *, exclude: Sequence[str] = (),
          inflate: Optional[str] = None, adapt_channels: bool = True, allow_missing: bool = False,
          source_name: str = "") -> Tuple[Dict[str, Any], LoadReport]:
  """Merges pretrained `source` variables into the freshly initialised `target` ones.

  target: the new model's variables, nested dicts of arrays (`{"params": ..., "batch_stats": ...}`).
  source: pretrained variables in medjax names, nested or flat (`{"params/stem_conv/kernel": array}`).
  exclude: patterns of target variables to keep freshly initialised (e.g. ("head",) for a new classifier);
    source variables they match are skipped.
  inflate: None, or an `adapt.INFLATE_MODES` mode for 2D source kernels of a 3D target.
  adapt_channels: adapt kernels that differ only in their input channels (the first convolution of an RGB
    network for 1-channel CT or N-channel MRI; see `adapt.adapt_input_channels`).
  allow_missing: target variables absent from the source stay initialised (reported) instead of an error.
  Returns (variables with target's structure and dtypes, LoadReport).

  Raises WeightMismatchError (a ValueError) listing every target variable the source lacks (unless
  `allow_missing`) and every one whose shape no option adapts, with both shapes.
  """
  flat_target = flatten(target)
  flat_source = {tuple(k.split("/")) if isinstance(k, str) else k: v
                 for k, v in (source.items() if all(isinstance(k, str) and "/" in k for k in source)
                              else flatten(source).items())}
  report = LoadReport(source=source_name)
  missing, mismatched, out = [], [], {}
  for path, fresh in flat_target.items():
    fresh_shape = tuple(np.shape(fresh))
    pattern = next((p for p in exclude if matches(path, p)), None)
    if pattern is not None:
      report.initialised.append((_name(path), f"excluded by {pattern!r}"))
      out[path] = fresh
    elif path not in flat_source:
      if allow_missing:
        report.initialised.append((_name(path), "not in the source"))
        out[path] = fresh
      else:
        missing.append((_name(path), fresh_shape))
    else:
      value = np.asarray(flat_source[path])
      if value.shape == fresh_shape:
        report.loaded.append(_name(path))
        out[path] = value.astype(np.asarray(fresh).dtype)
      else:
        adapted, how = _adapt(path, value, fresh_shape, inflate=inflate, adapt_channels=adapt_channels)
        if adapted is None:
          mismatched.append((_name(path), tuple(value.shape), fresh_shape, how))
        else:
          report.adapted.append((_name(path), how))
          out[path] = adapted.astype(np.asarray(fresh).dtype)
  for path in sorted(set(flat_source) - set(flat_target)):
    report.skipped.append((_name(path), "not in the model"))
  for path in sorted(set(flat_source) & set(flat_target)):
    pattern = next((p for p in exclude if matches(path, p)), None)
    if pattern is not None:
      report.skipped.append((_name(path), f"excluded by {pattern!r}"))
  if missing or mismatched:
    lines = [f"the pretrained variables{f' of {source_name}' if source_name else ''} do not fit the model: "
             f"{len(missing)} missing, {len(mismatched)} mis-shaped"]
    if missing:
      lines.append("missing from the source (path, model shape); exclude them or set allow_missing:")
      lines += [f"  {p} {s}" for p, s in missing]
    if mismatched:
      lines.append("mis-shaped (path: source shape -> model shape, why):")
      lines += [f"  {p}: {a} -> {b} ({why})" for p, a, b, why in mismatched]
    unused = [p for p, why in report.skipped if why == "not in the model"]
    if unused:
      lines.append(f"in the source but not in the model ({len(unused)}): " + ", ".join(unused[:20])
                   + (" ..." if len(unused) > 20 else ""))
    raise WeightMismatchError("\n".join(lines), missing=missing, unexpected=unused, mismatched=mismatched)
  return unflatten(out), report
