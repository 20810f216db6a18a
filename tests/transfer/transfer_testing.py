"""Helpers shared by the transfer tests: small medjax model variables filled on the host (no compiling)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from medjax.transfer.mapping import TorchMapping, variable_shapes


def random_variables(model_name: str, model_kwargs, seed: int = 0, in_channels: int = 3,
                     mapping: Optional[TorchMapping] = None):
  """Variables of `model_name(**model_kwargs)` with random values everywhere (running variances positive), so
  any mix-up of tensors or layouts changes them; traced at `mapping.input_shape` (the family's input: the image
  size the position embeddings fix, one voxel at a U-Net's bottleneck) or a `(1, 64, ..., in_channels)` input."""
  rng = np.random.default_rng(seed)
  shapes = variable_shapes(model_name, model_kwargs, in_channels, mapping)

  def fill(tree, name=""):
    if isinstance(tree, dict):
      return {k: fill(v, k) for k, v in tree.items()}
    values = rng.uniform(0.5, 2.0, tree.shape) if name == "var" else rng.normal(size=tree.shape)
    return values.astype(tree.dtype)

  return fill({k: dict(v) for k, v in shapes.items()})

