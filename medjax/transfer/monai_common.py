"""What the MONAI families share (`monai_transformers`: UNETR, SwinUNETR; `monai_cnns`: DynUNet, DenseNet121).

Leaves: conv / linear weights `weight` <-> `kernel` (`mapping.KERNEL`), norm `weight`, `bias`, `running_mean`,
`running_var` <-> `scale`, `bias`, `mean`, `var`. A MONAI residual block (UnetResBlock / UnetBasicBlock) `X` is
`X.conv{k}.conv.weight` / `X.norm{k}.*` <-> medjax `X/conv{k}/kernel` / `X/norm{k}/*` (k = 1, 2, and 3 for the
1^d projection). A transposed conv weight `(I, O, *s)` (kernel == stride, no padding) <-> `layers.Upsample`'s
`(I, prod(s) * O)` (`transposed_conv_layout`). Inputs: medjax channels-last `(B, *spatial, C)`, torch
`(B, C, *spatial)`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax.models.base import MODELS
from medjax.transfer import mapping

def unknown(path: mapping.Path, family: str) -> ValueError:
  return ValueError(f"no MONAI {family} name for the medjax variable {'/'.join(path)}")


def res_block(path: mapping.Path, rest: Sequence[str], family: str) -> str:
  """MONAI UnetResBlock / UnetBasicBlock names below the block: conv{k} -> conv{k}.conv, norm{k} -> norm{k}."""
  if len(rest) == 1 and re.fullmatch(r"conv[123]", rest[0]):
    return f"{rest[0]}.conv.{mapping.leaf_name(path)}"
  if len(rest) == 1 and re.fullmatch(r"norm[123]", rest[0]):
    return f"{rest[0]}.{mapping.leaf_name(path)}"
  raise unknown(path, family)


@functools.cache
def transposed_conv_layout(strides: Tuple[int, ...]) -> mapping.Layout:
  """torch ConvTranspose weight `(I, O, *s)` (kernel == stride `s`, no padding) <-> `layers.Upsample`'s kernel
  `(I, prod(s) * O)`, whose channel `flat(o) * O + f` is output feature f at offset o (row-major) of each block:
  torch's output offset `o` reads tap `o` unflipped, so this is a transpose and a reshape."""
  n = int(np.prod(strides))

  def to_medjax(t, shape):  # (I, O, *s) -> (I, *s, O) -> (I, prod(s) * O)
    return np.moveaxis(t, 1, -1).reshape(shape)

  def to_torch(x):
    return np.moveaxis(x.reshape(x.shape[0], *strides, x.shape[1] // n), -1, 1)

  return mapping.Layout(f"transposed_conv{strides}", to_medjax, to_torch,
                        lambda shape: (shape[0], shape[1] // n, *strides))


def count(state_dict: Mapping[str, Any], pattern: str) -> int:
  """How many distinct values the group of `pattern` takes over the state dict's names."""
  return len({m[1] for m in (re.match(pattern, name) for name in state_dict) if m})


def spatial_norm_kind(state_dict: Mapping[str, Any], prefix: str, affine_name: str) -> Optional[str]:
  """"batch" where the norm `prefix` has running statistics, `affine_name` where it has only a weight."""
  if f"{prefix}.running_mean" in state_dict:
    return "batch"
  if f"{prefix}.weight" in state_dict:
    return affine_name
  return None


def model_default(model_name: str, field: str) -> Any:
  """The default of the registered medjax model's `field`; KeyError where the field has none."""
  for f in dataclasses.fields(MODELS.get(model_name)):
    if f.name == field and f.default is not dataclasses.MISSING:
      return f.default
  raise KeyError(field)


class MonaiMapping(mapping.TorchMapping):
  """Base of the MONAI families: `spatial_dims` (the dimension the layouts are built for) comes from the model's
  fields through `bind` (the state dict's first conv on import; the model's default where not given)."""

  source = "monai"

  def __init__(self, spatial_dims: int = 3):
    self.spatial_dims = int(spatial_dims)

  def bind(self, model_name: str, model_kwargs: Mapping[str, Any]) -> MonaiMapping:
    bound = copy.copy(self)
    bound.spatial_dims = int(self._field(model_name, model_kwargs, "spatial_dims"))
    return bound

  def _field(self, model_name: str, model_kwargs: Mapping[str, Any], field: str) -> Any:
    """The model's `field`: given in `model_kwargs`, else the model's default; ValueError if it has none."""
    if field in model_kwargs:
      return model_kwargs[field]
    try:
      return model_default(model_name, field)
    except KeyError:
      raise ValueError(f"{type(self).__name__} needs the medjax {model_name} field {field!r}: pass the model_kwargs "
                       f"the model was built with") from None

  @staticmethod
  def _fill_spatial_dims(state_dict, kwargs, first_conv: str) -> dict:
    """`kwargs` with `spatial_dims` read off the first conv's rank where not given."""
    kwargs = dict(kwargs)
    weight = state_dict.get(first_conv)
    if weight is not None and weight.ndim >= 3:
      kwargs.setdefault("spatial_dims", weight.ndim - 2)
    return kwargs

  @staticmethod
  def _in_channels(state_dict, first_conv: str) -> int:
    weight = state_dict.get(first_conv)
    return int(weight.shape[1]) if weight is not None and weight.ndim >= 2 else 1
