"""A rank-generic U-Net in the nnU-Net / MONAI DynUNet style, for 2D and 3D segmentation.

Design choices (documented here once):
- Downsampling is a strided convolution, the first conv of each encoder stage (nnU-Net style): it learns
  its pooling and costs no extra layer. Per-stage strides may be anisotropic, e.g. `((1, 2, 2), 2, 2)`.
- Upsampling is `layers.Upsample` (a transposed conv with kernel == stride, computed as 1x1 conv +
  depth-to-space because `nn.ConvTranspose` is slow in 3D on GPU), to the skip's width, then concatenation
  with the skip and a decoder stage. When a spatial size is not divisible by the strides, the upsampled map
  is cropped to the skip's size, so any input size works.
- `residual=True` wraps each stage's `blocks_per_stage` convs in one residual unit (a 1x1 strided conv +
  norm projects the skip when the shape changes), as MONAI's UnetResBlock does for two convs.
- MONAI's DynUNet is this network with three options (its weights convert with
  `medjax.transfer.monai_cnns.MonaiDynUNet`): `decoder_residual=False` (DynUNet's `res_block=True` makes only
  the encoder stages residual), `decoder_kernel_from_below=True` (its decoder stage at level i convolves with
  the kernel size of level i + 1, nnU-Net's with that of level i) and `upsample_bias=False` (its default
  `trans_bias=False`).
- Dropout (rate `dropout`, "dropout" rng stream) follows every conv block when > 0.
- Computation in `dtype`, parameters in `param_dtype`, norm statistics in float32; all logits are float32.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any


class ConvStage(nn.Module):
  """`num_convs` ConvNormAct blocks, the first with `strides`; optionally one residual unit around them.
  `(B, *spatial, C) -> (B, *spatial / strides, features)`."""
  features: int
  kernel_size: Tuple[int, ...]
  strides: Tuple[int, ...]
  num_convs: int = 2
  residual: bool = False
  norm: str = "instance"
  act: str = "leaky_relu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    skip = x
    for i in range(self.num_convs):
      last = i == self.num_convs - 1
      x = layers.ConvNormAct(
        self.features, self.kernel_size, self.strides if i == 0 else 1, norm=self.norm,
        act="none" if (self.residual and last) else self.act,  # activation after the residual sum
        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i}")(x, train)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.residual:
      if skip.shape[-1] != self.features or any(s != 1 for s in self.strides):
        skip = layers.ConvNormAct(self.features, 1, self.strides, norm=self.norm, act="none",
                                  dtype=self.dtype, param_dtype=self.param_dtype, name="skip")(skip, train)
      x = layers.activation(self.act)(x + skip.astype(x.dtype))
    return x


def _check_min_size(spatial: Sequence[int], strides: Sequence[Tuple[int, ...]], model: str) -> None:
  """Every downsampling must have at least one stride's worth of voxels to pool on each axis."""
  minimum = [1] * len(spatial)
  for i, stride in enumerate(strides):
    minimum = [m * s for m, s in zip(minimum, stride)]
    if any(n < m for n, m in zip(spatial, minimum)):
      raise ValueError(f"{model}: input spatial size {tuple(spatial)} is too small for encoder stage enc{i + 1} "
                       f"(strides {tuple(strides)}); the input must be at least {tuple(minimum)} per axis "
                       f"for this stage, {tuple(_total_strides(strides))} for the whole network.")


