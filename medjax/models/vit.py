"""Rank-generic Vision Transformers (Dosovitskiy et al. 2021) for 2D and 3D classification, and a CNN-ViT
hybrid whose tokens come from a ResNet-style convolutional stem.

The layout follows torchvision's `vit_b_16` (pre-norm encoder blocks, a fused-QKV multi-head attention with
biases, an exact-GELU MLP, learned position embeddings, a class token, a final LayerNorm with epsilon 1e-6),
so "vit_b16" with 3 input channels, 224^2 input and 1000 classes has torchvision's 86,567,656 parameters.
Patches are N-D: the patch embedding is a convolution with kernel == stride, computed as a space-to-depth
reshape and one matmul (exactly the same function; avoids strided 3D convolutions, cf. PERFORMANCE.md), with
its kernel stored as `(*patch, C, hidden)` like an `nn.Conv` kernel.

`PatchEmbed`, `Encoder` (position embedding + blocks + final norm) and `tokens_to_map` are shared with
UNETR (medjax/models/unetr.py). Registered: "vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_hybrid".
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS
from medjax.models.resnet import ResidualBlock

Dtype = Any
IntOrTuple = layers.IntOrTuple
CLASSIFIERS = ("token", "gap")

# big_vision / torchvision initialisation: Xavier-uniform projections, near-zero MLP biases, N(0, 0.02)
# position embeddings; the classifier head starts at zero.
_dense_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)


def check_patch_input(x, image_size: IntOrTuple, patch_size: IntOrTuple, model: str,
                      stage: str = "patch embedding") -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """Validates `(B, *spatial, C)` input against `image_size` (which fixes the number of learned position
  embeddings) and `patch_size`; returns both as per-axis tuples. Raises ValueError naming `model`."""
  nd = x.ndim - 2
  size = layers.to_tuple(image_size, nd, "image_size")
  patch = layers.to_tuple(patch_size, nd, "patch_size")
  got = tuple(x.shape[1:-1])
  if any(g < p for g, p in zip(got, patch)):
    raise ValueError(f"{model}: input spatial size {got} is too small for the {stage} stage: every axis "
                     f"needs at least patch_size {patch} voxels (the model expects image_size {size}).")
  if any(s % p for s, p in zip(size, patch)):
    raise ValueError(f"{model}: image_size {size} must be divisible by patch_size {patch}.")
  if got != size:
    raise ValueError(f"{model}: input spatial size {got} differs from image_size {size}, which fixes the "
                     f"learned position embeddings; build the model with image_size={got}.")
  return size, patch


def tokens_to_map(tokens, grid: Sequence[int]):
  """`(B, prod(grid), D) -> (B, *grid, D)`: the inverse of flattening a patch grid in row-major order."""
  return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


class PatchEmbed(nn.Module):
  """Non-overlapping N-D patches -> linear embedding: `(B, *spatial, C) -> (B, *(spatial / patch), hidden)`.

  Equal to a convolution with kernel == stride == `patch_size` and VALID padding (kernel `(*patch, C,
  hidden)`, as `nn.Conv` stores it; a PyTorch `(hidden, C, *patch)` weight moves its first two axes to the
  end). Spatial sizes must be divisible by the patch size.
  """
  hidden_size: int
  patch_size: Tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, *spatial, c = x.shape
    nd = len(spatial)
    grid = [s // p for s, p in zip(spatial, self.patch_size)]
    # (B, g1, p1, g2, p2, ..., C) -> (B, g1, g2, ..., p1, p2, ..., C): patch voxels become channels.
    x = x.reshape(b, *[v for g, p in zip(grid, self.patch_size) for v in (g, p)], c)
    x = x.transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    x = x.reshape(b, *grid, -1)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.patch_size, c, self.hidden_size),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,), self.param_dtype)
    y = jnp.einsum("...k,kd->...d", x.astype(self.dtype),
                   kernel.reshape(-1, self.hidden_size).astype(self.dtype))
    return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused QKV projection (channel layout `(3, heads, head_dim)`, as
  torchvision's `in_proj` and MONAI's `qkv`): `(B, N, D) -> (B, N, D)`. Softmax runs in float32.

  With "intermediates" mutable, the weights are sown as "attention_weights" `(B, heads, N, N)` float32 and
  pass through `self.perturb` (Flax's "perturbations": their gradients), for medjax.interpret.rollout."""
  num_heads: int
  qkv_bias: bool = True
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"hidden_size {d} must be divisible by num_heads {self.num_heads}.")
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init)
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, name="qkv", **dense)(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
    dropout = train and self.attention_dropout > 0
    # The fused kernel neither drops out nor returns the weights: spell it out only when either is needed.
    explicit = self.is_mutable_collection("intermediates")
    if dropout or explicit:
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits * (d // self.num_heads) ** -0.5, axis=-1)
      if explicit:
        self.sow("intermediates", "attention_weights", weights)
        weights = self.perturb("attention_weights", weights)
      if dropout:
        weights = nn.Dropout(self.attention_dropout, deterministic=False)(weights)
      y = jnp.einsum("bhqk,bkhc->bqhc", weights.astype(self.dtype), v)
    else:
      y = jax.nn.dot_product_attention(q, k, v)  # XLA's attention, float32 logits for bf16 inputs
    return nn.Dense(d, name="out", **dense)(y.reshape(b, n, d))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: `x + Attn(LN(x))`, then `x + MLP(LN(x))` with an exact-erf GELU (as
  PyTorch's `nn.GELU`). Dropout after attention and in the MLP. `(B, N, D) -> (B, N, D)`."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  qkv_bias: bool = True
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    norm = dict(epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init,
                 bias_init=_bias_init)
    y = nn.LayerNorm(name="norm1", **norm)(x)
    y = SelfAttention(self.num_heads, self.qkv_bias, self.attention_dropout, self.dtype, self.param_dtype,
                      name="attn")(y, train)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="norm2", **norm)(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp1", **dense)(y), approximate=False)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(d, name="mlp2", **dense)(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Encoder(nn.Module):
  """Learned position embeddings (one per input token), dropout, `num_layers` blocks, final LayerNorm.

  `(B, N, D) -> (normed tokens (B, N, D), hidden_states)`; `hidden_states` lists every block's output
  (before the final norm), first block first.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  qkv_bias: bool = True
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]),
                     self.param_dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos.astype(x.dtype))
    block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    hidden_states = []
    for i in range(self.num_layers):
      x = block_cls(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, self.qkv_bias,
                    self.layer_norm_epsilon, self.dtype, self.param_dtype, name=f"block{i}")(x, train)
      hidden_states.append(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    return x, hidden_states


class _TransformerHead(nn.Module):
  """Tokens `(B, *grid, D)` -> optional class token -> `Encoder` -> pooled features -> logits. The part
  that `ViT` and `ViTHybrid` share."""
  num_classes: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float
  attention_dropout: float
  classifier: str
  qkv_bias: bool
  dtype: Dtype
  param_dtype: Dtype
  remat: bool

  @nn.compact
  def __call__(self, x, train: bool):
    b, d = x.shape[0], x.shape[-1]
    tokens = x.reshape(b, -1, d)
    if self.classifier == "token":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), self.param_dtype)
      tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(tokens.dtype), (b, 1, d)), tokens], axis=1)
    tokens, hidden_states = Encoder(
      self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, self.qkv_bias,
      1e-6, self.dtype, self.param_dtype, self.remat, name="encoder")(tokens, train)
    if self.classifier == "token":
      features = tokens[:, 0].astype(jnp.float32)
    else:
      features = jnp.mean(tokens.astype(jnp.float32), axis=1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros, name="head")(features.astype(self.dtype))
    return logits.astype(jnp.float32), {"features": features, "tokens": tokens,
                                        "hidden_states": hidden_states}


def _check_classifier(classifier: str, model: str) -> None:
  if classifier not in CLASSIFIERS:
    raise ValueError(f"{model}: classifier must be one of {CLASSIFIERS}, got {classifier!r}.")


class ViT(nn.Module):
  """Vision Transformer classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked).
    image_size: input spatial size, int or per-axis tuple; it fixes the number of learned position
      embeddings, so the input must have exactly this size (divisible by `patch_size`).
    patch_size: int or per-axis tuple, e.g. `(4, 16, 16)` for thick slices.
    hidden_size / num_layers / num_heads / mlp_dim: the transformer; set by the registered variants.
    dropout: after the position embeddings, after attention and inside the MLP ("dropout" rng stream).
    attention_dropout: on the attention weights.
    classifier: "token" (a learned class token, torchvision / original ViT) or "gap" (mean over tokens).
    qkv_bias: biases on the QKV projection (torchvision: yes; MONAI: no).
    dtype / param_dtype: compute / parameter dtypes (LayerNorm statistics and softmax in float32).
    remat: rematerialise each encoder block in the backward pass.

  aux: "features" (pooled final tokens `(B, hidden)` float32), "tokens" (final normed token sequence
  `(B, N [+1 class token first], hidden)`), "hidden_states" (list of the `num_layers` block outputs, before
  the final norm).
  """
  num_classes: int
  spatial_dims: int = 2
  image_size: IntOrTuple = 224
  patch_size: IntOrTuple = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.0
  attention_dropout: float = 0.0
  classifier: str = "token"
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    _check_classifier(self.classifier, name)
    _, patch = check_patch_input(x, self.image_size, self.patch_size, name)
    x = PatchEmbed(self.hidden_size, patch, self.dtype, self.param_dtype, name="patch_embed")(
      x.astype(self.dtype))
    return _TransformerHead(self.num_classes, self.num_layers, self.num_heads, self.mlp_dim, self.dropout,
                            self.attention_dropout, self.classifier, self.qkv_bias, self.dtype,
                            self.param_dtype, self.remat, name="transformer")(x, train)


# The registered variants only change the architecture defaults (the ViT paper's / DeiT's sizes).


@MODELS.register("vit_ti16")
class ViTTi16(ViT):
  """ViT-Ti/16 (DeiT-Tiny): hidden 192, 12 layers, 3 heads, MLP 768. See `ViT`."""
  hidden_size: int = 192
  num_layers: int = 12
  num_heads: int = 3
  mlp_dim: int = 768


@MODELS.register("vit_s16")
class ViTS16(ViT):
  """ViT-S/16 (DeiT-Small): hidden 384, 12 layers, 6 heads, MLP 1536. See `ViT`."""
  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536


@MODELS.register("vit_b16")
class ViTB16(ViT):
  """ViT-B/16: hidden 768, 12 layers, 12 heads, MLP 3072 (torchvision vit_b_16). See `ViT`."""
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072


@MODELS.register("vit_l16")
class ViTL16(ViT):
  """ViT-L/16: hidden 1024, 24 layers, 16 heads, MLP 4096 (torchvision vit_l_16). See `ViT`."""
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096


@MODELS.register("vit_hybrid")
class ViTHybrid(nn.Module):
  """CNN-ViT hybrid classifier: a ResNet stem and stages (`resnet.ResidualBlock`) make a feature map whose
  positions (patches of `patch_size`, default 1) are the transformer's tokens.
  `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Fields (the transformer ones as in `ViT`):
    num_classes, spatial_dims, image_size (must equal the input size: it fixes the position embeddings).
    width: channels of the first CNN stage; stage i has `width * 2**i` (basic blocks).
    stage_sizes: residual blocks per CNN stage; every stage after the first halves the resolution.
    small_input: 3x3 stride-1 stem without max-pool instead of 7x7 stride-2 + 3x3 stride-2 max-pool.
    norm: the CNN's norm, "group" (default: batch-size independent, as BiT) | "batch" | "instance" | "none".
    patch_size: tokeniser patch over the CNN feature map (int or per-axis tuple).
    hidden_size / num_layers / num_heads / mlp_dim / dropout / attention_dropout / classifier / qkv_bias.
    dtype / param_dtype / remat (each residual block and each encoder block).

  With the defaults a 224^2 image becomes a 14^2 grid of 128-channel features (stride 16), 196 tokens.
  aux: "features", "tokens", "hidden_states" (as `ViT`) and "stages" (the CNN stage outputs).
  """
  num_classes: int
  spatial_dims: int = 2
  image_size: IntOrTuple = 224
  width: int = 32
  stage_sizes: Sequence[int] = (2, 2, 2)
  small_input: bool = False
  norm: str = "group"
  patch_size: IntOrTuple = 1
  hidden_size: int = 192
  num_layers: int = 6
  num_heads: int = 3
  mlp_dim: int = 768
  dropout: float = 0.0
  attention_dropout: float = 0.0
  classifier: str = "token"
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    _check_classifier(self.classifier, name)
    nd = self.spatial_dims
    size = layers.to_tuple(self.image_size, nd, "image_size")
    if tuple(x.shape[1:-1]) != size:
      raise ValueError(f"{name}: input spatial size {tuple(x.shape[1:-1])} differs from image_size {size}, "
                       f"which fixes the learned position embeddings; build the model with "
                       f"image_size={tuple(x.shape[1:-1])}.")
    stride = (1 if self.small_input else 4) * 2 ** (len(self.stage_sizes) - 1)
    x = x.astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stem_k, stem_s = ((3,) * nd, (1,) * nd) if self.small_input else ((7,) * nd, (2,) * nd)
    x = layers.conv(self.width, stem_k, stem_s, use_bias=self.norm == "none", name="stem_conv", **kw)(x)
    x = nn.relu(layers.make_norm(self.norm, train=train, name="stem_norm", **kw)(x))
    if not self.small_input:
      x = nn.max_pool(x, (3,) * nd, strides=(2,) * nd, padding=((1, 1),) * nd)
    block_cls = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    stages = []
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block_cls(self.width * 2 ** i, 2 if (i > 0 and j == 0) else 1, False, self.norm, self.dtype,
                      self.param_dtype, name=f"stage{i + 1}_block{j}")(x, train)
      stages.append(x)
    # Every stride-2 op maps n -> ceil(n / 2), so the map never vanishes; the tokeniser needs >= 1 patch.
    patch = layers.to_tuple(self.patch_size, nd, "patch_size")
    grid = tuple(x.shape[1:-1])
    if any(g < p for g, p in zip(grid, patch)):
      raise ValueError(f"{name}: input spatial size {size} is too small for the tokeniser stage: the CNN "
                       f"(stride {stride}) leaves a {grid} map, smaller than patch_size {patch}; every axis "
                       f"needs at least {tuple(p * stride for p in patch)} voxels.")
    if any(g % p for g, p in zip(grid, patch)):
      raise ValueError(f"{name}: the CNN feature map {grid} (image_size {size} / stride {stride}) must be "
                       f"divisible by patch_size {patch}.")
    x = PatchEmbed(self.hidden_size, patch, self.dtype, self.param_dtype, name="patch_embed")(x)
    logits, aux = _TransformerHead(self.num_classes, self.num_layers, self.num_heads, self.mlp_dim,
                                   self.dropout, self.attention_dropout, self.classifier, self.qkv_bias,
                                   self.dtype, self.param_dtype, self.remat, name="transformer")(x, train)
    return logits, {**aux, "stages": stages}
