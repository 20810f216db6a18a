"""MONAI UNETR and SwinUNETR <-> medjax "unetr" and "swin_unetr" (shared names and layouts: `monai_common`).

MonaiUNETR: `monai.networks.nets.UNETR(in_channels, out_channels, img_size, feature_size, hidden_size, mlp_dim,
num_heads, proj_type="conv", norm_name, conv_block=True, res_block=True, spatial_dims, qkv_bias)` <-> medjax
`UNETR(image_size, patch_size=16, num_layers=12, ...)` (MONAI fixes both):
  vit.patch_embedding.patch_embeddings.{weight,bias}  patch_embed/{kernel,bias}
  vit.patch_embedding.position_embeddings           encoder/pos_embedding (tokens row-major over the patch grid)
  vit.blocks.{i}.{norm1,norm2}                      encoder/block{i}/{norm1,norm2}
  vit.blocks.{i}.attn.{qkv,out_proj}                encoder/block{i}/attn/{qkv,out} (qkv rows (3, heads, head_dim))
  vit.blocks.{i}.mlp.{linear1,linear2}              encoder/block{i}/{mlp1,mlp2}
  vit.blocks.{i}.norm_cross_attn.*                  unused by MONAI without cross-attention: ignored, exported 1 / 0
  vit.norm                                          encoder/norm
  encoder1.layer.*                                  enc0/* (residual block)
  encoder{k+1}.transp_conv_init.conv.weight         enc{k}/up0/kernel (k = 1, 2, 3)
  encoder{k+1}.blocks.{j}.0.conv.weight             enc{k}/up{j+1}/kernel
  encoder{k+1}.blocks.{j}.1.*                       enc{k}/res{j+1}/* (residual block)
  decoder{k+2}.transp_conv.conv.weight              dec{k}/up/kernel (k = 0..3)
  decoder{k+2}.conv_block.*                         dec{k}/res/* (residual block)
  out.conv.conv.{weight,bias}                       seg_head/{kernel,bias}

MonaiSwinUNETR: `SwinUNETR(in_channels, out_channels, patch_size=2, depths, num_heads, window_size, qkv_bias,
mlp_ratio, feature_size, norm_name, normalize, patch_norm=False, spatial_dims, downsample="merging" or
"mergingv2", use_v2=False)` <-> medjax `SwinUNETR` with 4 stages (build it with `monai_window_index=True` to
reproduce MONAI wherever a stage's map is no larger than the window):
  swinViT.patch_embed.proj.{weight,bias}            patch_embed/{kernel,bias}
  swinViT.layers{i}.0.blocks.{j}.{norm1,norm2}      stage{i}_block{j}/{norm1,norm2}
  swinViT.layers{i}.0.blocks.{j}.attn.{qkv,proj}    stage{i}_block{j}/attn/{qkv,proj}
  ...attn.relative_position_bias_table              stage{i}_block{j}/attn/relative_position_bias_table
  ...attn.relative_position_index                   ignored (medjax computes it), exported as MONAI builds it
  swinViT.layers{i}.0.blocks.{j}.mlp.{linear1,linear2}  stage{i}_block{j}/mlp/{fc1,fc2}
  swinViT.layers{i}.0.downsample.{norm,reduction}   stage{i}_merge/{norm,reduction} (offsets permuted, below)
  encoder1.layer.* / encoder{i+2}.layer.* / encoder10.layer.*   encoder_in/* / encoder{i}/* / bottleneck/*
  decoder1.transp_conv / decoder{i+2}.transp_conv   decoder_in_up / decoder{i}_up
  decoder1.conv_block.* / decoder{i+2}.conv_block.*  decoder_in/* / decoder{i}/*
  out.conv.conv.{weight,bias}                       head/{kernel,bias}

Both registered instances (`medjax.transfer.from_torch(..., source="monai")`) serve every configuration: `bind`
takes `spatial_dims` (and SwinUNETR's `window_size`) from the model's fields. MONAI's SwinUNETR `downsample` is no
medjax field (medjax merges row-major either way) and no tensor shape shows it: the registered mapping is MONAI's
default "merging"; use `mapping.from_torch(MonaiSwinUNETR(downsample="mergingv2"), ...)` for "mergingv2" in 3D.

Conventions checked (MONAI 1.6.1; tests/transfer/test_monai_weights.py compares eval-mode outputs):
- Instance norm: MONAI's default "instance" has no affine parameters, as medjax's UNETR `norm="instance"` and
  SwinUNETR `norm_affine=False`. Epsilon 1e-5 for every norm (batch, instance, LayerNorm) on both sides; exact
  (erf) GELU in the transformer MLPs.
- Attention: scale head_dim^-0.5; fused qkv rows are (3, heads, head_dim) in both; UNETR qkv without bias
  (MONAI default `qkv_bias=False`), Swin with (`qkv_bias=True`). Swin's relative position bias table is
  `(prod(2 W - 1), heads)` with the row-major offset index `(p - q + W - 1)` on both sides (exported buffers equal
  MONAI's); MONAI indexes a shrunk window by slicing the full window's index matrix, medjax by the shrunk
  window's offsets unless `monai_window_index=True`.
- Patch merging: MONAI concatenates the 2^d voxels of each 2x..x2 block in the order of its `downsample`:
  "mergingv2" in 3D is row-major like medjax, "merging" (the default) in 3D is offsets (z, y, x) = 000, 100, 010,
  001, 110, 101, 011, 111, and both in 2D (y, x) = 00, 10, 01, 11. The merging LayerNorm's and reduction's 2^d
  channel blocks are permuted accordingly.
- SwinUNETR v1 only: `use_v2=True` adds a residual conv block per stage (swinViT.layers{i}c) medjax lacks; such a
  state dict is refused with those tensors listed as unexpected.
- Transposed convolutions: MONAI's kernel == stride, padding 0 up-convolutions (no bias) are exactly
  `layers.Upsample` (`monai_common.transposed_conv_layout`).

Not matched: UNETR's `proj_type="perceptron"` or `conv_block=False`, group norm; these show up as mis-shaped or
missing tensors.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any, Tuple

import numpy as np

from medjax.models import layers, swin_unetr
from medjax.transfer import mapping
from medjax.transfer import monai_common as common

# Where MONAI's patch merging puts the 2^d offsets of each block (torch chunk t holds offset ORDERS[...][t]).
MERGING_ORDERS = {
  ("merging", 3): ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
  ("mergingv2", 3): tuple(itertools.product(range(2), repeat=3)),
  ("merging", 2): ((0, 0), (1, 0), (0, 1), (1, 1)),
  ("mergingv2", 2): ((0, 0), (1, 0), (0, 1), (1, 1)),
}


@functools.cache
def merging_layout(downsample: str, spatial_dims: int, kernel: bool) -> mapping.Layout:
  """MONAI patch merging norm `(2^d C,)` / reduction weight `(2C, 2^d C)` <-> medjax `(2^d C,)` / `(2^d C, 2C)`,
  whose channel blocks follow the row-major offsets (`swin_unetr.space_to_depth`)."""
  try:
    offsets = MERGING_ORDERS[downsample, spatial_dims]
  except KeyError:
    raise ValueError(f"MONAI SwinUNETR downsample {downsample!r} in {spatial_dims}D is not mapped; "
                     f"known: {sorted(MERGING_ORDERS)}") from None
  # order[t]: the medjax (row-major) block of torch block t.
  order = np.array([np.ravel_multi_index(o, (2,) * spatial_dims) for o in offsets])
  inverse = np.argsort(order)

  def blocks(a, index):  # permutes the 2^d channel blocks along axis 0
    return a.reshape(len(order), -1, *a.shape[1:])[index].reshape(a.shape)

  if kernel:
    return mapping.Layout(f"merging_kernel_{downsample}", lambda t, shape: blocks(t.T, inverse),
                          lambda x: blocks(x, order).T, lambda shape: (shape[1], shape[0]))
  return mapping.Layout(f"merging_{downsample}", lambda t, shape: blocks(t, inverse), lambda x: blocks(x, order),
                        tuple)


# ------------------------------------------------------------------------------------------------------- UNETR


class MonaiUNETR(common.MonaiMapping):
  """monai.networks.nets.UNETR <-> medjax "unetr" (patch 16, 12 layers, as MONAI fixes them)."""

  model_names = ("unetr",)
  ignored_suffixes = ("num_batches_tracked", "norm_cross_attn.weight", "norm_cross_attn.bias")
  _PATCH = "vit.patch_embedding.patch_embeddings.weight"

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, leaf = path
    up = common.transposed_conv_layout((2,) * self.spatial_dims)
    head, rest = modules[0] if modules else "", modules[1:]
    if head == "patch_embed" and not rest:
      return mapping.TorchKey(f"vit.patch_embedding.patch_embeddings.{mapping.leaf_name(path)}")
    if head == "encoder":
      if not rest and leaf == "pos_embedding":
        return mapping.TorchKey("vit.patch_embedding.position_embeddings", mapping.COPY)
      if rest == ["norm"]:
        return mapping.TorchKey(f"vit.norm.{mapping.leaf_name(path)}")
      block = re.fullmatch(r"block(\d+)", rest[0]) if rest else None
      names = {("norm1",): "norm1", ("norm2",): "norm2", ("attn", "qkv"): "attn.qkv",
               ("attn", "out"): "attn.out_proj", ("mlp1",): "mlp.linear1", ("mlp2",): "mlp.linear2"}
      if block and tuple(rest[1:]) in names:
        return mapping.TorchKey(f"vit.blocks.{block[1]}.{names[tuple(rest[1:])]}.{mapping.leaf_name(path)}")
    if head == "enc0":
      return mapping.TorchKey(f"encoder1.layer.{common.res_block(path, rest, 'UNETR')}")
    enc, dec = re.fullmatch(r"enc(\d)", head), re.fullmatch(r"dec(\d)", head)
    if enc and rest and leaf == "kernel" and rest == ["up0"]:
      return mapping.TorchKey(f"encoder{int(enc[1]) + 1}.transp_conv_init.conv.weight", up)
    if enc and rest:
      step = re.fullmatch(r"(up|res)(\d+)", rest[0])
      if step and step[1] == "up" and len(rest) == 1 and leaf == "kernel":
        return mapping.TorchKey(f"encoder{int(enc[1]) + 1}.blocks.{int(step[2]) - 1}.0.conv.weight", up)
      if step and step[1] == "res":
        return mapping.TorchKey(f"encoder{int(enc[1]) + 1}.blocks.{int(step[2]) - 1}.1."
                                f"{common.res_block(path, rest[1:], 'UNETR')}")
    if dec and rest == ["up"] and leaf == "kernel":
      return mapping.TorchKey(f"decoder{int(dec[1]) + 2}.transp_conv.conv.weight", up)
    if dec and rest and rest[0] == "res":
      return mapping.TorchKey(f"decoder{int(dec[1]) + 2}.conv_block.{common.res_block(path, rest[1:], 'UNETR')}")
    if head == "seg_head" and not rest:
      return mapping.TorchKey(f"out.conv.conv.{mapping.leaf_name(path)}")
    raise common.unknown(path, "UNETR")

  def model_kwargs(self, state_dict, model_kwargs):
    kwargs = self._fill_spatial_dims(state_dict, model_kwargs, self._PATCH)
    nd = self._field("unetr", kwargs, "spatial_dims")
    get = state_dict.get
    if get("out.conv.conv.weight") is not None:
      kwargs.setdefault("num_classes", int(get("out.conv.conv.weight").shape[0]))
    if get(self._PATCH) is not None:
      kwargs.setdefault("hidden_size", int(get(self._PATCH).shape[0]))
    if get("encoder1.layer.conv1.conv.weight") is not None:
      kwargs.setdefault("feature_size", int(get("encoder1.layer.conv1.conv.weight").shape[0]))
    if get("vit.blocks.0.mlp.linear1.weight") is not None:
      kwargs.setdefault("mlp_dim", int(get("vit.blocks.0.mlp.linear1.weight").shape[0]))
    kwargs.setdefault("qkv_bias", "vit.blocks.0.attn.qkv.bias" in state_dict)
    norm = common.spatial_norm_kind(state_dict, "encoder1.layer.norm1", "instance_affine")
    if norm is not None:
      kwargs.setdefault("norm", norm)
    tokens = get("vit.patch_embedding.position_embeddings")
    if "image_size" not in kwargs and tokens is not None:
      # A cubic image is the only one the token count fixes; others must be given.
      side = round(tokens.shape[1] ** (1 / nd))
      if side ** nd != tokens.shape[1]:
        raise ValueError(f"MONAI UNETR: {tokens.shape[1]} position embeddings are no cubic patch grid; pass "
                         f"model_kwargs={{'image_size': ...}} (the img_size it was built with)")
      kwargs["image_size"] = 16 * side
    return kwargs

  def in_channels(self, state_dict) -> int:
    return self._in_channels(state_dict, self._PATCH)

  def input_shape(self, model, model_kwargs, in_channels):
    # The position embeddings fix the input size.
    return (1, *layers.to_tuple(model.image_size, model.spatial_dims, "image_size"), in_channels)

  def extra_torch_tensors(self, variables):
    # MONAI's TransformerBlock always builds a cross-attention LayerNorm it does not use without cross-attention:
    # its initial 1 / 0 keep strict loading happy.
    encoder = variables["params"]["encoder"]
    hidden = np.asarray(encoder["norm"]["scale"])
    out = {}
    for name in encoder:
      block = re.fullmatch(r"block(\d+)", name)
      if block:
        out[f"vit.blocks.{block[1]}.norm_cross_attn.weight"] = np.ones_like(hidden)
        out[f"vit.blocks.{block[1]}.norm_cross_attn.bias"] = np.zeros_like(hidden)
    return out


# --------------------------------------------------------------------------------------------------- SwinUNETR


class MonaiSwinUNETR(common.MonaiMapping):
  """monai.networks.nets.SwinUNETR (v1, 4 stages) <-> medjax "swin_unetr".

  spatial_dims: the dimension the layouts are built for (2 or 3); `bind` replaces it by the model's.
  downsample: MONAI's `downsample` ("merging", its default, or "mergingv2"): the order of the merged offsets.
  `bind` also takes the model's `window_size` (for the exported `relative_position_index` buffers); where the
  model kwargs do not give it, an isotropic window is read off the bias tables.
  """

  model_names = ("swin_unetr",)
  ignored_suffixes = ("num_batches_tracked", "relative_position_index")
  _PATCH = "swinViT.patch_embed.proj.weight"

  def __init__(self, spatial_dims: int = 3, downsample: str = "merging"):
    super().__init__(spatial_dims)
    merging_layout(downsample, self.spatial_dims, False)  # refuses an unknown downsample now
    self.downsample = downsample
    self.window_size: Any = None  # None: read off the bias tables

  def bind(self, model_name, model_kwargs):
    bound = super().bind(model_name, model_kwargs)
    # Not the model's default 7 when absent: the tables tell the window the variables were built with.
    bound.window_size = model_kwargs.get("window_size")
    return bound

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, leaf = path
    head, rest = modules[0] if modules else "", modules[1:]
    if head == "patch_embed" and not rest:
      return mapping.TorchKey(f"swinViT.patch_embed.proj.{mapping.leaf_name(path)}")
    block, merge = re.fullmatch(r"stage(\d+)_block(\d+)", head), re.fullmatch(r"stage(\d+)_merge", head)
    if block:
      prefix = f"swinViT.layers{block[1]}.0.blocks.{block[2]}"
      if rest == ["attn"] and leaf == "relative_position_bias_table":
        return mapping.TorchKey(f"{prefix}.attn.relative_position_bias_table", mapping.COPY)
      names = {("norm1",): "norm1", ("norm2",): "norm2", ("attn", "qkv"): "attn.qkv", ("attn", "proj"): "attn.proj",
               ("mlp", "fc1"): "mlp.linear1", ("mlp", "fc2"): "mlp.linear2"}
      if tuple(rest) in names:
        return mapping.TorchKey(f"{prefix}.{names[tuple(rest)]}.{mapping.leaf_name(path)}")
    if merge and rest in (["norm"], ["reduction"]):
      layout = merging_layout(self.downsample, self.spatial_dims, leaf == "kernel")
      return mapping.TorchKey(f"swinViT.layers{merge[1]}.0.downsample.{rest[0]}.{mapping.leaf_name(path)}", layout)
    up = re.fullmatch(r"decoder(_in|\d+)_up", head)
    if up and not rest and leaf == "kernel":
      index = 1 if up[1] == "_in" else int(up[1]) + 2
      return mapping.TorchKey(f"decoder{index}.transp_conv.conv.weight",
                              common.transposed_conv_layout((2,) * self.spatial_dims))
    res = re.fullmatch(r"(encoder|decoder)(_in|\d+)|bottleneck", head)
    if res and rest:
      if head == "bottleneck":
        prefix = "encoder10.layer"
      else:
        index = 1 if res[2] == "_in" else int(res[2]) + 2
        prefix = f"encoder{index}.layer" if res[1] == "encoder" else f"decoder{index}.conv_block"
      return mapping.TorchKey(f"{prefix}.{common.res_block(path, rest, 'SwinUNETR')}")
    if head == "head" and not rest:
      return mapping.TorchKey(f"out.conv.conv.{mapping.leaf_name(path)}")
    raise common.unknown(path, "SwinUNETR")

  def model_kwargs(self, state_dict, model_kwargs):
    kwargs = self._fill_spatial_dims(state_dict, model_kwargs, self._PATCH)
    get = state_dict.get
    if get("out.conv.conv.weight") is not None:
      kwargs.setdefault("num_classes", int(get("out.conv.conv.weight").shape[0]))
    if get(self._PATCH) is not None:
      kwargs.setdefault("feature_size", int(get(self._PATCH).shape[0]))
    depths = tuple(common.count(state_dict, rf"swinViT\.layers{i}\.0\.blocks\.(\d+)\.") for i in range(1, 5))
    if all(depths):
      kwargs.setdefault("depths", depths)
      kwargs.setdefault("num_heads", tuple(
          int(get(f"swinViT.layers{i}.0.blocks.0.attn.relative_position_bias_table").shape[1]) for i in range(1, 5)))
      kwargs.setdefault("qkv_bias", "swinViT.layers1.0.blocks.0.attn.qkv.bias" in state_dict)
      if "window_size" not in kwargs:
        table = get("swinViT.layers1.0.blocks.0.attn.relative_position_bias_table")
        kwargs["window_size"] = self._window(table.shape[0], kwargs.get("spatial_dims", self.spatial_dims))
    norm = common.spatial_norm_kind(state_dict, "encoder1.layer.norm1", "instance")
    if norm is not None:
      kwargs.setdefault("norm", norm)
      kwargs.setdefault("norm_affine", True)
    return kwargs

  def _window(self, table_rows: int, nd: int) -> Tuple[int, ...]:
    """The `nd`-D window whose bias table has `table_rows` rows (`prod(2 W - 1)`): the bound `window_size`, or
    an isotropic one."""
    if self.window_size is not None:
      window = layers.to_tuple(self.window_size, nd, "window_size")
      if int(np.prod([2 * w - 1 for w in window])) != table_rows:
        raise ValueError(f"MONAI SwinUNETR: window_size {window} has bias tables of "
                         f"{int(np.prod([2 * w - 1 for w in window]))} rows, the variables {table_rows}")
      return window
    extent = round(table_rows ** (1 / nd))
    if extent ** nd != table_rows or extent % 2 == 0:
      raise ValueError(f"MONAI SwinUNETR: a bias table of {table_rows} rows is no isotropic window; pass the "
                       f"model's window_size in model_kwargs")
    return ((extent + 1) // 2,) * nd

  def in_channels(self, state_dict) -> int:
    return self._in_channels(state_dict, self._PATCH)

  def input_shape(self, model, model_kwargs, in_channels):
    # The smallest input the stages accept: patch size 2 and one halving per stage (the shapes do not depend on it).
    return (1,) + (2 ** (len(model.depths) + 1),) * model.spatial_dims + (in_channels,)

  def extra_torch_tensors(self, variables):
    # MONAI keeps each block's relative position index (of the full window) as a buffer.
    out = {}
    for name, module in variables["params"].items():
      block = re.fullmatch(r"stage(\d+)_block(\d+)", name)
      if block:
        window = self._window(np.shape(module["attn"]["relative_position_bias_table"])[0], self.spatial_dims)
        out[f"swinViT.layers{block[1]}.0.blocks.{block[2]}.attn.relative_position_index"] = (
            swin_unetr.relative_position_index(window, window).astype(np.int64))
    return out
