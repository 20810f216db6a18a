"""The MobileNet models: rank-generic MobileNetV2 (Sandler et al. 2018) and MobileNetV3 Small / Large
(Howard et al. 2019) for 2D and 3D classification.

This file holds only the model definitions (stage tables, stem, head). The blocks they are built from
(`InvertedResidual`, `SqueezeExcite`, `make_divisible`, ...) are in `mobile_blocks.py`, shared with
EfficientNet and ShuffleNetV2; `layers.ConvNormAct` and `layers.activation` come from `layers.py`.

Layer structure and torchvision's channel rounding (`mobile_blocks.make_divisible`) reproduce torchvision's
parameter counts exactly at 3 input channels and 1000 classes: mobilenet_v2 3,504,872, mobilenet_v3_large
5,483,032, mobilenet_v3_small 2,542,856. Registered as "mobilenet_v2", "mobilenet_v3_small" and
"mobilenet_v3_large".
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers, mobile_blocks
from medjax.models.base import MODELS

Dtype = Any

# MobileNetV2 per stage: (expand_ratio, out_channels, blocks, first stride).
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))

# MobileNetV3 per block: (kernel, expanded, out_channels, squeeze-excitation, activation, stride); the stem
# has 16 channels; then (head conv width, classifier hidden width).
V3_BLOCKS = {
  "large": (
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hard_swish", 2),
    (3, 200, 80, False, "hard_swish", 1),
    (3, 184, 80, False, "hard_swish", 1),
    (3, 184, 80, False, "hard_swish", 1),
    (3, 480, 112, True, "hard_swish", 1),
    (3, 672, 112, True, "hard_swish", 1),
    (5, 672, 160, True, "hard_swish", 2),
    (5, 960, 160, True, "hard_swish", 1),
    (5, 960, 160, True, "hard_swish", 1),
  ),
  "small": (
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hard_swish", 2),
    (5, 240, 40, True, "hard_swish", 1),
    (5, 240, 40, True, "hard_swish", 1),
    (5, 120, 48, True, "hard_swish", 1),
    (5, 144, 48, True, "hard_swish", 1),
    (5, 288, 96, True, "hard_swish", 2),
    (5, 576, 96, True, "hard_swish", 1),
    (5, 576, 96, True, "hard_swish", 1),
  ),
}
V3_LAST_CHANNEL = {"large": 1280, "small": 1024}
# MobileNetV3's batch norm: PyTorch eps 1e-3 and momentum 0.01 (Flax momentum 0.99); other norm kinds keep
# their usual epsilon.
V3_NORM = dict(bn_epsilon=1e-3, bn_momentum=0.99)


@MODELS.register("mobilenet_v2")
class MobileNetV2(nn.Module):
  """MobileNetV2 classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  stem (3^d conv, stride 2, ReLU6) -> 17 inverted-residual blocks (1x1 expand, 3^d depthwise, linear 1x1
  projection, identity when the shape is kept) -> 1x1 head conv to 1280 -> global mean -> dropout -> dense.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked). The input must be at least 17 voxels on every axis
      (five stride-2 stages; `mobile_blocks.check_downsample`).
    width_mult: channel multiplier (torchvision's rounding to multiples of 8; the head keeps at least 1280).
    dropout: dropout rate before the classifier ("dropout" rng stream, only when `train`).
    norm: "batch" (running averages in "batch_stats") | "group" | "instance" | "none".
    dtype / param_dtype: compute / parameter dtypes (norm statistics in float32).
    remat: rematerialise each inverted-residual block in the backward pass.

  aux: "features" (globally pooled head-conv features, `(B, 1280)` float32 at width 1) and "stages" (five
  feature maps at strides 2, 4, 8, 16, 32, the last block output at each resolution before the head conv;
  widths 16, 24, 32, 96, 320 at width 1).
  """
  num_classes: int
  spatial_dims: int = 2
  width_mult: float = 1.0
  dropout: float = 0.2
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    input_shape = x.shape[1:-1]
    min_size = mobile_blocks.min_input_size(1 + sum(s[3] == 2 for s in V2_STAGES))
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    width = lambda c: mobile_blocks.make_divisible(c * self.width_mult)

    x = x.astype(self.dtype)
    mobile_blocks.check_downsample(x, input_shape, name, "stem", min_size)
    x = layers.ConvNormAct(width(32), 3, 2, act="relu6", name="stem", **kw)(x, train)
    block_cls = mobile_blocks.maybe_remat(mobile_blocks.InvertedResidual, self.remat)
    stages = []
    for i, (expand, c_out, blocks, stride) in enumerate(V2_STAGES):
      if stride == 2:
        stages.append(x)
        mobile_blocks.check_downsample(x, input_shape, name, f"stage{i + 1}", min_size)
      for j in range(blocks):
        # torchvision rounds the expanded width to the nearest integer, not to a multiple of 8.
        x = block_cls(width(c_out), int(round(x.shape[-1] * expand)), 3, stride if j == 0 else 1,
                      act="relu6", name=f"stage{i + 1}_block{j}", **kw)(x, train)
    stages.append(x)

    x = layers.ConvNormAct(mobile_blocks.make_divisible(1280 * max(1.0, self.width_mult)), 1, act="relu6",
                           name="head_conv", **kw)(x, train)
    features = layers.global_avg_pool(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(features.astype(self.dtype))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(y)
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


class MobileNetV3(nn.Module):
  """MobileNetV3 classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  stem (3^d conv, stride 2, hard-swish) -> inverted-residual blocks with ReLU or hard-swish and optional
  squeeze-excitation (ReLU, hard-sigmoid gate, squeeze width `make_divisible(expanded // 4)`) -> 1x1 head
  conv to 6x the last width (hard-swish) -> global mean -> dense (1280 large / 1024 small) -> hard-swish ->
  dropout -> dense. Batch norm uses PyTorch eps 1e-3, momentum 0.01.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked). The input must be at least 17 voxels on every axis
      (five stride-2 stages; `mobile_blocks.check_downsample`).
    arch: "large" or "small" (set by the registered variants).
    width_mult: channel multiplier (torchvision's rounding to multiples of 8).
    dropout: dropout rate inside the classifier ("dropout" rng stream, only when `train`).
    norm: "batch" (running averages in "batch_stats") | "group" | "instance" | "none".
    dtype / param_dtype: compute / parameter dtypes (norm statistics in float32).
    remat: rematerialise each inverted-residual block in the backward pass.

  aux: "features" (globally pooled head-conv features, `(B, 960)` large / `(B, 576)` small, float32) and
  "stages" (five feature maps at strides 2, 4, 8, 16, 32, the last block output at each resolution before
  the head conv; widths 16, 24, 40, 112, 160 large and 16, 16, 24, 48, 96 small).
  """
  num_classes: int
  spatial_dims: int = 2
  arch: str = "large"
  width_mult: float = 1.0
  dropout: float = 0.2
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    if self.arch not in V3_BLOCKS:
      raise ValueError(f"{name}: arch={self.arch!r} must be one of {', '.join(map(repr, V3_BLOCKS))}.")
    blocks = V3_BLOCKS[self.arch]
    input_shape = x.shape[1:-1]
    min_size = mobile_blocks.min_input_size(1 + sum(b[5] == 2 for b in blocks))
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype, **V3_NORM)
    width = lambda c: mobile_blocks.make_divisible(c * self.width_mult)

    x = x.astype(self.dtype)
    mobile_blocks.check_downsample(x, input_shape, name, "stem", min_size)
    x = layers.ConvNormAct(width(16), 3, 2, act="hard_swish", name="stem", **kw)(x, train)
    block_cls = mobile_blocks.maybe_remat(mobile_blocks.InvertedResidual, self.remat)
    stages = []
    for i, (kernel, expanded, c_out, se, act, stride) in enumerate(blocks):
      if stride == 2:
        stages.append(x)
        mobile_blocks.check_downsample(x, input_shape, name, f"block{i}", min_size)
      x = block_cls(width(c_out), width(expanded), kernel, stride, act=act,
                    se_squeeze=mobile_blocks.make_divisible(width(expanded) // 4) if se else 0, se_act="relu",
                    se_gate="hard_sigmoid", name=f"block{i}", **kw)(x, train)
    stages.append(x)

    x = layers.ConvNormAct(6 * x.shape[-1], 1, act="hard_swish", name="head_conv", **kw)(x, train)
    features = layers.global_avg_pool(x)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = layers.activation("hard_swish")(dense(width(V3_LAST_CHANNEL[self.arch]), "classifier_hidden")(
      features.astype(self.dtype)))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    logits = dense(self.num_classes, "classifier")(y)
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


@MODELS.register("mobilenet_v3_large")
class MobileNetV3Large(MobileNetV3):
  """MobileNetV3-Large (5,483,032 parameters at 1000 classes). See `MobileNetV3` for fields and outputs."""
  arch: str = "large"


@MODELS.register("mobilenet_v3_small")
class MobileNetV3Small(MobileNetV3):
  """MobileNetV3-Small (2,542,856 parameters at 1000 classes). See `MobileNetV3` for fields and outputs."""
  arch: str = "small"
