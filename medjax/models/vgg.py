"""Rank-generic VGG networks (Simonyan & Zisserman 2015) for 2D and 3D classification.

The layer structure and parameter counts match torchvision (vgg16 with 3 input channels and 1000 classes has
138,357,544 parameters, vgg16_bn 138,365,992). Registered as "vgg11", "vgg11_bn", "vgg16" and "vgg16_bn".
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any


class VGGStage(nn.Module):
  """`num_convs` x (3^d conv with bias -> [batch norm] -> ReLU); `(B, *s, C) -> (B, *s, features)`.
  torchvision keeps the conv bias even when batch norm follows, so the counts match it."""
  features: int
  num_convs: int
  batch_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    k3 = (3,) * (x.ndim - 2)
    for j in range(self.num_convs):
      x = layers.conv(self.features, k3, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"conv{j + 1}")(x)
      if self.batch_norm:
        x = layers.make_norm("batch", train=train, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"norm{j + 1}")(x)
      x = nn.relu(x)
    return x


class VGG(nn.Module):
  """VGG classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Five stages of 3^d convolutions, each followed by a 2^d stride-2 max-pool (floor), so every spatial axis
  needs at least 32 voxels. The last feature map is adaptively average-pooled to `pool_size` per axis
  (7 like torchvision, giving 7x7x512 for 224^2 inputs), flattened and fed to the head: dense layers of
  `head_features` (ReLU, dropout) and the final dense layer "head".

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked).
    batch_norm: batch norm after every conv (the "_bn" variants).
    width: channels of the first stage; the stages have width * (1, 2, 4, 8, 8).
    pool_size: int or per-axis tuple of the adaptive pool before the head. In 3D the default 7 gives
      7^3 * 512 inputs to the first dense layer (~720M parameters): use 1 or 2 for volumes or small inputs.
    head_features: widths of the hidden dense layers (torchvision: two of 4096).
    dropout: dropout rate after each hidden dense layer ("dropout" rng stream; off when not train).
    dtype / param_dtype: compute / parameter dtypes (batch-norm statistics in float32).
    remat: rematerialise each conv stage in the backward pass.
    stage_sizes: convolutions per stage; set by the registered variants.

  The flatten order is channels-last (y, x, C), not torchvision's (C, y, x): porting torchvision weights
  needs the first hidden dense kernel's rows permuted accordingly.

  aux: "features" (globally average-pooled last conv stage, `(B, 8 * width)` float32) and "stages" (the five
  stage outputs before their max-pool, highest resolution first; the last is the usual Grad-CAM layer).
  """
  num_classes: int
  spatial_dims: int = 2
  batch_norm: bool = False
  width: int = 64
  pool_size: layers.IntOrTuple = 7
  head_features: Sequence[int] = (4096, 4096)
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    nd = self.spatial_dims
    layers.check_min_size(x.shape, [(f"stage {i + 1} max-pool", lambda n: n // 2)
                             for i in range(len(self.stage_sizes))], name)
    x = x.astype(self.dtype)
    stage_cls = nn.remat(VGGStage, static_argnums=(2,)) if self.remat else VGGStage
    stages = []
    for i, num_convs in enumerate(self.stage_sizes):
      x = stage_cls(self.width * min(2 ** i, 8), num_convs, self.batch_norm, self.dtype, self.param_dtype,
                    name=f"stage{i + 1}")(x, train)
      stages.append(x)
      x = nn.max_pool(x, (2,) * nd, strides=(2,) * nd)
    features = layers.global_avg_pool(stages[-1])
    y = layers.adaptive_avg_pool(x, self.pool_size)
    y = y.reshape(y.shape[0], -1)
    for j, width in enumerate(self.head_features):
      y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"fc{j + 1}")(y)
      y = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(y))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(y)
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


# The registered variants only change the architecture defaults; every other field is `VGG`'s.


@MODELS.register("vgg11")
class VGG11(VGG):
  """VGG-11 (configuration "A"): (1, 1, 2, 2, 2) convs per stage. See `VGG` for fields and outputs."""
  stage_sizes: Sequence[int] = (1, 1, 2, 2, 2)
  batch_norm: bool = False


@MODELS.register("vgg11_bn")
class VGG11BN(VGG):
  """VGG-11 with batch norm after every conv. See `VGG` for fields and outputs."""
  stage_sizes: Sequence[int] = (1, 1, 2, 2, 2)
  batch_norm: bool = True


@MODELS.register("vgg16")
class VGG16(VGG):
  """VGG-16 (configuration "D"): (2, 2, 3, 3, 3) convs per stage. See `VGG` for fields and outputs."""
  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
  batch_norm: bool = False


@MODELS.register("vgg16_bn")
class VGG16BN(VGG):
  """VGG-16 with batch norm after every conv. See `VGG` for fields and outputs."""
  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
  batch_norm: bool = True
