"""Rank-generic ResNets (He et al. 2016, torchvision's v1.5 layout: the stride sits on the 3x3 conv of a
bottleneck) for 2D and 3D classification.

The layer structure and parameter counts match torchvision (resnet18 with 3 input channels and 1000 classes
has 11,689,512 parameters), and convolutions use PyTorch's symmetric `k // 2` padding, so ported ImageNet
weights give the same outputs. Registered as "resnet18", "resnet34", "resnet50" and "resnet101".
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any


class ResidualBlock(nn.Module):
  """BasicBlock (two 3x3 convs, expansion 1) or Bottleneck (1x1 -> 3x3 -> 1x1, expansion 4).
  `(B, *spatial, C) -> (B, *spatial / stride, width * expansion)`.

  inner_widths: output widths of the inner convolutions, (conv1,) or (conv1, conv2) for a bottleneck; None =
    `width`. Only these channels can shrink (filter pruning): the block's output joins the residual sum.
  """
  width: int
  stride: int = 1
  bottleneck: bool = False
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_factory: Callable = layers.conv
  inner_widths: Optional[Sequence[int]] = None

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    k1, k3 = (1,) * nd, (3,) * nd
    strides = (self.stride,) * nd
    out_features = self.width * (4 if self.bottleneck else 1)
    kw = dict(use_bias=self.norm == "none", dtype=self.dtype, param_dtype=self.param_dtype)
    inner = (self.width,) * (2 if self.bottleneck else 1) if self.inner_widths is None else tuple(self.inner_widths)
    if len(inner) != (2 if self.bottleneck else 1) or min(inner) < 1:
      raise ValueError(f"{self.name}: inner_widths must be {2 if self.bottleneck else 1} positive widths "
                       f"(conv1{', conv2' if self.bottleneck else ''}), got {self.inner_widths!r}.")

    def norm(name):
      return layers.make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype,
                              name=name)

    if self.bottleneck:
      y = nn.relu(norm("norm1")(self.conv_factory(inner[0], k1, name="conv1", **kw)(x)))
      y = nn.relu(norm("norm2")(self.conv_factory(inner[1], k3, strides, name="conv2", **kw)(y)))
      y = norm("norm3")(self.conv_factory(out_features, k1, name="conv3", **kw)(y))
    else:
      y = nn.relu(norm("norm1")(self.conv_factory(inner[0], k3, strides, name="conv1", **kw)(x)))
      y = norm("norm2")(self.conv_factory(out_features, k3, name="conv2", **kw)(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = norm("proj_norm")(self.conv_factory(out_features, k1, strides, name="proj_conv", **kw)(x))
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """ResNet classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked).
    width: channels of the first stage; stage i has `width * 2**i` (times 4 for bottlenecks).
    small_input: 3x3 stride-1 stem without max-pool (28^2 MedMNIST, 32^2 CIFAR) instead of the 7x7
      stride-2 stem + 3x3 stride-2 max-pool meant for 224^2 images.
    norm: "batch" (running averages in "batch_stats") | "group" | "instance" | "none".
    dtype / param_dtype: compute / parameter dtypes.
    remat: rematerialise each residual block in the backward pass.
    stage_sizes / bottleneck: the architecture; set by the registered variants.
    conv_factory: builds every convolution, with `layers.conv`'s signature (the default); the ACS and 2.5D
      variants in `medjax.models.acs` pass 2D-kernel convolutions for 3D input.
    inner_widths: None (every block at its stage's width), or one entry per residual block in order (stage by
      stage, block by block: sum(stage_sizes) entries), each the widths of the block's inner convolutions:
      (conv1,) for a basic block, (conv1, conv2) for a bottleneck. Set by filter pruning
      (`medjax.compress.structured`); stage and block output widths are unchanged.

  aux: "features" (globally pooled last-stage features, `(B, C)` float32) and "stages" (the four stage
  outputs, highest resolution first, e.g. for Grad-CAM).
  """
  num_classes: int
  spatial_dims: int = 2
  width: int = 64
  small_input: bool = False
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  conv_factory: Callable = layers.conv
  inner_widths: Optional[Sequence[Sequence[int]]] = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers.check_rank(x, self.spatial_dims, type(self).__name__)
    if self.inner_widths is not None and len(self.inner_widths) != sum(self.stage_sizes):
      raise ValueError(f"{type(self).__name__}.inner_widths needs one entry per residual block "
                       f"({sum(self.stage_sizes)} for stage_sizes {tuple(self.stage_sizes)}), got "
                       f"{len(self.inner_widths)}.")
    nd = self.spatial_dims
    x = x.astype(self.dtype)
    stem_k, stem_s = ((3,) * nd, (1,) * nd) if self.small_input else ((7,) * nd, (2,) * nd)
    x = self.conv_factory(self.width, stem_k, stem_s, use_bias=self.norm == "none", dtype=self.dtype,
                          param_dtype=self.param_dtype, name="stem_conv")(x)
    x = layers.make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="stem_norm")(x)
    x = nn.relu(x)
    if not self.small_input:
      x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)

    block_cls = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    stages, blocks = [], iter(self.inner_widths or ())
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        inner = None if self.inner_widths is None else tuple(int(w) for w in next(blocks))
        x = block_cls(self.width * 2 ** i, stride, self.bottleneck, self.norm, self.dtype, self.param_dtype,
                      self.conv_factory, inner, name=f"stage{i + 1}_block{j}")(x, train)
      stages.append(x)
    features = layers.global_avg_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(features.astype(self.dtype))
    return logits.astype(jnp.float32), {"features": features, "stages": stages}


# The registered variants only change the architecture defaults; every other field is `ResNet`'s.


@MODELS.register("resnet18")
class ResNet18(ResNet):
  """ResNet-18: basic blocks (2, 2, 2, 2). See `ResNet` for fields and outputs."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False


@MODELS.register("resnet34")
class ResNet34(ResNet):
  """ResNet-34: basic blocks (3, 4, 6, 3). See `ResNet` for fields and outputs."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = False


@MODELS.register("resnet50")
class ResNet50(ResNet):
  """ResNet-50: bottleneck blocks (3, 4, 6, 3). See `ResNet` for fields and outputs."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True


@MODELS.register("resnet101")
class ResNet101(ResNet):
  """ResNet-101: bottleneck blocks (3, 4, 23, 3). See `ResNet` for fields and outputs."""
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  bottleneck: bool = True
