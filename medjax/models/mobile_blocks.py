"""Rank-generic building blocks shared by the mobile classifier families: the inverted-residual (MBConv)
block, squeeze-excitation, per-sample stochastic depth, torchvision's channel rounding (`make_divisible`),
optional rematerialisation and the too-small-input check.

The models built from them live elsewhere: `mobilenet.py` (MobileNetV2 / V3), `efficientnet.py`
(EfficientNet B0-B3) and `shufflenet.py` (ShuffleNetV2, whose shuffle unit and `channel_shuffle` are
ShuffleNet's own). The conv -> norm -> activation unit (`layers.ConvNormAct`, grouped / depthwise via
`groups`) and the activation table (`layers.activation`) come from `layers.py`, shared with every other family.

Channel widths follow torchvision's rounding (`make_divisible`), so parameter counts match the reference
models exactly. Every block reads the rank from its input `(B, *spatial, C)`; 2D and 3D are the same code.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers

Dtype = Any


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to the nearest multiple of `divisor` (at least `divisor`), going one step up
  when rounding down would lose more than 10% (torchvision's rule for width multipliers)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation (Hu et al. 2018): global mean -> dense(squeeze) -> act -> dense(C) -> gate,
  then a per-channel rescale. `(B, *spatial, C) -> same`. The dense layers equal torchvision's 1x1 convs
  with bias."""
  squeeze: int
  act: str = "relu"
  gate: str = "sigmoid"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = layers.global_avg_pool(x).astype(self.dtype)  # (B, C), mean accumulated in float32
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    s = layers.activation(self.act)(dense(self.squeeze, "fc1")(s))
    s = layers.activation(self.gate)(dense(x.shape[-1], "fc2")(s))
    return x * s.reshape(s.shape[0], *(1,) * (x.ndim - 2), s.shape[-1])


def stochastic_depth(x, rate: float, train: bool):
  """Drops the whole residual branch of a random subset of samples (rate `rate`) and rescales the kept
  ones by 1 / (1 - rate) (Huang et al. 2016, torchvision's "row" mode). Draws from the "dropout" rng
  stream; the identity when not training or rate == 0."""
  if not train or rate <= 0.0:
    return x
  return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)), deterministic=False)(x)


class InvertedResidual(nn.Module):
  """The inverted-residual / MBConv block (MobileNetV2, MobileNetV3, EfficientNet):
  1x1 expand (skipped when `expanded == C_in`) -> k^d depthwise conv with `stride` -> optional
  squeeze-excitation -> 1x1 linear projection, plus the identity when the shape is kept (the branch then
  goes through stochastic depth at rate `drop_rate`).
  `(B, *spatial, C_in) -> (B, *spatial / stride, features)`.

  se_squeeze: squeeze width of the SE layer; 0 disables it.
  bn_epsilon / bn_momentum: batch norm settings of the three convs (`layers.ConvNormAct`).
  """
  features: int
  expanded: int
  kernel_size: int = 3
  stride: int = 1
  act: str = "relu6"
  se_squeeze: int = 0
  se_act: str = "relu"
  se_gate: str = "sigmoid"
  drop_rate: float = 0.0
  norm: str = "batch"
  bn_epsilon: float = layers.NORM_EPSILON
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(norm=self.norm, bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
              dtype=self.dtype, param_dtype=self.param_dtype)
    y = x
    if self.expanded != x.shape[-1]:
      y = layers.ConvNormAct(self.expanded, 1, act=self.act, name="expand", **kw)(y, train)
    y = layers.ConvNormAct(self.expanded, self.kernel_size, self.stride, groups=self.expanded, act=self.act,
                           name="depthwise", **kw)(y, train)
    if self.se_squeeze:
      y = SqueezeExcite(self.se_squeeze, self.se_act, self.se_gate, self.dtype, self.param_dtype,
                        name="se")(y)
    y = layers.ConvNormAct(self.features, 1, act="none", name="project", **kw)(y, train)
    if self.stride == 1 and x.shape[-1] == self.features:
      y = stochastic_depth(y, self.drop_rate, train) + x.astype(y.dtype)
    return y


def maybe_remat(block_cls, remat: bool):
  """Wraps a block whose `__call__(self, x, train)` takes `train` positionally in `nn.remat`."""
  return nn.remat(block_cls, static_argnums=(2,)) if remat else block_cls


def min_input_size(num_downsamplings: int) -> int:
  """Smallest axis length for which every one of `num_downsamplings` stride-2 layers (each mapping n to
  ceil(n / 2)) still gets at least 2 voxels: 2 ** (num - 1) + 1, i.e. 17 for the usual five."""
  return 2 ** (num_downsamplings - 1) + 1


def check_downsample(x, input_shape: Sequence[int], model: str, stage: str, min_size: int) -> None:
  """Raises a ValueError before a stride-2 `stage` whose input has an axis of length 1: with symmetric
  padding it would not fail but silently stop downsampling, so the model would not be the one asked for."""
  spatial = tuple(x.shape[1:-1])
  if min(spatial) < 2:
    raise ValueError(f"{model}: input spatial shape {tuple(input_shape)} is too small: stage {stage!r} "
                     f"would downsample a feature map of shape {spatial} (stride 2 on a 1-voxel axis). The "
                     f"minimum input size is {min_size} voxels on every spatial axis.")
