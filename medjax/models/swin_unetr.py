"""Swin-UNETR (Hatamizadeh et al. 2022, "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images") for 2D and 3D segmentation, in MONAI's SwinUNETR v1 layout (`use_v2=False`).

A Swin transformer encoder (patch size 2, four stages of shifted-window self-attention, each ending in a
patch merging that halves the resolution and doubles the width) feeds five feature maps, from 1/2 to 1/32
of the input, into a U-shaped convolutional decoder: residual conv blocks (MONAI's UnetResBlock: two 3x3
convs, instance norm, leaky ReLU, a 1x1 projection when the width changes) on the input and on the
stage outputs, and kernel-2 stride-2 transposed-conv upsampling followed by a residual block on the
concatenation with the skip.

With feature_size 48, 1 input channel and 14 classes the "params" collection has 62,187,296 entries, exactly
MONAI's count (MONAI's instance norm has no affine parameters, hence `norm_affine=False`).

Differences from MONAI (neither changes the parameter count):
- Patch merging concatenates all 2^d offsets of each 2x..x2 block in row-major order (offsets leading, as
  `space_to_depth` lays them out), as MONAI's `downsample="mergingv2"` in 3D. MONAI's default "merging" (and
  both kinds in 2D) concatenates the same 2^d offsets in another order (MONAI 1.6.1; older releases took two
  3D offsets twice): a fixed permutation of the merging norm and reduction weights, which
  `medjax.transfer.monai_transformers` applies on conversion.
- When a window shrinks to a small feature map, the relative position index is that of the shrunk window
  (read from the full table); MONAI slices the full window's `(N, N)` index matrix to its first `n x n`
  entries, which mixes up positions. `monai_window_index=True` does as MONAI, to reproduce its outputs with
  its weights whenever a stage's map is no larger than the window (e.g. stage 4 at 96^3 input, window 7).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any
LN_EPSILON = 1e-5  # PyTorch's LayerNorm default, so ported weights agree
# Added to the logits of token pairs from different regions of a shifted window (Swin's value).
MASK_VALUE = -100.0
_dense_init = nn.initializers.truncated_normal(0.02)


# ----------------------------------------------------------------------------------------------------------
# Static window geometry (numpy, computed at trace time from the static shapes)


def space_to_depth(x, strides: Sequence[int]):
  """Inverse of `layers.depth_to_space`: `(B, *(d * s), F) -> (B, *d, prod(s) * F)`, the block offsets as
  the leading channel factors."""
  b, *dims, f = x.shape
  nd = len(dims)
  x = x.reshape(b, *(a for d, s in zip(dims, strides) for a in (d // s, s)), f)
  x = x.transpose([0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd])
  return x.reshape(b, *(d // s for d, s in zip(dims, strides)), -1)


def window_geometry(spatial: Sequence[int], window: Sequence[int], shift: Sequence[int]):
  """The window and shift used on a map of size `spatial`: an axis no longer than its window gets one window
  of the map's size and no shift (MONAI's rule)."""
  ws = tuple(n if n <= w else w for n, w in zip(spatial, window))
  ss = tuple(0 if n <= w else s for n, w, s in zip(spatial, window, shift))
  return ws, ss


def window_partition(x, ws: Sequence[int]):
  """`(B, *P, C) -> (B, num_windows, prod(ws), C)`, windows in row-major order; `P` divisible by `ws`."""
  b, *dims, c = x.shape
  nd = len(dims)
  x = x.reshape(b, *(a for d, w in zip(dims, ws) for a in (d // w, w)), c)
  x = x.transpose([0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd])
  return x.reshape(b, -1, int(np.prod(ws)), c)


def window_merge(windows, ws: Sequence[int], dims: Sequence[int]):
  """Inverse of `window_partition`: `(B, num_windows, prod(ws), C) -> (B, *dims, C)`."""
  b, c, nd = windows.shape[0], windows.shape[-1], len(dims)
  x = windows.reshape(b, *(d // w for d, w in zip(dims, ws)), *ws, c)
  x = x.transpose([0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd])
  return x.reshape(b, *dims, c)


def relative_position_index(ws: Sequence[int], table_window: Sequence[int]) -> np.ndarray:
  """`(N, N)` indices into a `(prod(2 * W - 1), heads)` bias table (W = `table_window`) for the token pairs
  of a window of size `ws <= W`: the relative offset `p - q`, per axis in `[-(W - 1), W - 1]`, row-major."""
  coords = np.stack(np.meshgrid(*(np.arange(w) for w in ws), indexing="ij"), -1).reshape(-1, len(ws))
  rel = coords[:, None, :] - coords[None, :, :] + (np.asarray(table_window) - 1)
  extent = 2 * np.asarray(table_window) - 1
  strides = np.concatenate([np.cumprod(extent[::-1])[::-1][1:], [1]])
  return (rel * strides).sum(-1).astype(np.int32)


def shift_regions(padded: Sequence[int], ws: Sequence[int], ss: Sequence[int]) -> Optional[np.ndarray]:
  """`(num_windows, N)` region label of every token of every shifted window (None without shift): after the
  cyclic shift, a window at the far edge holds tokens from up to 2 regions per axis that were not
  neighbours in the image, and attention between different regions is masked. Labels rather than the
  `(num_windows, N, N)` mask keep the constant baked into the program small (343^3 floats at 96^3)."""
  if not any(ss):
    return None
  label = np.zeros(tuple(padded), np.int32)
  for axis, (n, w, s) in enumerate(zip(padded, ws, ss)):
    if s == 0:
      continue
    # Regions along this axis in the shifted frame: [0, n - w), [n - w, n - s), [n - s, n).
    lab = np.zeros(n, np.int32)
    lab[n - w:n - s], lab[n - s:] = 1, 2
    shape = [1] * len(padded)
    shape[axis] = n
    label = label * 3 + lab.reshape(shape)
  return window_partition(label[None, ..., None], ws)[0, ..., 0]


# ----------------------------------------------------------------------------------------------------------
# Transformer pieces (Mlp and drop_path could move to layers.py and serve vit.EncoderBlock too)


def drop_path(module: nn.Module, x, rate: float, train: bool):
  """Stochastic depth: zeroes a whole sample's residual branch with probability `rate` ("dropout" rng)."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Mlp(nn.Module):
  """Dense -> GELU (exact, as PyTorch's) -> dropout -> Dense -> dropout. `(..., C) -> (..., out or C)`."""
  hidden: int
  out: Optional[int] = None
  dropout: float = 0.0
  kernel_init: Any = _dense_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    y = nn.gelu(nn.Dense(self.hidden, name="fc1", **dense)(x), approximate=False)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(self.out or x.shape[-1], name="fc2", **dense)(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class WindowAttention(nn.Module):
  """(Shifted-)window multi-head self-attention with a learned relative position bias, on a whole map:
  pad to a multiple of the window, cyclic shift by `-window // 2` if `shifted`, attend inside each window
  (masking pairs the shift made adjacent), undo the shift, crop. `(B, *spatial, C) -> same`."""
  num_heads: int
  window: Tuple[int, ...]
  shifted: bool = False
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  monai_index: bool = False  # see SwinUNETR.monai_window_index

  @nn.compact
  def __call__(self, x, train: bool):
    b, *dims, c = x.shape
    nd, h = len(dims), self.num_heads
    shift = tuple(w // 2 for w in self.window) if self.shifted else (0,) * nd
    ws, ss = window_geometry(dims, self.window, shift)
    pad = [(0, -n % w) for n, w in zip(dims, ws)]
    x = jnp.pad(x, [(0, 0)] + pad + [(0, 0)]) if any(p for _, p in pad) else x
    padded = x.shape[1:-1]
    axes = tuple(range(1, nd + 1))
    if any(ss):
      x = jnp.roll(x, [-s for s in ss], axis=axes)
    windows = window_partition(x, ws)  # (B, nW, N, C)
    n = windows.shape[2]

    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init)
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, name="qkv", **dense)(windows)
    qkv = qkv.reshape(*qkv.shape[:3], 3, h, c // h)  # PyTorch's (3, heads, head_dim) split of 3C
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * (c // h) ** -0.5, k).astype(jnp.float32)

    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       (int(np.prod([2 * w - 1 for w in self.window])), h), self.param_dtype)
    if self.monai_index:  # MONAI's slice of the full window's index matrix (the same where ws == window)
      index = relative_position_index(self.window, self.window)[:n, :n]
    else:
      index = relative_position_index(ws, self.window)
    bias = table.astype(jnp.float32)[index.reshape(-1)].reshape(n, n, h).transpose(2, 0, 1)
    logits = logits + bias
    regions = shift_regions(padded, ws, ss)
    if regions is not None:  # pairs from different regions of a shifted window: (nW, N, N) -> broadcast
      mask = jnp.where(regions[:, :, None] != regions[:, None, :], MASK_VALUE, 0.0)
      logits = logits + mask[None, :, None]
    # Softmax in float32 whatever the compute dtype: a bf16 exp-sum over hundreds of keys loses precision.
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    attn = nn.Dropout(self.attn_dropout, deterministic=not train)(attn)
    y = jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(*windows.shape[:3], c)
    y = nn.Dense(c, name="proj", **dense)(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)

    y = window_merge(y, ws, padded)
    if any(ss):
      y = jnp.roll(y, ss, axis=axes)
    return y[(slice(None),) + tuple(slice(0, d) for d in dims)]


class SwinBlock(nn.Module):
  """Pre-norm Swin transformer block: `x + attn(LN(x))`, then `x + mlp(LN(x))`, each branch with stochastic
  depth `drop_path`. `(B, *spatial, C) -> same`."""
  num_heads: int
  window: Tuple[int, ...]
  shifted: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  monai_index: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    ln = dict(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(name="norm1", **ln)(x)
    y = WindowAttention(self.num_heads, self.window, self.shifted, self.qkv_bias, self.attn_dropout,
                        self.dropout, self.dtype, self.param_dtype, self.monai_index, name="attn")(y, train)
    x = x + drop_path(self, y, self.drop_path, train)
    y = nn.LayerNorm(name="norm2", **ln)(x)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(y, train)
    return x + drop_path(self, y, self.drop_path, train)


class PatchMerging(nn.Module):
  """Halves every spatial axis and doubles the width: concatenate the 2^d voxels of each 2x..x2 block,
  LayerNorm, Dense(2C) without bias. `(B, *spatial, C) -> (B, *spatial / 2, 2C)` (even sizes)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = space_to_depth(x, (2,) * (x.ndim - 2))
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_dense_init, name="reduction")(x)


# ----------------------------------------------------------------------------------------------------------
# Convolutional decoder pieces


def norm_layer(kind: str, affine: bool, *, train: bool, dtype: Dtype, param_dtype: Dtype, name: str):
  """`layers.make_norm`, or with `affine=False` the same norm without scale and shift (MONAI's default
  `InstanceNorm3d`); statistics in float32 either way. Call inside a compact method."""
  if affine or kind == "none":
    return layers.make_norm(kind, train=train, dtype=dtype, param_dtype=param_dtype, name=name)
  common = dict(epsilon=layers.NORM_EPSILON, use_scale=False, use_bias=False, dtype=dtype,
                param_dtype=param_dtype, name=name)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, **common)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=layers.use_running_average(train), momentum=0.9, **common)
  if kind == "group":
    return lambda x: nn.GroupNorm(num_groups=math.gcd(x.shape[-1], layers.MAX_GROUPS), **common)(x)
  return layers.make_norm(kind, train=train)  # raises the unknown-norm error


class ResBlock(nn.Module):
  """MONAI's UnetResBlock: conv3 -> norm -> leaky ReLU -> conv3 -> norm, plus the input (through a 1x1
  conv + norm when the width changes), then leaky ReLU. `(B, *spatial, C) -> (B, *spatial, features)`."""
  features: int
  norm: str = "instance"
  norm_affine: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    act = layers.activation("leaky_relu")

    def conv_norm(h, k, i):
      h = layers.conv(self.features, (k,) * nd, use_bias=self.norm == "none", dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"conv{i}")(h)
      return norm_layer(self.norm, self.norm_affine, train=train, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"norm{i}")(h)

    y = conv_norm(act(conv_norm(x, 3, 1)), 3, 2)
    if x.shape[-1] != self.features:
      x = conv_norm(x, 1, 3)
    return act(y + x.astype(y.dtype))


# ----------------------------------------------------------------------------------------------------------


@MODELS.register("swin_unetr")
class SwinUNETR(nn.Module):
  """Swin-UNETR: `(B, *spatial, C)` -> `(logits (B, *spatial, num_classes) float32, aux)`; every spatial
  size must be a multiple of `2 ** (len(depths) + 1)` (32 by default).

  Fields:
    num_classes: output channels of the segmentation head.
    spatial_dims: 2 or 3 (input rank is checked).
    feature_size: width of the patch embedding; stage i works at `feature_size * 2**i`.
    depths / num_heads: Swin blocks and attention heads per stage (blocks alternate plain / shifted
      windows, starting plain).
    window_size: int or per-axis tuple; an axis of a stage's map no longer than the window gets a window of
      the map's size and no shift. The bias tables are sized by this window whatever the input.
    monai_window_index: index a shrunk window's relative position biases as MONAI does (see the module
      docstring); needed to reproduce MONAI's outputs with its weights when a map is no larger than the window.
    mlp_ratio / qkv_bias: transformer MLP width factor; bias on the q, k, v projection.
    normalize: parameter-free LayerNorm of the encoder outputs before the decoder uses them (MONAI default).
    norm / norm_affine: decoder normalisation ("instance" | "batch" | "group" | "none"); MONAI's instance
      norm has no scale/shift (`norm_affine=False`).
    dropout / attn_dropout / drop_path: transformer dropout (embedding, MLP, attention output), attention
      weight dropout, and the largest stochastic depth rate (linear from 0 over all blocks); all use the
      "dropout" rng stream and are off when not `train`.
    dtype / param_dtype: compute / parameter dtypes (softmax and norm statistics in float32).
    remat: rematerialise each Swin block and decoder block in the backward pass.

  aux: "hidden_states" (the `len(depths) + 1` encoder outputs, after `normalize`: the patch embedding at
  1/2 resolution, then each stage's merged output at 1/4 ... 1/32, widths feature_size * (1, 2, ..., 16)),
  "bottleneck" (the residual block on the deepest hidden state, `(B, *spatial / 32, 16 * feature_size)`),
  "features" (last decoder map, `(B, *spatial, feature_size)`).
  """
  num_classes: int
  spatial_dims: int = 3
  feature_size: int = 48
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: Any = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  normalize: bool = True
  norm: str = "instance"
  norm_affine: bool = False
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  monai_window_index: bool = False

  def _check(self, x):
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"{name}: depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} need one "
                       f"entry per stage each.")
    for i, h in enumerate(self.num_heads):
      if (self.feature_size * 2 ** i) % h:
        raise ValueError(f"{name}: stage {i + 1} width {self.feature_size * 2 ** i} (feature_size "
                         f"{self.feature_size} * 2**{i}) is not divisible by its {h} heads.")
    multiple = 2 ** (len(self.depths) + 1)
    spatial = tuple(x.shape[1:-1])
    if any(n % multiple for n in spatial):
      raise ValueError(f"{name} needs every spatial size to be a multiple of {multiple} (patch size 2 and "
                       f"{len(self.depths)} patch mergings), got input spatial shape {spatial}.")

  @nn.compact
  def __call__(self, x, *, train: bool):
    self._check(x)
    nd = self.spatial_dims
    window = layers.to_tuple(self.window_size, nd, "window_size")
    x = x.astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    res_cls = nn.remat(ResBlock, static_argnums=(2,)) if self.remat else ResBlock

    def out(h):  # MONAI's proj_out: LayerNorm without affine over channels
      if not self.normalize:
        return h
      return nn.LayerNorm(epsilon=LN_EPSILON, use_scale=False, use_bias=False, **kw)(h)

    # Encoder: patch embedding (a kernel-2 stride-2 conv), then the Swin stages.
    h = nn.Conv(self.feature_size, (2,) * nd, strides=(2,) * nd, padding="VALID", name="patch_embed", **kw)(x)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    hidden = [out(h)]
    rates = np.linspace(0.0, self.drop_path, sum(self.depths)).tolist()
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      for j in range(depth):
        h = block_cls(heads, window, j % 2 == 1, self.mlp_ratio, self.qkv_bias, self.dropout,
                      self.attn_dropout, rates[sum(self.depths[:i]) + j], monai_index=self.monai_window_index,
                      name=f"stage{i + 1}_block{j}", **kw)(h, train)
      h = PatchMerging(name=f"stage{i + 1}_merge", **kw)(h)
      hidden.append(out(h))

    # Decoder: residual blocks on the input and on the hidden states, the deepest one the bottleneck.
    res = dict(norm=self.norm, norm_affine=self.norm_affine, **kw)
    levels = len(self.depths)
    y = res_cls(self.feature_size * 2 ** levels, name="bottleneck", **res)(hidden[levels], train)
    aux = {"hidden_states": hidden, "bottleneck": y}
    for i in reversed(range(-1, levels)):  # i = -1: full resolution, skip from the input itself
      width = self.feature_size * 2 ** max(i, 0)
      if i == levels - 1:
        skip = hidden[i]  # MONAI feeds the second deepest hidden state to the decoder without a block
      else:
        source = x if i == -1 else hidden[i]
        skip = res_cls(width, name="encoder_in" if i == -1 else f"encoder{i}", **res)(source, train)
      name = "decoder_in" if i == -1 else f"decoder{i}"
      y = layers.Upsample(width, 2, use_bias=False, name=f"{name}_up", **kw)(y)
      y = jnp.concatenate([y, skip.astype(y.dtype)], axis=-1)
      y = res_cls(width, name=name, **res)(y, train)
    aux["features"] = y
    logits = layers.conv(self.num_classes, (1,) * nd, use_bias=True, name="head", **kw)(y)
    return logits.astype(jnp.float32), aux
