"""torchvision and timm Vision Transformers <-> medjax ViT variables (`medjax.models.vit`: vit_ti16, vit_s16,
vit_b16, vit_l16).

Names (medjax path under params/ -> torchvision -> timm; `i` the block 0..num_layers-1, `*` weight/bias):
  patch_embed/{kernel,bias}                   conv_proj.*                         patch_embed.proj.*
  transformer/cls_token                       class_token                         cls_token
  transformer/encoder/pos_embedding           encoder.pos_embedding               pos_embed
  .../encoder/block{i}/norm1/{scale,bias}     encoder.layers.encoder_layer_{i}.   blocks.{i}.norm1.*
                                                ln_1.*
  .../encoder/block{i}/attn/qkv/{kernel,bias} ....self_attention.in_proj_*        blocks.{i}.attn.qkv.*
  .../encoder/block{i}/attn/out/{kernel,bias} ....self_attention.out_proj.*       blocks.{i}.attn.proj.*
  .../encoder/block{i}/norm2/{scale,bias}     ....ln_2.*                          blocks.{i}.norm2.*
  .../encoder/block{i}/mlp1/{kernel,bias}     ....mlp.0.*                         blocks.{i}.mlp.fc1.*
  .../encoder/block{i}/mlp2/{kernel,bias}     ....mlp.3.*                         blocks.{i}.mlp.fc2.*
  transformer/encoder/norm/{scale,bias}       encoder.ln.*                        norm.*
  transformer/head/{kernel,bias}              heads.head.*                        head.*
Layouts: the patch embedding `(hidden, C, *patch)` <-> `(*patch, C, hidden)` (medjax's space-to-depth matmul
flattens a patch as (*patch, C), exactly a VALID conv with kernel == stride); linear weights `(out, in)` <->
`(in, out)`; LayerNorm weight -> scale; the rest is copied. The fused QKV projection needs no splitting: medjax
keeps it as one `Dense(3 * hidden)` whose output channels are ordered (q/k/v, head, head_dim) like torch's
`in_proj_weight` / timm's `qkv.weight` rows, so its kernel is just the transposed torch weight.

Conventions checked against both sources (plain ViT, `medjax.models.vit`): pre-norm blocks; LayerNorm epsilon
1e-6 (both torch ViTs use 1e-6, not torch's default 1e-5); exact-erf GELU (`nn.GELU()`, not the tanh
approximation); attention logits scaled by head_dim ** -0.5; the class token prepended (position 0) before
the position embedding is added, so the position embedding is `(1, 1 + grid tokens, hidden)` with the class
token's row first and the patches in row-major order; the classifier reads the final-normed class token.

torchvision's `VisionTransformer` only accepts square inputs of exactly `image_size` (its `image_size` is an
int); timm's takes `img_size=(H, W)` and so does medjax (`image_size=(H, W)`). On import `model_kwargs` is
completed from the state dict: `num_classes` (head rows), `patch_size` (patch conv), `image_size` (when not
given and the position embedding holds a square grid; a non-square grid needs `image_size`), and for timm
`qkv_bias=False` when the QKV bias is absent. hidden_size / num_layers / num_heads / mlp_dim come from the
medjax model name and `model_kwargs` (a mismatch is reported, not guessed; num_heads is not in the weights),
e.g. torchvision vit_b_32 is `vit_b16` with `{"patch_size": 32}`, vit_h_14 `vit_l16` with `{"patch_size": 14,
"hidden_size": 1280, "num_layers": 32, "mlp_dim": 5120}`.

Refused, as unexpected/missing/mis-shaped tensors in the one mismatch error: torchvision
`representation_size` (`heads.pre_logits`); timm `fc_norm=True` or global_pool "avg" with its default
fc_norm (`fc_norm.*` instead of `norm.*`), "map" (`attn_pool.*`), `reg_tokens`, `no_embed_class=True`
(position embedding without the class row), `init_values` (LayerScale `ls1/ls2.gamma`), `qk_norm` /
`scale_attn_norm` / `scale_mlp_norm`, `pre_norm` (`norm_pre.*`, and no patch bias), `num_classes=0` (no head).
The timm layout `class_token=False, global_pool="avg", fc_norm=False` is medjax `classifier="gap"` (same names
without `cls_token`) and converts. Not visible in a state dict, so not checkable here: timm `act_layer` (a
"gelu_tanh" model converts but its logits differ, ~2e-4 on the test model), `global_pool` "token" vs "avg"
when the class token exists, `dynamic_img_size`. The CNN-ViT hybrid (`vit_hybrid`) has no torchvision/timm counterpart.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from medjax.transfer import mapping

VIT_MODELS = ("vit_ti16", "vit_s16", "vit_b16", "vit_l16")
_BLOCK = re.compile(r"block(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


class _ViTNames(mapping.TorchMapping):
  """The shared naming scheme; subclasses fill the tables (medjax paths without the collection)."""

  model_names = VIT_MODELS
  # Whole variables -> torch tensor names (tried first).
  TENSORS: Mapping[mapping.Path, str] = {}
  # Modules outside the blocks -> torch modules (leaf kernel/scale -> weight, bias -> bias).
  MODULES: Mapping[mapping.Path, str] = {}
  # Torch module of block i ("{}" is i), and the tables inside a block (relative to it).
  BLOCK = ""
  BLOCK_TENSORS: Mapping[mapping.Path, str] = {}
  BLOCK_MODULES: Mapping[mapping.Path, str] = {}
  PATCH_WEIGHT = ""
  POS_EMBED = ""
  HEAD_WEIGHT = ""

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    collection, *rest = path
    rest = tuple(rest)
    name = None
    if collection == "params":
      block = _BLOCK.match(rest[2]) if rest[:2] == ("transformer", "encoder") and len(rest) > 3 else None
      if block:
        prefix, tensors, modules = self.BLOCK.format(block[1]) + ".", self.BLOCK_TENSORS, self.BLOCK_MODULES
        rest = rest[3:]
      else:
        prefix, tensors, modules = "", self.TENSORS, self.MODULES
      if rest in tensors:
        name = prefix + tensors[rest]
      elif rest[:-1] in modules and rest[-1] in _LEAVES:
        name = f"{prefix}{modules[rest[:-1]]}.{_LEAVES[rest[-1]]}"
    if name is None:
      raise ValueError(f"no {self.source} name for the medjax variable {'/'.join(path)}")
    return mapping.TorchKey(name)

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    head, patch, pos = (state_dict.get(n) for n in (self.HEAD_WEIGHT, self.PATCH_WEIGHT, self.POS_EMBED))
    if "num_classes" not in kwargs and head is not None and head.ndim == 2:
      kwargs["num_classes"] = int(head.shape[0])
    if patch is None or patch.ndim < 3:
      return kwargs
    if "patch_size" not in kwargs:
      kwargs["patch_size"] = _int_if_equal(patch.shape[2:])
    if "image_size" not in kwargs and pos is not None and pos.ndim == 3:
      # Only a square (cubic) grid is determined by its token count; the class token's row comes first.
      nd = patch.ndim - 2
      tokens = pos.shape[1] - (kwargs.get("classifier", "token") == "token")
      side = round(tokens ** (1 / nd)) if tokens > 0 else 0
      if side > 0 and side ** nd == tokens:
        patch_size = kwargs["patch_size"]
        per_axis = (patch_size,) * nd if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
        if len(per_axis) == nd:
          kwargs["image_size"] = _int_if_equal([side * p for p in per_axis])
    return kwargs

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    patch = state_dict.get(self.PATCH_WEIGHT)
    return int(patch.shape[1]) if patch is not None and patch.ndim >= 3 else 3

  def input_shape(self, model: Any, model_kwargs: Mapping[str, Any], in_channels: int) -> Tuple[int, ...]:
    # The learned position embeddings fix the input size: trace at image_size, not mapping.TRACE_SIZE.
    size = model.image_size
    size = (size,) * model.spatial_dims if isinstance(size, (int, np.integer)) else tuple(size)
    return (1, *size, in_channels)


def _int_if_equal(sizes) -> Any:
  """`(16, 16) -> 16`, `(8, 16) -> (8, 16)`: per-axis sizes as medjax's int-or-tuple fields."""
  sizes = tuple(int(s) for s in sizes)
  return sizes[0] if len(set(sizes)) == 1 else sizes


