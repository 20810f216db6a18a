"""The model registry and `build_model`, kept apart from the model files so that they can register
themselves without importing `medjax.models` (which imports them)."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping

from medjax.registry import Registry

MODELS = Registry("model")

# Fields every Flax module has that a config must never set.
_FLAX_INTERNAL_FIELDS = ("parent", "name")


def model_fields(cls: Any) -> List[str]:
  """The keyword names a config may pass to model class `cls` (its dataclass fields, Flax internals aside)."""
  if not dataclasses.is_dataclass(cls):
    return []
  return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in _FLAX_INTERNAL_FIELDS]


def build_model(name: str, kwargs: Mapping[str, Any] | None = None) -> Any:
  """Instantiates the model registered as `name` with keyword arguments `kwargs` (a config's `model` dict).

  Raises:
    KeyError: unknown `name` (the message suggests close names and lists all of them).
    ValueError: a key in `kwargs` is not a field of the model, or a required field is missing; the message
      names the model, the offending key and the model's fields.
  """
  cls = MODELS.get(name)
  kwargs = dict(kwargs or {})
  fields = model_fields(cls)
  if fields:
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
      raise ValueError(f"Model {name!r} has no field(s) {', '.join(repr(k) for k in unknown)}. "
                       f"Valid fields of {name!r}: {', '.join(fields)}.")
  try:
    return cls(**kwargs)
  except TypeError as e:  # e.g. a missing required field, or a non-dataclass factory's bad keyword
    raise ValueError(f"Cannot build model {name!r} from {sorted(kwargs)}: {e}. "
                     f"Valid fields of {name!r}: {', '.join(fields) or '(unknown)'}.") from None
