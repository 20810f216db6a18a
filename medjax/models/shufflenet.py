"""Rank-generic ShuffleNetV2 (Ma et al. 2018) for 2D and 3D classification: the shuffle unit, channel
shuffle and the model. Its conv units are `layers.ConvNormAct`; the too-small-input check and remat helper
come from `mobile_blocks.py`.

Layer structure reproduces torchvision's parameter counts exactly (x1.0 with 3 input channels and 1000
classes: 2,278,604). Registered as "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5" and
"shufflenet_v2_x2_0".
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers, mobile_blocks
from medjax.models.base import MODELS

Dtype = Any


def channel_shuffle(x, groups: int):
  """Interleaves the channels of `groups` equal groups: `(B, *spatial, g * n)` with channel `a * n + b`
  going to `b * g + a`, so the next split mixes information from every group."""
  *lead, c = x.shape
  return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


class ShuffleBlock(nn.Module):
  """ShuffleNetV2 unit. stride 1: split the channels in half, keep one half, pass the other through
  1x1 -> 3^d depthwise -> 1x1 (ReLU after the 1x1s); stride 2: both branches see the whole input, the
  left one a 3^d stride-2 depthwise -> 1x1. Then concatenate and shuffle the two halves.
  `(B, *spatial, C) -> (B, *spatial / stride, features)`; `features` must be even.
  """
  features: int
  stride: int = 1
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    half = self.features // 2
    if self.stride == 1:
      left, right = jnp.split(x, 2, axis=-1)
    else:
      left = layers.ConvNormAct(x.shape[-1], 3, self.stride, groups=x.shape[-1], act="none",
                                name="left_depthwise", **kw)(x, train)
      left = layers.ConvNormAct(half, 1, act="relu", name="left_project", **kw)(left, train)
      right = x
    right = layers.ConvNormAct(half, 1, act="relu", name="right_expand", **kw)(right, train)
    right = layers.ConvNormAct(half, 3, self.stride, groups=half, act="none", name="right_depthwise",
                               **kw)(right, train)
    right = layers.ConvNormAct(half, 1, act="relu", name="right_project", **kw)(right, train)
    return channel_shuffle(jnp.concatenate([left.astype(right.dtype), right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  stem (3^d conv, stride 2, ReLU) -> 3^d max-pool, stride 2 -> three stages of shuffle units (the first
  of each with stride 2) -> 1x1 head conv (ReLU) -> global mean -> dense. No dropout, as in the reference.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked). The input must be at least 17 voxels on every axis
      (five stride-2 layers; `mobile_blocks.check_downsample`).
    stage_channels: widths of stem, stages 2-4 and head conv (set by the registered variants).
    stage_blocks: shuffle units per stage.
    norm: "batch" (running averages in "batch_stats") | "group" | "instance" | "none".
    dtype / param_dtype: compute / parameter dtypes (norm statistics in float32).
    remat: rematerialise each shuffle unit in the backward pass.

  aux: "features" (globally pooled head-conv features, `(B, stage_channels[4])` float32) and "stages"
  (the outputs of stages 2, 3, 4 at strides 8, 16, 32).
  """
  num_classes: int
  spatial_dims: int = 2
  stage_channels: Sequence[int] = (24, 116, 232, 464, 1024)
  stage_blocks: Sequence[int] = (4, 8, 4)
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    if len(self.stage_channels) != len(self.stage_blocks) + 2:
      raise ValueError(f"{name}: stage_channels={tuple(self.stage_channels)} needs {len(self.stage_blocks) + 2} "
                       f"entries (stem, one per stage in stage_blocks={tuple(self.stage_blocks)}, head).")
    nd = self.spatial_dims
    input_shape = x.shape[1:-1]
    min_size = mobile_blocks.min_input_size(2 + len(self.stage_blocks))
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)

    x = x.astype(self.dtype)
    mobile_blocks.check_downsample(x, input_shape, name, "stem", min_size)
    x = layers.ConvNormAct(self.stage_channels[0], 3, 2, act="relu", name="stem", **kw)(x, train)
    mobile_blocks.check_downsample(x, input_shape, name, "max_pool", min_size)
    x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)

    block_cls = mobile_blocks.maybe_remat(ShuffleBlock, self.remat)
    stages = []
    for i, (blocks, width) in enumerate(zip(self.stage_blocks, self.stage_channels[1:-1])):
      mobile_blocks.check_downsample(x, input_shape, name, f"stage{i + 2}", min_size)
      for j in range(blocks):
        x = block_cls(width, 2 if j == 0 else 1, name=f"stage{i + 2}_block{j}", **kw)(x, train)
      stages.append(x)

    x = layers.ConvNormAct(self.stage_channels[-1], 1, act="relu", name="head_conv", **kw)(x, train)
    features = layers.global_avg_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(
      features.astype(self.dtype))
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


# The registered variants only change the widths; every other field is `ShuffleNetV2`'s.


@MODELS.register("shufflenet_v2_x0_5")
class ShuffleNetV2x05(ShuffleNetV2):
  """ShuffleNetV2 x0.5 (1,366,792 parameters at 1000 classes). See `ShuffleNetV2`."""
  stage_channels: Sequence[int] = (24, 48, 96, 192, 1024)


@MODELS.register("shufflenet_v2_x1_0")
class ShuffleNetV2x10(ShuffleNetV2):
  """ShuffleNetV2 x1.0 (2,278,604 parameters at 1000 classes). See `ShuffleNetV2`."""
  stage_channels: Sequence[int] = (24, 116, 232, 464, 1024)


@MODELS.register("shufflenet_v2_x1_5")
class ShuffleNetV2x15(ShuffleNetV2):
  """ShuffleNetV2 x1.5 (3,503,624 parameters at 1000 classes). See `ShuffleNetV2`."""
  stage_channels: Sequence[int] = (24, 176, 352, 704, 1024)


@MODELS.register("shufflenet_v2_x2_0")
class ShuffleNetV2x20(ShuffleNetV2):
  """ShuffleNetV2 x2.0 (7,393,996 parameters at 1000 classes). See `ShuffleNetV2`."""
  stage_channels: Sequence[int] = (24, 244, 488, 976, 2048)
