"""Helpers shared by the transfer tests: small medjax model variables filled on the host (no compiling), exact
round-trip and state-dict checks, and torch models with randomised norms, their outputs and strict loading."""

from __future__ import annotations

from typing import Optional

import numpy as np

from medjax import transfer
from medjax.transfer import mapping as mapping_lib
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



def flat(tree):
  """Nested variables -> `{"a/b/c": np.ndarray}`."""
  return {"/".join(path): np.asarray(value) for path, value in mapping_lib.flatten(tree).items()}


def assert_same_state_dict(got, expected):
  """`got` has exactly the names of `expected` and, under each, the same dtype and values."""
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


def assert_exact_round_trip(family, state_dict, variables, model_name, given_kwargs=None, export_kwargs=None,
                            source="torchvision"):
  """`state_dict`, the export of `variables`, imports to exactly `variables` (every leaf and its dtype) and exports
  back to exactly `state_dict`; through the mapping `family` or, where it is None, the public `medjax.transfer`
  entry for `source`. `given_kwargs` go to `from_torch`, `export_kwargs` to `to_torch`. Returns the import."""
  if family is None:
    imported = transfer.from_torch(state_dict, model_name, given_kwargs, source=source)
    again = transfer.to_torch(imported, model_name, export_kwargs, source=source)
  else:
    imported = mapping_lib.from_torch(family, state_dict, model_name, given_kwargs)
    again = mapping_lib.to_torch(family, imported, model_name, export_kwargs)
  expected, got = flat(variables), flat(imported)
  assert sorted(got) == sorted(expected)
  for path, value in expected.items():
    assert got[path].dtype == value.dtype and np.array_equal(got[path], value), path
  assert_same_state_dict(again, state_dict)
  return imported


# ------------------------------------------------------------------------------------------ with torch


def randomise_norms(torch, model):
  """Random affine parameters and running statistics in every BatchNorm1d/2d/3d of the torch `model` (torch's
  1 / 0 would hide a swapped scale/mean/var); returns the model in eval mode."""
  batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, batch_norms):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
  return model.eval()


def torch_state_and_outputs(torch, model, x):
  """The torch `model`'s state dict as numpy arrays and its outputs on the numpy batch `x` (without gradients)."""
  state_dict = {name: value.numpy() for name, value in model.state_dict().items()}
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  return state_dict, expected


def assert_export_loads_strictly(torch, model, state_dict, exported):
  """The medjax export `exported` is the torch `model`'s `state_dict` exactly (names, dtypes, values) and the
  model's strict `load_state_dict` takes it (same names, shapes, counters included)."""
  assert_same_state_dict(exported, state_dict)
  model.load_state_dict({name: torch.from_numpy(value) for name, value in exported.items()}, strict=True)