def _total_strides(strides: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
  total = [1] * len(strides[0])
  for stride in strides:
    total = [t * s for t, s in zip(total, stride)]
  return tuple(total)


class AttentionGate(nn.Module):
  """Additive attention gate (Oktay et al. 2018): weights a skip connection by a map in [0, 1] computed
  from the skip `x` and the gating signal `g` (the decoder's upsampled features, same spatial size, as
  MONAI's AttentionUnet does).

  `psi = sigmoid(conv1x1(relu(norm(W_x x) + norm(W_g g))))`, returns `(x * psi, psi)` with psi of shape
  `(B, *spatial, 1)` in float32.
  """
  inter_features: int
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, g, train: bool):
    nd = x.ndim - 2
    project = lambda name: layers.ConvNormAct(self.inter_features, 1, 1, norm=self.norm, act="none",
                                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = nn.relu(project("theta_x")(x, train) + project("phi_g")(g, train))
    logits = layers.conv(1, (1,) * nd, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="psi")(q)
    psi = nn.sigmoid(logits.astype(jnp.float32))
    return x * psi.astype(x.dtype), psi


@MODELS.register("unet")
class UNet(nn.Module):
  """U-Net for `(B, *spatial, C)` images -> `(logits (B, *spatial, num_classes) float32, aux)`.

  Fields:
    spatial_dims: 2 or 3 (input rank is checked).
    num_classes: output channels of the segmentation head.
    features: width of each level; `len(features)` levels, the last one is the bottleneck.
    kernel_size: int, a per-axis tuple, or one entry per level (e.g. `((1, 3, 3), 3, 3, 3)`).
    strides: downsampling between consecutive levels: int, a per-axis tuple, or `len(features) - 1`
      per-transition entries (e.g. `((1, 2, 2), 2, 2)`); the decoder upsamples by the same strides.
    blocks_per_stage: conv blocks per encoder and decoder stage.
    residual: residual unit around each stage's convs.
    decoder_residual: with `residual`, the decoder stages are residual too (False: plain conv blocks there,
      as MONAI DynUNet's `res_block=True`).
    decoder_kernel_from_below: the decoder stage at level i uses `kernel_size` of level i + 1 (MONAI DynUNet)
      instead of level i's (nnU-Net); the two differ only for per-level kernels.
    upsample_bias: a bias on each up-convolution (MONAI DynUNet's `trans_bias`).
    norm: "instance" | "batch" | "group" | "none".
    act: "leaky_relu" (slope 0.01, nnU-Net) | "relu" | "gelu" | "silu".
    deep_supervision: number of extra 1x1 heads on the decoder outputs below full resolution (at most
      `len(features) - 2`); their logits, highest resolution first, are `aux["deep_supervision"]`.
    head_classes: > 0 adds a classification head (global average pool of the bottleneck -> Dense), logits
      `(B, head_classes)` in `aux["head_logits"]`, for multi-task training.
    dropout: dropout rate after each conv block (0 = off).
    attention_gates: gate every skip connection with an `AttentionGate` (Attention U-Net); the gate maps,
      highest resolution first, are `aux["attention"]`, each `(B, *spatial_i, 1)` float32.
    dtype / param_dtype: compute / parameter dtypes.
    remat: rematerialise each stage in the backward pass (saves activation memory, costs compute).

  aux: "bottleneck" (deepest encoder output), "features" (last decoder feature map, `(B, *spatial,
  features[0])`), plus "deep_supervision" / "head_logits" / "attention" when enabled.
  """
  spatial_dims: int
  num_classes: int
  features: Sequence[int] = (16, 32, 64, 128)
  kernel_size: Any = 3
  strides: Any = 2
  blocks_per_stage: int = 2
  residual: bool = False
  decoder_residual: bool = True
  decoder_kernel_from_below: bool = False
  upsample_bias: bool = True
  norm: str = "instance"
  act: str = "leaky_relu"
  deep_supervision: int = 0
  head_classes: int = 0
  dropout: float = 0.0
  attention_gates: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    layers.check_rank(x, self.spatial_dims, "UNet")
    nd, levels = self.spatial_dims, len(self.features)
    if levels < 2:
      raise ValueError(f"UNet needs at least 2 levels, got features={tuple(self.features)}.")
    if not 0 <= self.deep_supervision <= levels - 2:
      raise ValueError(f"UNet deep_supervision={self.deep_supervision} must be in [0, {levels - 2}] for "
                       f"{levels} levels (features={tuple(self.features)}).")
    kernels = layers.per_stage(self.kernel_size, levels, nd, "kernel_size")
    strides = layers.per_stage(self.strides, levels - 1, nd, "strides")
    _check_min_size(x.shape[1:-1], strides, "UNet")
    stage_cls = nn.remat(ConvStage, static_argnums=(2,)) if self.remat else ConvStage
    common = dict(num_convs=self.blocks_per_stage, residual=self.residual, norm=self.norm, act=self.act,
                  dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype)

    x = x.astype(self.dtype)
    skips = []
    for i, f in enumerate(self.features):
      s = (1,) * nd if i == 0 else strides[i - 1]
      x = stage_cls(f, kernels[i], s, name=f"enc{i}", **common)(x, train)
      skips.append(x)
    aux = {"bottleneck": x}

    decoder_outputs, gates = {}, {}
    for i in reversed(range(levels - 1)):
      skip = skips[i]
      x = layers.Upsample(self.features[i], strides[i], use_bias=self.upsample_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"up{i}")(x)
      x = x[(slice(None),) + tuple(slice(0, n) for n in skip.shape[1:-1])]  # crop to the skip's size
      if self.attention_gates:
        skip, gate = AttentionGate(max(self.features[i] // 2, 1), norm=self.norm, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f"gate{i}")(skip, x, train)
        gates[i] = gate
      x = jnp.concatenate([x, skip], axis=-1)
      kernel = kernels[i + 1] if self.decoder_kernel_from_below else kernels[i]
      x = stage_cls(self.features[i], kernel, (1,) * nd, name=f"dec{i}",
                    **{**common, "residual": self.residual and self.decoder_residual})(x, train)
      decoder_outputs[i] = x
    aux["features"] = x
    if self.attention_gates:
      aux["attention"] = [gates[i] for i in range(levels - 1)]

    def head(h, n, name):
      return layers.conv(n, (1,) * nd, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=name)(h).astype(jnp.float32)

    logits = head(x, self.num_classes, "seg_head")
    if self.deep_supervision:
      aux["deep_supervision"] = [head(decoder_outputs[i], self.num_classes, f"ds_head{i}")
                                 for i in range(1, self.deep_supervision + 1)]
    if self.head_classes:
      pooled = layers.global_avg_pool(aux["bottleneck"])
      aux["head_logits"] = nn.Dense(self.head_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="cls_head")(pooled.astype(self.dtype)).astype(jnp.float32)
    return logits, aux


@MODELS.register("attention_unet")
class AttentionUNet(UNet):
  """U-Net with attention gates on every skip connection (Oktay et al. 2018); gate maps in aux["attention"]."""
  attention_gates: bool = True
