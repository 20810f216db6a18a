"""The model registry, kept apart from the model files so that they can register themselves without
importing `medjax.models` (which imports them)."""

from __future__ import annotations

from typing import Any, Mapping

from medjax.registry import Registry

MODELS = Registry("model")


def build_model(name: str, kwargs: Mapping[str, Any] | None = None) -> Any:
  """Instantiates the model registered as `name` with keyword arguments `kwargs` (a config's `model` dict).

  Raises:
    KeyError: unknown `name` (the message suggests close names and lists all of them).
    ValueError: a key in `kwargs` is not a field of the model, or a required field is missing; the message
      names the model, the offending key and the model's fields.
  """
  return MODELS.build(name, kwargs, where="config.model")