class TorchvisionViT(_ViTNames):
  """torchvision.models.VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, without
  `representation_size`). Square inputs only on the torch side."""

  source = "torchvision"
  TENSORS = {("transformer", "cls_token"): "class_token",
             ("transformer", "encoder", "pos_embedding"): "encoder.pos_embedding"}
  MODULES = {("patch_embed",): "conv_proj", ("transformer", "encoder", "norm"): "encoder.ln",
             ("transformer", "head"): "heads.head"}
  BLOCK = "encoder.layers.encoder_layer_{}"
  BLOCK_TENSORS = {("attn", "qkv", "kernel"): "self_attention.in_proj_weight",
                   ("attn", "qkv", "bias"): "self_attention.in_proj_bias"}
  BLOCK_MODULES = {("norm1",): "ln_1", ("attn", "out"): "self_attention.out_proj", ("norm2",): "ln_2",
                   ("mlp1",): "mlp.0", ("mlp2",): "mlp.3"}
  PATCH_WEIGHT, POS_EMBED, HEAD_WEIGHT = "conv_proj.weight", "encoder.pos_embedding", "heads.head.weight"


class TimmViT(_ViTNames):
  """timm.models.vision_transformer.VisionTransformer in the plain `vit_*_patch16_*` layout (class token,
  global_pool "token", final `norm`, no fc_norm / LayerScale / register tokens); see the module docstring."""

  source = "timm"
  TENSORS = {("transformer", "cls_token"): "cls_token", ("transformer", "encoder", "pos_embedding"): "pos_embed"}
  MODULES = {("patch_embed",): "patch_embed.proj", ("transformer", "encoder", "norm"): "norm",
             ("transformer", "head"): "head"}
  BLOCK = "blocks.{}"
  BLOCK_MODULES = {("norm1",): "norm1", ("attn", "qkv"): "attn.qkv", ("attn", "out"): "attn.proj",
                   ("norm2",): "norm2", ("mlp1",): "mlp.fc1", ("mlp2",): "mlp.fc2"}
  PATCH_WEIGHT, POS_EMBED, HEAD_WEIGHT = "patch_embed.proj.weight", "pos_embed", "head.weight"

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = super().model_kwargs(state_dict, model_kwargs)
    # timm's qkv_bias=False drops the QKV bias only (attn.proj keeps its bias, as medjax's `out`).
    qkv = "blocks.0.attn.qkv."
    if "qkv_bias" not in kwargs and qkv + "weight" in state_dict and qkv + "bias" not in state_dict:
      kwargs["qkv_bias"] = False
    return kwargs
