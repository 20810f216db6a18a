"""TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical Image
Segmentation"), rank-generic for 2D and 3D segmentation.

A ResNet encoder (the R50 of the paper's R50-ViT-B/16: a stride-2 7x7 stem, a stride-2 max-pool and three
stages of bottleneck blocks, the last two strided) brings the image to 1/16 resolution; a ViT encoder
treats each voxel of that map as a token (patch size 1, learned position embeddings); the token grid goes
through a 3x3 conv and a cascaded upsampler: `len(stage_sizes) + 1` decoder blocks, each upsampling
(bi/trilinear) to the size of the next skip, concatenating the skip from the CNN (1/8, 1/4, 1/2; the last
block, at full resolution, has none) and applying two conv-norm-ReLU layers, then a 3x3 segmentation head.

The defaults are the paper's R50-ViT-B/16 (hidden 768, 12 layers, 12 heads, MLP 3072, decoder 256, 128,
64, 16, GroupNorm in the ResNet, BatchNorm in the decoder). Differences from the reference code: no weight
standardisation in the ResNet convs; the max-pool pads by 1 so every size halves exactly (the reference
pads its 1/4 skip instead); linear upsampling uses half-pixel centres (`jax.image.resize`) rather than
`align_corners=True`; the upsampler resizes to each skip's size, so no divisibility is required; the ViT
blocks are `vit.EncoderBlock` (fused QKV, dropout also after attention, where the reference has none).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS
from medjax.models.resnet import ResidualBlock
from medjax.models.vit import EncoderBlock

Dtype = Any
LN_EPSILON = 1e-6  # the ViT / TransUNet LayerNorm epsilon


@MODELS.register("transunet")
class TransUNet(nn.Module):
  """TransUNet: `(B, *spatial, C)` -> `(logits (B, *spatial, num_classes) float32, aux)`.

  Fields:
    num_classes: output channels of the segmentation head.
    spatial_dims: 2 or 3 (input rank is checked).
    width / stage_sizes / bottleneck / norm: the ResNet encoder (stem width, blocks per stage, bottleneck
      blocks of expansion 4, its norm: "group" | "batch" | "instance" | "none"); stage i has `width * 2**i`
      (times 4) channels and every stage after the first halves the resolution.
    hidden_size / num_layers / num_heads / mlp_dim: the ViT encoder on the CNN's last feature map.
    dropout: ViT dropout (after the position embedding and in the MLPs; "dropout" rng, off when not train).
    head_features: width of the 3x3 conv between the ViT and the decoder.
    decoder_features: width of each decoder block, `len(stage_sizes) + 1` entries (one per skip plus the
      full-resolution block).
    decoder_norm: norm of the decoder convs.
    dtype / param_dtype: compute / parameter dtypes (norm statistics in float32).
    remat: rematerialise each ResNet and transformer block in the backward pass.

  The position embeddings are created for the token grid of the input seen at `init`; another input size
  resizes them (linear interpolation), as ViT fine-tuning at a new resolution does.

  aux: "stages" (the ResNet stage outputs, highest resolution first), "bottleneck" (the ViT output as a
  grid, `(B, *spatial / 2**(len(stage_sizes) + 1), hidden_size)`), "features" (last decoder map,
  `(B, *spatial, decoder_features[-1])`).
  """
  num_classes: int
  spatial_dims: int = 2
  width: int = 64
  stage_sizes: Sequence[int] = (3, 4, 9)
  bottleneck: bool = True
  norm: str = "group"
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.1
  head_features: int = 512
  decoder_features: Sequence[int] = (256, 128, 64, 16)
  decoder_norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def _check(self, x):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    if len(self.decoder_features) != len(self.stage_sizes) + 1:
      raise ValueError(f"{name}: decoder_features {tuple(self.decoder_features)} needs "
                       f"len(stage_sizes) + 1 = {len(self.stage_sizes) + 1} entries (one per CNN skip plus "
                       f"the full-resolution block).")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{name}: hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}.")
    factor = 2 ** (len(self.stage_sizes) + 1)
    spatial = tuple(x.shape[1:-1])
    if min(spatial) < factor:
      raise ValueError(f"{name}: input spatial shape {spatial} is too small: CNN stage "
                       f"{len(self.stage_sizes)} reaches 1/{factor} resolution, so every spatial size must "
                       f"be at least {factor}.")

  @nn.compact
  def __call__(self, x, *, train: bool):
    self._check(x)
    nd = self.spatial_dims
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_spatial = x.shape[1:-1]
    x = x.astype(self.dtype)

    # CNN encoder (resnet.ResNet's stem and blocks, without its classifier).
    x = layers.conv(self.width, (7,) * nd, (2,) * nd, use_bias=self.norm == "none", name="stem_conv", **kw)(x)
    x = nn.relu(layers.make_norm(self.norm, train=train, name="stem_norm", **kw)(x))
    skips = [x]
    x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)
    block_cls = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    stages = []
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = block_cls(self.width * 2 ** i, stride, self.bottleneck, self.norm, name=f"stage{i + 1}_block{j}",
                      **kw)(x, train)
      stages.append(x)
    skips += stages[:-1]

    # ViT on the last feature map, one token per voxel.
    b, *grid, _ = x.shape
    tokens = nn.Dense(self.hidden_size, name="patch_embed", **kw)(x)
    if self.has_variable("params", "pos_embed"):
      pos = self.get_variable("params", "pos_embed")
      if tuple(pos.shape[1:-1]) != tuple(grid):
        pos = jax.image.resize(pos, (1, *grid, self.hidden_size), "linear")
    else:
      pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, *grid, self.hidden_size),
                       self.param_dtype)
    tokens = (tokens + pos.astype(self.dtype)).reshape(b, -1, self.hidden_size)
    tokens = nn.Dropout(self.dropout, deterministic=not train)(tokens)
    vit_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    for i in range(self.num_layers):
      tokens = vit_cls(self.num_heads, self.mlp_dim, dropout=self.dropout, layer_norm_epsilon=LN_EPSILON,
                       name=f"vit_block{i}", **kw)(tokens, train)
    tokens = nn.LayerNorm(epsilon=LN_EPSILON, name="vit_norm", **kw)(tokens)
    y = tokens.reshape(b, *grid, self.hidden_size)
    aux = {"stages": stages, "bottleneck": y}

    # Cascaded upsampler: resize to the next skip's size, concatenate it, two conv-norm-ReLU.
    def conv_block(h, features, name):
      return layers.ConvNormAct(features, 3, norm=self.decoder_norm, act="relu", name=name, **kw)(h, train)

    y = conv_block(y, self.head_features, "conv_more")
    skips = skips[::-1]
    for i, features in enumerate(self.decoder_features):
      target = skips[i].shape[1:-1] if i < len(skips) else in_spatial
      y = jax.image.resize(y, (b, *target, y.shape[-1]), "linear")
      if i < len(skips):
        y = jnp.concatenate([y, skips[i].astype(y.dtype)], axis=-1)
      y = conv_block(conv_block(y, features, f"decoder{i}_conv1"), features, f"decoder{i}_conv2")
    aux["features"] = y
    logits = layers.conv(self.num_classes, (3,) * nd, use_bias=True, name="head", **kw)(y)
    return logits.astype(jnp.float32), aux
