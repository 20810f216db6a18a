"""The model registry, kept apart from the model files so that they can register themselves without
importing `medjax.models` (which imports them)."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

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


def pooled_features(aux: Mapping[str, Any], owner: str) -> Any:
  """Pooled features `(B, F)` float32 for a head on top of a backbone: a classifier's aux["features"] `(B, F)`,
  or a segmentation model's aux["bottleneck"] `(B, *spatial', F)` averaged over space (the encoder of a U-Net,
  UNETR or Swin UNETR). Used by the pretext heads and the domain-adversarial head. Raises ValueError naming
  `owner` (who needs the features) when the model exposes neither."""
  features = aux.get("features")
  if features is not None and features.ndim == 2:
    return features.astype(jnp.float32)
  bottleneck = aux.get("bottleneck")
  if bottleneck is not None and bottleneck.ndim > 2:
    return jnp.mean(bottleneck.astype(jnp.float32), axis=tuple(range(1, bottleneck.ndim - 1)))
  raise ValueError(f"{owner} needs pooled aux['features'] (B, F) or an aux['bottleneck'] map (B, *spatial, F) "
                   f"from its model; got aux keys {sorted(aux)} (features "
                   f"{None if features is None else tuple(features.shape)}).")
