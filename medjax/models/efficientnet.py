"""Rank-generic EfficientNet B0-B3 (Tan & Le 2019) for 2D and 3D classification.

The layer structure, torchvision's channel rounding (`mobile_blocks.make_divisible` of
`width * width_mult`) and depth rounding (`ceil(blocks * depth_mult)`) reproduce torchvision's parameter
counts exactly (B0 with 3 input channels and 1000 classes: 5,288,548). Registered as "efficientnet_b0" ..
"efficientnet_b3". The MBConv block (`InvertedResidual`) and the other shared blocks are in
`mobile_blocks.py`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers, mobile_blocks
from medjax.models.base import MODELS

Dtype = Any

# Per stage: (expand_ratio, kernel, stride, in_channels, out_channels, blocks) at width/depth 1.0 (B0).
STAGES = (
  (1, 3, 1, 32, 16, 1),
  (6, 3, 2, 16, 24, 2),
  (6, 5, 2, 24, 40, 2),
  (6, 3, 2, 40, 80, 3),
  (6, 5, 1, 80, 112, 3),
  (6, 5, 2, 112, 192, 4),
  (6, 3, 1, 192, 320, 1),
)


class EfficientNet(nn.Module):
  """EfficientNet classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  stem (3^d conv, stride 2, SiLU) -> seven stages of MBConv blocks (1x1 expand, depthwise k^d conv,
  squeeze-excitation with squeeze width C_in // 4, 1x1 projection; stochastic depth on the residual
  branch) -> 1x1 head conv to 4x the last width -> global mean -> dropout -> dense.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked). The input must be at least 17 voxels on every axis
      (five stride-2 stages; `mobile_blocks.check_downsample`).
    width_mult / depth_mult: compound-scaling multipliers (set by the registered variants).
    dropout: dropout rate before the classifier ("dropout" rng stream, only when `train`).
    stochastic_depth: block i of N drops its residual branch at rate `stochastic_depth * i / N`
      (torchvision's linear schedule, 0 for the first block); "dropout" rng stream, only when `train`.
    norm: "batch" (running averages in "batch_stats") | "group" | "instance" | "none".
    dtype / param_dtype: compute / parameter dtypes (norm statistics in float32).
    remat: rematerialise each MBConv block in the backward pass.

  aux: "features" (globally pooled head-conv features, `(B, 4 * last width)` float32; 1280 for B0) and
  "stages" (five feature maps at strides 2, 4, 8, 16, 32: the last block output at each resolution, before
  the head conv; widths 16, 24, 40, 112, 320 for B0).
  """
  num_classes: int
  spatial_dims: int = 2
  width_mult: float = 1.0
  depth_mult: float = 1.0
  dropout: float = 0.2
  stochastic_depth: float = 0.2
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    input_shape = x.shape[1:-1]
    min_size = mobile_blocks.min_input_size(1 + sum(s[2] == 2 for s in STAGES))
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    width = lambda c: mobile_blocks.make_divisible(c * self.width_mult)

    x = x.astype(self.dtype)
    mobile_blocks.check_downsample(x, input_shape, name, "stem", min_size)
    x = layers.ConvNormAct(width(STAGES[0][3]), 3, 2, act="silu", name="stem", **kw)(x, train)

    block_cls = mobile_blocks.maybe_remat(mobile_blocks.InvertedResidual, self.remat)
    depths = [int(math.ceil(s[5] * self.depth_mult)) for s in STAGES]
    total, index, stages = sum(depths), 0, []
    for i, ((expand, kernel, stride, c_in, c_out, _), depth) in enumerate(zip(STAGES, depths)):
      if stride == 2:
        stages.append(x)
        mobile_blocks.check_downsample(x, input_shape, name, f"stage{i + 1}", min_size)
      for j in range(depth):
        in_width = width(c_in) if j == 0 else width(c_out)
        x = block_cls(
          width(c_out), mobile_blocks.make_divisible(in_width * expand), kernel, stride if j == 0 else 1,
          act="silu", se_squeeze=max(1, in_width // 4), se_act="silu", se_gate="sigmoid",
          drop_rate=self.stochastic_depth * index / total, name=f"stage{i + 1}_block{j}", **kw)(x, train)
        index += 1
    stages.append(x)

    x = layers.ConvNormAct(4 * width(STAGES[-1][4]), 1, act="silu", name="head_conv", **kw)(x, train)
    features = layers.global_avg_pool(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(features.astype(self.dtype))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(y)
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


# The registered variants only change the scaling defaults; every other field is `EfficientNet`'s.


@MODELS.register("efficientnet_b0")
class EfficientNetB0(EfficientNet):
  """EfficientNet-B0: width 1.0, depth 1.0, dropout 0.2 (5,288,548 parameters at 1000 classes)."""
  width_mult: float = 1.0
  depth_mult: float = 1.0
  dropout: float = 0.2


@MODELS.register("efficientnet_b1")
class EfficientNetB1(EfficientNet):
  """EfficientNet-B1: width 1.0, depth 1.1, dropout 0.2 (7,794,184 parameters at 1000 classes)."""
  width_mult: float = 1.0
  depth_mult: float = 1.1
  dropout: float = 0.2


@MODELS.register("efficientnet_b2")
class EfficientNetB2(EfficientNet):
  """EfficientNet-B2: width 1.1, depth 1.2, dropout 0.3 (9,109,994 parameters at 1000 classes)."""
  width_mult: float = 1.1
  depth_mult: float = 1.2
  dropout: float = 0.3


@MODELS.register("efficientnet_b3")
class EfficientNetB3(EfficientNet):
  """EfficientNet-B3: width 1.2, depth 1.4, dropout 0.3 (12,233,232 parameters at 1000 classes)."""
  width_mult: float = 1.2
  depth_mult: float = 1.4
  dropout: float = 0.3
