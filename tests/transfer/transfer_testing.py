"""Helpers shared by the transfer tests: small medjax ResNet variables filled on the host (no compiling)."""

from __future__ import annotations

import numpy as np

from medjax.transfer import mapping


def random_variables(model_name: str, model_kwargs, seed: int = 0, in_channels: int = 3):
  """Variables of `model_name(**model_kwargs)` with random values everywhere (running variances positive), so
  any mix-up of tensors or layouts changes them."""
  rng = np.random.default_rng(seed)
  shapes = mapping.variable_shapes(model_name, model_kwargs, in_channels)

  def fill(tree, name=""):
    if isinstance(tree, dict):
      return {k: fill(v, k) for k, v in tree.items()}
    values = rng.uniform(0.5, 2.0, tree.shape) if name == "var" else rng.normal(size=tree.shape)
    return values.astype(tree.dtype)

  return fill({k: dict(v) for k, v in shapes.items()})
