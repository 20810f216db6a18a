"""2D kernels on 3D volumes: ACS convolution, 2.5D (slice-wise) convolution, and the 3D ResNets built on them.

ACS convolution (Yang, Huang, Ni et al., "Reinventing 2D Convolutions for 3D Images", IEEE JBHI 25(8),
2021): a convolution keeps a 2D kernel `(k, k, C_in, F)` and splits its F output channels into three
groups, each applying its slice of the kernel in one anatomical plane of a `(z, y, x)` volume:

  group     plane                    3D kernel (z, y, x)   2D kernel axes (h, w) map to
  axial     y-x (normal to z)        (1, k, k)             (y, x)
  coronal   z-x (normal to y)        (k, 1, k)             (z, x)
  sagittal  z-y (normal to x)        (k, k, 1)             (z, y)

The groups' outputs are concatenated along channels in that order (axial first). The default split is the
paper's: F // 3 channels per group, and the F % 3 remaining ones go to the first groups (axial, then
coronal), i.e. ceil-thirds. 2.5D convolution applies the whole 2D kernel in the axial plane, slice by
slice, a `(1, k, k)` 3D convolution.

Both keep the parameters of a 2D convolution ("kernel" `(k, k, C_in, F)`, "bias" `(F,)`), so a network
built from them has exactly the parameter tree of its 2D twin and 2D (e.g. ImageNet) weights load directly.
A 3D stride `(s_z, s_y, s_x)` applies to every group (as in the paper's converters); in 2.5D a z-stride
keeps every s_z-th slice. Padding is `k // 2` on the kernel's in-plane axes and 0 on its unit axis, so
all groups give the same output size for odd k.

Conv kinds are registered in `CONV_KINDS` ("2d", "3d": the ordinary rank-generic convolution of
`layers.conv`, the "3d" ResNet being the 2D one with full k^3 kernels; "acs"; "2.5d"), each a factory with
`layers.conv`'s signature. Registered models: "resnet{18,34,50,101}_acs" and "resnet{18,34,50,101}_2.5d",
3D ResNets (`spatial_dims=3` by default) whose every convolution is of that kind; the plain "resnet18" etc.
with `spatial_dims=3` is the "3d" choice.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS
from medjax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101
from medjax.registry import Registry

Dtype = Any

PLANES = ("axial", "coronal", "sagittal")
# The (z, y, x) axis that each plane's kernel does not span (where the 2D kernel gets its unit axis).
PLANE_NORMAL_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}

CONV_KINDS = Registry("conv kind")


def acs_split(features: int) -> Tuple[int, int, int]:
  """The paper's default channel split (axial, coronal, sagittal): thirds, the remainder to the first groups.
  `acs_split(64) == (22, 21, 21)`."""
  base, extra = divmod(int(features), 3)
  return tuple(base + (i < extra) for i in range(3))


def kernel_2d(kernel_size: Sequence[int], module: str) -> Tuple[int, int]:
  """The square odd 2D kernel `(k, k)` from a 2-entry size or an isotropic 3-entry one (as a rank-generic
  caller such as `ResNet` passes for a 3D input); anything else raises ValueError naming `module`."""
  size = (int(kernel_size),) * 2 if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
  if len(size) not in (2, 3) or len(set(size)) != 1 or size[0] % 2 == 0:
    raise ValueError(f"{module}: kernel_size must be an odd k, (k, k) or (k, k, k) (a 2D kernel applied to a "
                     f"3D volume), got {tuple(size)}.")
  return size[0], size[0]


def plane_conv(x, kernel, plane: str, strides: Sequence[int], dtype: Dtype = jnp.float32):
  """Applies a 2D kernel `(k, k, C_in, F)` to `x` `(B, z, y, x, C_in)` in `plane` (table in the module doc)
  with `k // 2` in-plane padding and 3D `strides`; returns `(B, z', y', x', F)` in `dtype`."""
  axis = PLANE_NORMAL_AXIS[plane]
  kernel3d = jnp.expand_dims(kernel, axis)
  padding = [(k // 2, k // 2) for k in kernel3d.shape[:3]]
  return jax.lax.conv_general_dilated(
      x.astype(dtype), kernel3d.astype(dtype), window_strides=tuple(strides), padding=padding,
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _check_volume(x, module: str) -> None:
  if x.ndim != 5:
    raise ValueError(f"{module} applies 2D kernels to 3D volumes and expects input (B, z, y, x, C), got shape "
                     f"{tuple(x.shape)}.")


class _Conv2DOn3D(nn.Module):
  """Shared fields and parameters of the 2D-kernel convolutions on volumes (see the module doc)."""
  features: int
  kernel_size: Any = 3
  strides: Any = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.he_normal()

  def _params(self, x):
    """Checks `x` and returns (2D kernel, bias or None, 3D strides)."""
    name = type(self).__name__
    _check_volume(x, name)
    k = kernel_2d(self.kernel_size, name)
    strides = layers.to_tuple(self.strides, 3, f"{name} strides")
    # fan_in k * k * C_in, as the 2D convolution whose weights this kernel stands for.
    kernel = self.param("kernel", self.kernel_init, (*k, x.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return kernel, bias, strides

  def _add_bias(self, y, bias):
    return y if bias is None else y + bias.astype(self.dtype)


class ACSConv(_Conv2DOn3D):
  """ACS convolution: `(B, z, y, x, C_in)` -> `(B, z', y', x', features)` with a 2D kernel whose output
  channels are split over the axial, coronal and sagittal planes (module doc).

  Fields: features; kernel_size (odd k, (k, k) or (k, k, k)); strides (int or (s_z, s_y, s_x)); use_bias;
  split: channels per (axial, coronal, sagittal) group summing to `features`, None for `acs_split`;
  dtype / param_dtype; kernel_init (of the 2D kernel).
  Params: "kernel" (k, k, C_in, features) and "bias" (features,) if use_bias.
  """
  split: Optional[Tuple[int, int, int]] = None

  @nn.compact
  def __call__(self, x):
    kernel, bias, strides = self._params(x)
    split = acs_split(self.features) if self.split is None else tuple(int(n) for n in self.split)
    if len(split) != 3 or min(split) < 0 or sum(split) != self.features:
      raise ValueError(f"ACSConv: split {tuple(self.split)} must be three channel counts >= 0 (axial, "
                       f"coronal, sagittal) summing to features={self.features}.")
    if kernel.shape[0] == 1:  # a 1x1 kernel spans no plane: every group is the same pointwise convolution
      return self._add_bias(plane_conv(x, kernel, "axial", strides, self.dtype), bias)
    outputs, start = [], 0
    for plane, n in zip(PLANES, split):
      if n:  # a group with no channels has no convolution (features < 3, or a one-plane split)
        outputs.append(plane_conv(x, kernel[..., start:start + n], plane, strides, self.dtype))
      start += n
    y = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)
    return self._add_bias(y, bias)


class SliceConv(_Conv2DOn3D):
  """2.5D convolution: the 2D kernel applied to every axial (y-x) slice, `(B, z, y, x, C_in)` ->
  `(B, z', y', x', features)`; a z-stride s keeps every s-th slice. Fields and params as `ACSConv` (no
  split)."""

  @nn.compact
  def __call__(self, x):
    kernel, bias, strides = self._params(x)
    return self._add_bias(plane_conv(x, kernel, "axial", strides, self.dtype), bias)


def _factory(module_cls):
  def make(features: int, kernel_size: Tuple[int, ...], strides: Optional[Tuple[int, ...]] = None, *,
           use_bias: bool, dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None):
    return module_cls(features, kernel_size, strides or 1, use_bias=use_bias, dtype=dtype,
                      param_dtype=param_dtype, name=name)

  make.__name__ = make.__qualname__ = f"{module_cls.__name__.lower()}_factory"
  make.__doc__ = f"`layers.conv`-compatible factory of `{module_cls.__name__}` (3D input only)."
  return make


acs_conv = _factory(ACSConv)
slice_conv = _factory(SliceConv)
CONV_KINDS.add("2d", layers.conv)
CONV_KINDS.add("3d", layers.conv)
CONV_KINDS.add("acs", acs_conv)
CONV_KINDS.add("2.5d", slice_conv)


# ------------------------------------------------------------------------------------------------ ResNets


def _variant(base, kind: str, label: str, suffix: str):
  """`base` (a registered ResNet) with every convolution of conv kind `kind` and `spatial_dims=3`,
  registered as "resnet{depth}_{kind}"."""
  depth = base.__name__[len("ResNet"):]
  cls = type(f"{base.__name__}{suffix}", (base,), {
      "__module__": __name__,
      "__annotations__": {"spatial_dims": int, "conv_factory": Callable},
      "spatial_dims": 3,
      "conv_factory": CONV_KINDS.get(kind),
      "__doc__": (f"3D ResNet-{depth} whose convolutions are {label} convolutions of 2D kernels "
                  f"(medjax.models.acs); the parameter tree equals the 2D ResNet-{depth}'s. Fields and outputs "
                  f"as `ResNet` (spatial_dims must stay 3)."),
  })
  MODELS.add(f"resnet{depth}_{kind}", cls)
  return cls


ResNet18ACS = _variant(ResNet18, "acs", "ACS", "ACS")
ResNet34ACS = _variant(ResNet34, "acs", "ACS", "ACS")
ResNet50ACS = _variant(ResNet50, "acs", "ACS", "ACS")
ResNet101ACS = _variant(ResNet101, "acs", "ACS", "ACS")
ResNet18Slice = _variant(ResNet18, "2.5d", "2.5D", "Slice")
ResNet34Slice = _variant(ResNet34, "2.5d", "2.5D", "Slice")
ResNet50Slice = _variant(ResNet50, "2.5d", "2.5D", "Slice")
ResNet101Slice = _variant(ResNet101, "2.5d", "2.5D", "Slice")
