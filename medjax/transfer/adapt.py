"""Adapting pretrained kernels to another input: 2D -> 3D inflation and another number of input channels.

Both keep the response to the input the pretrained network "expects" seen in the new shape:
- inflation (I3D: Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017): a volume whose slices
  are all the same image gives, at every slice, the 2D network's response to that image;
- channels (as timm's `adapt_input_conv`): an image whose channels are all equal gives the RGB network's
  response to the gray image repeated in R, G and B.

2.5D and ACS networks (`medjax.models.acs`) keep 2D kernels, so 2D weights load into them unchanged.
"""

from __future__ import annotations

import numpy as np

INFLATE_MODES = ("average", "center")


def inflate_kernel(kernel: np.ndarray, depth: int, mode: str = "average") -> np.ndarray:
  """A 2D conv kernel `(kh, kw, I, O)` as a 3D one `(depth, kh, kw, I, O)` (medjax's (z, y, x) order, depth
  first).

  mode: "average" repeats the kernel on every slice and divides by `depth` (I3D); "center" puts it on the
    middle slice (`depth // 2`) with zeros elsewhere, so each output slice starts as its own 2D response.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f"inflate_kernel takes a 2D conv kernel (kh, kw, I, O), got shape {kernel.shape}")
  if depth < 1:
    raise ValueError(f"inflate_kernel: depth must be >= 1, got {depth}")
  if mode == "average":
    return np.repeat(kernel[None], depth, axis=0) / np.asarray(depth, kernel.dtype)
  if mode == "center":
    out = np.zeros((depth, *kernel.shape), kernel.dtype)
    out[depth // 2] = kernel
    return out
  raise ValueError(f"unknown inflation mode {mode!r}; choose from {list(INFLATE_MODES)}")


def adapt_input_channels(kernel: np.ndarray, in_channels: int) -> np.ndarray:
  """A conv kernel `(*k, C, O)` with `C` input channels as one with `in_channels`.

  One channel: the sum over the C input channels (a gray image seen as R = G = B). More: the C channels
  repeated cyclically up to `in_channels` and scaled by C / in_channels, so an input with equal channels
  gives the original response whenever `in_channels` is a multiple of C (and about it otherwise).
  """
  kernel = np.asarray(kernel)
  if kernel.ndim < 3:
    raise ValueError(f"adapt_input_channels takes a conv kernel (*k, I, O), got shape {kernel.shape}")
  if in_channels < 1:
    raise ValueError(f"adapt_input_channels: in_channels must be >= 1, got {in_channels}")
  source = kernel.shape[-2]
  if in_channels == source:
    return kernel
  if in_channels == 1:
    return kernel.sum(axis=-2, keepdims=True)
  index = np.arange(in_channels) % source
  return np.take(kernel, index, axis=-2) * np.asarray(source / in_channels, kernel.dtype)
