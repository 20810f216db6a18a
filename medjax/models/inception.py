"""Rank-generic GoogLeNet / Inception v1 (Szegedy et al. 2015) for 2D and 3D classification, in
torchvision's batch-normalised form.

The layer structure and parameter count match torchvision's `googlenet` (6,624,904 parameters with 3 input
channels and 1000 classes, no auxiliary heads; 13,004,888 with them). Like torchvision, the "5x5" branch of
an Inception module uses a 3^d kernel. Registered as "googlenet".
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any

# torchvision's GoogLeNet uses batch-norm epsilon 1e-3 (not PyTorch's default 1e-5, which
# layers.make_norm uses); keeping it makes ported weights give the same outputs.
BN_EPSILON = 1e-3

# (name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) in network order; None = max-pool.
INCEPTION_CONFIG = (
  ("inception3a", 64, 96, 128, 16, 32, 32),
  ("inception3b", 128, 128, 192, 32, 96, 64),
  None,
  ("inception4a", 192, 96, 208, 16, 48, 64),
  ("inception4b", 160, 112, 224, 24, 64, 64),
  ("inception4c", 128, 128, 256, 24, 64, 64),
  ("inception4d", 112, 144, 288, 32, 64, 64),
  ("inception4e", 256, 160, 320, 32, 128, 128),
  None,
  ("inception5a", 256, 160, 320, 32, 128, 128),
  ("inception5b", 384, 192, 384, 48, 128, 128),
)
AUX_AFTER = ("inception4a", "inception4d")  # where the two auxiliary heads branch off
# torchvision's `transform_input`: ImageNet-normalised input -> (x - 0.5) / 0.5 per channel, which is what its
# pretrained GoogLeNet weights were trained on (RGB order).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn(features: int, kernel_size: int = 1, stride: int = 1, **kw) -> layers.ConvNormAct:
  """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU, torchvision's `BasicConv2d`, as a `layers.ConvNormAct`
  (submodules "conv" and "norm"). `(B, *s, C) -> (B, *s / stride, features)`; `kw`: name, dtype, param_dtype."""
  return layers.ConvNormAct(features, kernel_size, stride, norm="batch", act="relu", bn_epsilon=BN_EPSILON,
                            **kw)


class Inception(nn.Module):
  """Four parallel branches concatenated on channels: 1^d conv | 1^d -> 3^d | 1^d -> 3^d ("5x5") |
  3^d stride-1 max-pool -> 1^d. `(B, *s, C) -> (B, *s, ch1x1 + ch3x3 + ch5x5 + pool_proj)`."""
  ch1x1: int
  ch3x3_reduce: int
  ch3x3: int
  ch5x5_reduce: int
  ch5x5: int
  pool_proj: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b1 = conv_bn(self.ch1x1, 1, name="branch1", **kw)(x, train)
    b2 = conv_bn(self.ch3x3_reduce, 1, name="branch2_reduce", **kw)(x, train)
    b2 = conv_bn(self.ch3x3, 3, name="branch2", **kw)(b2, train)
    b3 = conv_bn(self.ch5x5_reduce, 1, name="branch3_reduce", **kw)(x, train)
    b3 = conv_bn(self.ch5x5, 3, name="branch3", **kw)(b3, train)  # 3^d, as torchvision (the paper: 5^d)
    b4 = nn.max_pool(x, (3,) * nd, strides=(1,) * nd, padding=((1, 1),) * nd)
    b4 = conv_bn(self.pool_proj, 1, name="branch4", **kw)(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxHead(nn.Module):
  """Auxiliary classifier: adaptive average pool to 4 per axis -> 1^d conv_bn(128) -> flatten -> dense 1024
  -> ReLU -> dropout -> dense `num_classes`. `(B, *s, C) -> (B, num_classes)` float32."""
  num_classes: int
  dropout: float = 0.7
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.adaptive_avg_pool(x, 4)
    x = conv_bn(128, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x, train)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(1024, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)
    return x.astype(jnp.float32)


@MODELS.register("googlenet")
class GoogLeNet(nn.Module):
  """GoogLeNet classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Stem (7^d stride-2 conv_bn, ceil-mode max-pool, 1^d and 3^d conv_bn, max-pool), Inception modules 3a-3b,
  max-pool, 4a-4e, max-pool (2^d), 5a-5b, global average pooling, dropout and the dense layer "head".
  Max-pools use PyTorch's ceil mode; every spatial axis needs at least 15 voxels.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked).
    aux_heads: build the two auxiliary classifiers (after 4a and 4d); their logits are returned in
      training only (they are built at init whatever `train` is, so the parameters always exist).
    dropout: dropout rate before the head ("dropout" rng stream; off when not train).
    aux_dropout: dropout rate inside the auxiliary heads.
    transform_input: torchvision's `transform_input` (its pretrained weights need it): re-normalise a
      3-channel input normalised with the ImageNet mean / std to mean 0.5 / std 0.5 per channel first.
    dtype / param_dtype: compute / parameter dtypes (batch-norm statistics in float32).
    remat: rematerialise each Inception module in the backward pass.

  aux: "features" (globally pooled inception5b output, `(B, 1024)` float32), "stages" (the outputs at
  strides 4, 8, 16, 32: the stem's last conv, inception3b, inception4e, inception5b) and, when `aux_heads`
  and train, "aux_logits" (list of the two auxiliary heads' `(B, num_classes)` float32 logits; torchvision
  weights them by 0.3 in the loss).
  """
  num_classes: int
  spatial_dims: int = 2
  aux_heads: bool = False
  dropout: float = 0.2
  aux_dropout: float = 0.7
  transform_input: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    if self.transform_input and x.shape[-1] != 3:
      raise ValueError(f"{name}(transform_input=True) re-normalises 3-channel (RGB) input, got {x.shape[-1]} "
                       f"channels.")
    layers.check_min_size(x.shape, [
      ("stem conv", lambda n: layers.pool_out_size(n, 7, 2, 3)),
      ("stem max-pool 1", lambda n: layers.pool_out_size(n, 3, 2, ceil_mode=True)),
      ("stem max-pool 2", lambda n: layers.pool_out_size(n, 3, 2, ceil_mode=True)),
      ("max-pool 3", lambda n: layers.pool_out_size(n, 3, 2, ceil_mode=True)),
      ("max-pool 4", lambda n: layers.pool_out_size(n, 2, 2, ceil_mode=True)),
    ], name)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    if self.transform_input:
      # (x * std + mean - 0.5) / 0.5: undo the ImageNet normalisation, apply mean 0.5 / std 0.5.
      std, mean = jnp.asarray(IMAGENET_STD), jnp.asarray(IMAGENET_MEAN)
      x = (x * (std / 0.5) + (mean - 0.5) / 0.5).astype(self.dtype)
    x = conv_bn(64, 7, 2, name="conv1", **kw)(x, train)
    x = layers.max_pool_ceil(x, 3, 2)
    x = conv_bn(64, 1, name="conv2", **kw)(x, train)
    x = conv_bn(192, 3, name="conv3", **kw)(x, train)
    stages = [x]
    x = layers.max_pool_ceil(x, 3, 2)

    block_cls = nn.remat(Inception, static_argnums=(2,)) if self.remat else Inception
    run_aux = self.aux_heads and (train or self.is_initializing())
    aux_logits = []
    pools = iter([(3, 2), (2, 2)])
    for entry in INCEPTION_CONFIG:
      if entry is None:
        stages.append(x)
        x = layers.max_pool_ceil(x, *next(pools))
        continue
      block_name, *widths = entry
      x = block_cls(*widths, **kw, name=block_name)(x, train)
      if run_aux and block_name in AUX_AFTER:
        aux_logits.append(AuxHead(self.num_classes, self.aux_dropout, **kw,
                                  name=f"aux{AUX_AFTER.index(block_name) + 1}")(x, train))
    stages.append(x)
    features = layers.global_avg_pool(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(features.astype(self.dtype))
    logits = nn.Dense(self.num_classes, name="head", **kw)(y)
    aux = {"features": features, "stages": stages}
    if self.aux_heads and train:
      aux["aux_logits"] = aux_logits
    return logits.astype(jnp.float32), aux
