"""Rank-generic building blocks of the mobile classifier families (EfficientNet, MobileNetV2/V3,
ShuffleNetV2): grouped / depthwise convolutions, squeeze-excitation, the inverted-residual (MBConv) block,
per-sample stochastic depth, torchvision's channel rounding and the too-small-input check.

Channel widths follow torchvision's rounding (`make_divisible`), so parameter counts match the reference
models exactly. Every block reads the rank from its input `(B, *spatial, C)`; 2D and 3D are the same code.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import layers

Dtype = Any

# Activations by name (module fields stay hashable strings, so blocks can be rematerialised with
# static arguments). "hard_sigmoid" is relu6(x + 3) / 6 and "hard_swish" x * hard_sigmoid(x), as in PyTorch.
ACTIVATIONS = {
  "relu": nn.relu,
  "relu6": jax.nn.relu6,
  "silu": nn.silu,
  "sigmoid": nn.sigmoid,
  "hard_sigmoid": jax.nn.hard_sigmoid,
  "hard_swish": jax.nn.hard_swish,
  "none": lambda x: x,
}


def activation(name: str) -> Callable[[Any], Any]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"Unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}.") from None


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to the nearest multiple of `divisor` (at least `divisor`), going one step up
  when rounding down would lose more than 10% (torchvision's rule for width multipliers)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def make_norm(kind: str, *, train: bool, dtype: Dtype, param_dtype: Dtype, name: str,
              epsilon: float = layers.NORM_EPSILON, momentum: float = 0.9) -> Callable[[Any], Any]:
  """`layers.make_norm`, except that batch norm takes `epsilon` (MobileNetV3 uses PyTorch eps 1e-3,
  momentum 0.01 == Flax momentum 0.99). Statistics are reduced in float32."""
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype,
                        param_dtype=param_dtype, name=name)
  return layers.make_norm(kind, train=train, dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel_size: Tuple[int, ...], strides: Optional[Tuple[int, ...]] = None, *,
         groups: int = 1, use_bias: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
  """`layers.conv` (symmetric `k // 2` padding, stride s maps n to ceil(n / s)) with `groups` channel
  groups; `groups == C_in == features` is a depthwise convolution."""
  strides = strides or (1,) * len(kernel_size)
  return nn.Conv(features, kernel_size, strides=strides, padding=[(k // 2, k // 2) for k in kernel_size],
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=nn.initializers.he_normal(), name=name)


class ConvNormAct(nn.Module):
  """Conv (optionally grouped) -> norm -> activation. `(B, *spatial, C) -> (B, *spatial / stride, features)`.
  The conv has a bias only without a norm."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1
  act: str = "relu"
  norm: str = "batch"
  norm_epsilon: float = layers.NORM_EPSILON
  norm_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    x = conv(self.features, (self.kernel_size,) * nd, (self.stride,) * nd, groups=self.groups,
             use_bias=self.norm == "none", dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    x = make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype, name="norm",
                  epsilon=self.norm_epsilon, momentum=self.norm_momentum)(x)
    return activation(self.act)(x)


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
    s = activation(self.act)(nn.Dense(self.squeeze, dtype=self.dtype, param_dtype=self.param_dtype,
                                      name="fc1")(s))
    s = activation(self.gate)(nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                                       name="fc2")(s))
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
  norm_epsilon: float = layers.NORM_EPSILON
  norm_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(norm=self.norm, norm_epsilon=self.norm_epsilon, norm_momentum=self.norm_momentum,
              dtype=self.dtype, param_dtype=self.param_dtype)
    y = x
    if self.expanded != x.shape[-1]:
      y = ConvNormAct(self.expanded, 1, act=self.act, name="expand", **kw)(y, train)
    y = ConvNormAct(self.expanded, self.kernel_size, self.stride, groups=self.expanded, act=self.act,
                    name="depthwise", **kw)(y, train)
    if self.se_squeeze:
      y = SqueezeExcite(self.se_squeeze, self.se_act, self.se_gate, self.dtype, self.param_dtype,
                        name="se")(y)
    y = ConvNormAct(self.features, 1, act="none", name="project", **kw)(y, train)
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
