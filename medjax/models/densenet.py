"""Rank-generic DenseNets (Huang et al. 2017, the DenseNet-BC layout with bottlenecks and compression) for
2D and 3D classification.

The layer structure and parameter count match torchvision (densenet121 with 3 input channels and 1000
classes has 7,978,856 parameters), with PyTorch's symmetric padding, so ported weights give the same
outputs. Registered as "densenet121".
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any


class DenseLayer(nn.Module):
  """Pre-activation bottleneck: norm -> ReLU -> 1^d conv (bn_size * growth) -> norm -> ReLU -> 3^d conv
  (growth) -> dropout. `(B, *s, C) -> (B, *s, growth_rate)`, the new features only; the block concatenates
  them onto its input."""
  growth_rate: int
  bn_size: int = 4
  dropout: float = 0.0
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    kw = dict(use_bias=self.norm == "none", dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.make_norm(self.norm, train=train, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    y = nn.relu(norm("norm1")(x))
    y = layers.conv(self.bn_size * self.growth_rate, (1,) * nd, name="conv1", **kw)(y)
    y = nn.relu(norm("norm2")(y))
    y = layers.conv(self.growth_rate, (3,) * nd, name="conv2", **kw)(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class Transition(nn.Module):
  """norm -> ReLU -> 1^d conv to `features` -> 2^d stride-2 average pool (floor).
  `(B, *s, C) -> (B, *(s // 2), features)`."""
  features: int
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    x = layers.make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="norm")(x)
    x = layers.conv(self.features, (1,) * nd, use_bias=self.norm == "none", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(nn.relu(x))
    return nn.avg_pool(x, (2,) * nd, strides=(2,) * nd)


class DenseNet(nn.Module):
  """DenseNet classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Stem (7^d stride-2 conv, norm, ReLU, 3^d stride-2 max-pool), dense blocks separated by transitions that
  compress the channels by `compression` and halve the resolution, a final norm + ReLU, global average
  pooling and the dense layer "head".

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked).
    growth_rate: channels each dense layer adds.
    block_config: dense layers per block.
    bn_size: bottleneck width of a dense layer, in multiples of growth_rate.
    compression: fraction of channels a transition keeps (DenseNet-BC: 0.5).
    init_features: channels of the stem conv.
    small_input: 3^d stride-1 stem without max-pool (28^2 MedMNIST, 32^2 CIFAR) instead of the 7^d stride-2
      stem + max-pool meant for 224^2 images.
    dropout: dropout rate after each dense layer (torchvision's drop_rate; "dropout" rng stream).
    norm: "batch" (running averages in "batch_stats") | "group" | "instance" | "none".
    dtype / param_dtype: compute / parameter dtypes (normalisation statistics in float32).
    remat: rematerialise each dense layer in the backward pass (torchvision's memory_efficient; the
      concatenated inputs are kept, the bottleneck activations recomputed).

  aux: "features" (globally pooled final features, `(B, C)` float32) and "stages" (each dense block's output
  before its transition, highest resolution first; the last one after the final norm + ReLU).
  """
  num_classes: int
  spatial_dims: int = 2
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  bn_size: int = 4
  compression: float = 0.5
  init_features: int = 64
  small_input: bool = False
  dropout: float = 0.0
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    nd = self.spatial_dims
    steps = [] if self.small_input else [("stem conv", lambda n: layers.pool_out_size(n, 7, 2, 3)),
                                          ("stem max-pool", lambda n: layers.pool_out_size(n, 3, 2, 1))]
    steps += [(f"transition {i + 1}", lambda n: n // 2) for i in range(len(self.block_config) - 1)]
    layers.check_min_size(x.shape, steps, name)

    def norm(name):
      return layers.make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype,
                              name=name)

    x = x.astype(self.dtype)
    stem_k, stem_s = ((3,) * nd, (1,) * nd) if self.small_input else ((7,) * nd, (2,) * nd)
    x = layers.conv(self.init_features, stem_k, stem_s, use_bias=self.norm == "none", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="stem_conv")(x)
    x = nn.relu(norm("stem_norm")(x))
    if not self.small_input:
      x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)

    layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer
    stages = []
    for i, num_layers in enumerate(self.block_config):
      for j in range(num_layers):
        y = layer_cls(self.growth_rate, self.bn_size, self.dropout, self.norm, self.dtype, self.param_dtype,
                      name=f"block{i + 1}_layer{j + 1}")(x, train)
        x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
      if i < len(self.block_config) - 1:
        stages.append(x)
        x = Transition(int(x.shape[-1] * self.compression), self.norm, self.dtype, self.param_dtype,
                       name=f"transition{i + 1}")(x, train)
    x = nn.relu(norm("final_norm")(x))
    stages.append(x)
    features = layers.global_avg_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(features.astype(self.dtype))
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


@MODELS.register("densenet121")
class DenseNet121(DenseNet):
  """DenseNet-121: growth 32, blocks (6, 12, 24, 16), bn_size 4, compression 0.5, 64 stem features.
  See `DenseNet` for fields and outputs."""
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  init_features: int = 64
