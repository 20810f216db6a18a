"""UNETR (Hatamizadeh et al. 2022): a ViT encoder on N-D patches with a convolutional decoder, for 2D and
3D segmentation, in MONAI's layout.

Structure (patch 16 = 2^4, so 4 resolution levels below the input; level k is 1 / 2^k of the input):
- The ViT (`vit.PatchEmbed` + `vit.Encoder`; no class token, no head, QKV without bias, LayerNorm epsilon
  1e-5 as MONAI) turns the image into a `grid = image / patch` sequence of tokens.
- Level 0 skip: a residual conv block on the image itself (MONAI `UnetrBasicBlock`).
- Level k skips (k = 1, 2, 3): the output of transformer block `skip_layers[k - 1]`, reshaped to a
  feature map, upsampled from the patch grid to level k by `ProjectionUpBlock` (MONAI `UnetrPrUpBlock`:
  a stride-2 "transposed conv" and then `n - 1 - k` x [transposed conv + residual block]).
- Decoder: the final normed tokens as a map (the bottleneck), then per level k = 3..0 an `UpBlock` (MONAI
  `UnetrUpBlock`: transposed conv to `feature_size * 2^k`, concatenate the skip, residual block).
- A 1x1 conv with bias to `num_classes`.
Every transposed convolution is kernel == stride == 2 without bias, computed by `layers.Upsample`.
`ResBlock` mirrors MONAI's `UnetResBlock`: 3x3 conv (no bias) -> norm -> leaky ReLU(0.01) -> 3x3 conv ->
norm, plus a 1x1 conv + norm shortcut when the widths differ, then leaky ReLU. MONAI's default instance
norm has no affine parameters; so does `norm="instance"` here.

Any patch size that is a power of two per axis works (e.g. 4 for tiny tests: 2 levels; `(4, 16, 16)`:
the z axis stops upsampling after two levels). Parameter count for 96^3, 1 channel, 14 classes, feature
size 16: 92,784,046. MONAI 1.6.1 reports 92,802,478: its TransformerBlock always creates a `norm_cross_attn`
LayerNorm (2 x 768 parameters per block, 18,432 in all) that is unused without cross-attention.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS
from medjax.models.vit import Encoder, PatchEmbed, check_patch_input, tokens_to_map

Dtype = Any
IntOrTuple = layers.IntOrTuple


def _norm(kind: str, train: bool, dtype: Dtype, param_dtype: Dtype, name: str):
  """MONAI's norms: "instance" is PyTorch's InstanceNorm default (no affine); "instance_affine", "batch",
  "group" and "none" are `layers.make_norm`'s (with scale and bias)."""
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=layers.NORM_EPSILON, use_bias=False,
                        use_scale=False, dtype=dtype, param_dtype=param_dtype, name=name)
  return layers.make_norm("instance" if kind == "instance_affine" else kind, train=train, dtype=dtype,
                          param_dtype=param_dtype, name=name)


class ResBlock(nn.Module):
  """Residual unit of two 3x3 convs (MONAI UnetResBlock, stride 1): `(B, *s, C) -> (B, *s, features)`."""
  features: int
  norm: str = "instance"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    act = layers.activation("leaky_relu")

    def norm(name):
      return _norm(self.norm, train, self.dtype, self.param_dtype, name)

    y = act(norm("norm1")(layers.conv(self.features, (3,) * nd, name="conv1", **kw)(x)))
    y = norm("norm2")(layers.conv(self.features, (3,) * nd, name="conv2", **kw)(y))
    if x.shape[-1] != self.features:
      x = norm("norm3")(layers.conv(self.features, (1,) * nd, name="conv3", **kw)(x))
    return act(y + x.astype(y.dtype))


def _res_cls(remat: bool):
  return nn.remat(ResBlock, static_argnums=(2,)) if remat else ResBlock


class ProjectionUpBlock(nn.Module):
  """A transformer feature map climbs to a skip level (MONAI UnetrPrUpBlock with conv and residual blocks):
  `Upsample(strides[0])`, then per further entry of `strides` `Upsample` + `ResBlock`.
  `(B, *grid, D) -> (B, *(grid * prod(strides)), features)`."""
  features: int
  strides: Tuple[Tuple[int, ...], ...]
  norm: str = "instance"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Upsample(self.features, self.strides[0], use_bias=False, name="up0", **kw)(x)
    for i, s in enumerate(self.strides[1:], start=1):
      x = layers.Upsample(self.features, s, use_bias=False, name=f"up{i}", **kw)(x)
      x = _res_cls(self.remat)(self.features, self.norm, name=f"res{i}", **kw)(x, train)
    return x


class UpBlock(nn.Module):
  """Decoder step (MONAI UnetrUpBlock): upsample to `features`, concatenate the skip, `ResBlock`.
  `(B, *d, C), skip (B, *(d * strides), features) -> (B, *(d * strides), features)`."""
  features: int
  strides: Tuple[int, ...]
  norm: str = "instance"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, skip, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Upsample(self.features, self.strides, use_bias=False, name="up", **kw)(x)
    x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    return _res_cls(self.remat)(self.features, self.norm, name="res", **kw)(x, train)


