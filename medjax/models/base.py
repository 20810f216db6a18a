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


def submodule_variables(variables: Mapping[str, Any], submodule: str, *, skip: str, what: str) -> dict:
  """The variables of a wrapper's submodule `submodule` in its own names (`{"params": ..., "batch_stats": ...}`),
  leaving out the wrapper's collection `skip` and everything outside the submodule. Used to get the task model out
  of the pretext and domain-adversarial wrappers. Raises ValueError naming `what` when there is no
  params/`submodule` subtree."""
  out = {}
  for collection, tree in variables.items():
    if collection != skip and isinstance(tree, Mapping) and submodule in tree:
      out[collection] = tree[submodule]
  if "params" not in out:
    raise ValueError(f"these variables hold no {what}: no params/{submodule} subtree (top-level params: "
                     f"{sorted(variables.get('params', {}))}).")
  return out