def _levels(patch: Tuple[int, ...], model: str) -> Tuple[int, ...]:
  """log2 of each patch entry; refuses sizes that are not powers of two (the decoder doubles per level)."""
  logs = tuple(int(p).bit_length() - 1 for p in patch)
  if any(p != 2 ** m for p, m in zip(patch, logs)) or max(logs) < 1:
    raise ValueError(f"{model}: patch_size {patch} must be powers of two (at least one > 1): the decoder "
                     f"upsamples by 2 per level.")
  return logs


@MODELS.register("unetr")
class UNETR(nn.Module):
  """UNETR for `(B, *spatial, C)` images -> `(logits (B, *spatial, num_classes) float32, aux)`.

  Fields:
    num_classes: output channels of the segmentation head.
    spatial_dims: 3 (default) or 2 (input rank is checked).
    image_size: input spatial size (int or per-axis tuple); it fixes the learned position embeddings, so
      inputs must have exactly this size, divisible by `patch_size` (use sliding-window inference on
      larger volumes).
    patch_size: powers of two, int or per-axis tuple; `log2(max(patch_size))` decoder levels.
    feature_size: decoder width at full resolution; level k has `feature_size * 2^k`.
    hidden_size / num_layers / num_heads / mlp_dim: the ViT encoder (ViT-B defaults).
    skip_layers: 1-based transformer blocks whose outputs feed the skip levels 1, 2, ... (one per level
      between the input and the bottleneck, the finest first). None: `j * num_layers // levels + 1`, which
      is MONAI's (4, 7, 10) for 12 layers (its `hidden_states_out[3], [6], [9]`; the paper's z3, z6, z9
      would be (3, 6, 9)). The bottleneck is always the final block's output after the final LayerNorm.
    norm: "instance" (MONAI's, without affine) | "instance_affine" | "batch" | "group" | "none".
    qkv_bias: biases on the QKV projection (MONAI default: no).
    dropout: ViT dropout (embeddings, attention weights and output, MLP), "dropout" rng stream.
    dtype / param_dtype: compute / parameter dtypes (norm statistics and softmax in float32).
    remat: rematerialise each transformer block and each residual conv block.

  aux: "hidden_states" (the `num_layers` token sequences `(B, N, hidden)`), "bottleneck" (final normed
  tokens as a map `(B, *grid, hidden)`), "features" (last decoder map `(B, *spatial, feature_size)`).
  """
  num_classes: int
  spatial_dims: int = 3
  image_size: IntOrTuple = 96
  patch_size: IntOrTuple = 16
  feature_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  skip_layers: Optional[Sequence[int]] = None
  norm: str = "instance"
  qkv_bias: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    _, patch = check_patch_input(x, self.image_size, self.patch_size, name)
    logs = _levels(patch, name)
    n = max(logs)
    if self.skip_layers is None:
      skip_layers = tuple(min(self.num_layers, j * self.num_layers // n + 1) for j in range(1, n))
    else:
      skip_layers = tuple(self.skip_layers)
    if len(skip_layers) != n - 1 or not all(1 <= s <= self.num_layers for s in skip_layers):
      raise ValueError(f"{name}: skip_layers {skip_layers} must name {n - 1} transformer blocks in "
                       f"[1, {self.num_layers}] (one per level between the input and the bottleneck for "
                       f"patch_size {patch}).")
    # strides[k]: per-axis upsampling from level k + 1 to level k; an axis with a smaller patch stops
    # doubling once it has reached full resolution.
    strides = tuple(tuple(2 if k < m else 1 for m in logs) for k in range(n))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)

    tokens = PatchEmbed(self.hidden_size, patch, name="patch_embed", **kw)(x)
    grid = tokens.shape[1:-1]
    tokens, hidden_states = Encoder(
      self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.dropout, self.qkv_bias, 1e-5,
      remat=self.remat, name="encoder", **kw)(tokens.reshape(tokens.shape[0], -1, self.hidden_size), train)

    skips = [_res_cls(self.remat)(self.feature_size, self.norm, name="enc0", **kw)(x, train)]
    for k in range(1, n):
      h = tokens_to_map(hidden_states[skip_layers[k - 1] - 1], grid)
      skips.append(ProjectionUpBlock(self.feature_size * 2 ** k, strides[k:][::-1], self.norm,
                                     remat=self.remat, name=f"enc{k}", **kw)(h, train))
    bottleneck = tokens_to_map(tokens, grid)
    y = bottleneck
    for k in reversed(range(n)):
      y = UpBlock(self.feature_size * 2 ** k, strides[k], self.norm, remat=self.remat, name=f"dec{k}",
                  **kw)(y, skips[k], train)
    logits = layers.conv(self.num_classes, (1,) * self.spatial_dims, use_bias=True, name="seg_head",
                         **kw)(y)
    return logits.astype(jnp.float32), {"hidden_states": hidden_states, "bottleneck": bottleneck,
                                        "features": y}
