"""MONAI DynUNet and DenseNet121 <-> medjax "unet" and "densenet121" (shared names and layouts: `monai_common`).

MonaiDynUNet: `DynUNet(spatial_dims, in_channels, out_channels, kernel_size, strides, upsample_kernel_size,
filters, norm_name, act_name=leakyrelu 0.01, deep_supervision, deep_supr_num, res_block, trans_bias)` with
`strides[0] == 1` and `upsample_kernel_size == strides[1:]` <-> medjax `UNet(features=filters, kernel_size,
strides=strides[1:], blocks_per_stage=2, residual=res_block, decoder_residual=False, decoder_kernel_from_below=True,
upsample_bias=trans_bias, deep_supervision=deep_supr_num or 0, norm="instance" (affine) or "batch")`. With L levels:
  input_block.* / downsamples.{i-1}.* / bottleneck.*   enc0/* / enc{i}/* (1 <= i <= L-2) / enc{L-1}/*
    (a MONAI block X: X.conv{k}.conv.weight, X.norm{k}.* <-> enc{i}/conv{k-1}/{conv,norm}; X.conv3, X.norm3
    <-> enc{i}/skip/{conv,norm})
  upsamples.{L-2-i}.transp_conv.conv.{weight,bias}  up{i}/{kernel,bias}
  upsamples.{L-2-i}.conv_block.*                    dec{i}/* (as a block)
  output_block.conv.conv / deep_supervision_heads.{i-1}.conv.conv   seg_head / ds_head{i}
  skip_layers.*                                     MONAI's second names of the same modules: ignored on import,
                                                    written on export (strict loading wants them)
The names and the up-convolution layouts depend on the strides (the number of transitions places the bottleneck),
which medjax variables do not keep: `bind` takes them (and `spatial_dims`) from the UNet's fields, so the one
registered instance serves every configuration. On import they are read off the state dict (the up-convolution
kernels are the strides); on export pass the model kwargs (`transfer.to_torch(variables, "unet", kwargs,
source="monai")`; UNet's defaults where absent).

MonaiDenseNet121: `DenseNet121(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
bn_size)` (also DenseNet169/201/264: "densenet121" with their block_config) <-> medjax DenseNet121:
  features.conv0 / features.norm0                   stem_conv / stem_norm
  features.denseblock{i}.denselayer{j}.layers.{norm1,conv1,norm2,conv2}   block{i}_layer{j}/{norm1,conv1,norm2,conv2}
  features.transition{i}.{norm,conv}                transition{i}/{norm,conv}
  features.norm5 / class_layers.out                 final_norm / head
  *.num_batches_tracked                             ignored on import, exported as 0

Conventions checked (MONAI 1.6.1; tests/transfer/test_monai_weights.py compares eval-mode outputs): DynUNet's
default norm ("instance", {"affine": True}) is medjax UNet's affine "instance"; epsilon 1e-5 for batch and
instance norms on both sides; LeakyReLU slope 0.01 (`layers.ACTIVATIONS`); DynUNet's kernel == stride, padding 0
up-convolutions (`trans_bias` for their bias) are exactly `layers.Upsample`.

Not matched: DynUNet with `upsample_kernel_size != strides` or `strides[0] != 1` (medjax's up-convolution has
kernel == stride and its first stage does not downsample), MONAI's non-affine DynUNet instance norm, group norm;
these show up as mis-shaped or missing tensors (a first stride != 1 is invisible in the weights: the outputs
differ).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from medjax.models import layers
from medjax.transfer import mapping
from medjax.transfer import monai_common as common

# ----------------------------------------------------------------------------------------------------- DynUNet

# medjax block child -> MONAI conv / norm index.
_DYN_BLOCK = {"conv0": "conv1", "conv1": "conv2", "skip": "conv3"}
# MONAI's DynUNet registers its modules twice: once by role (input_block, downsamples, ...) and once in the
# recursive `skip_layers` (skip_layers.(next_layer.)^i{downsample,upsample,super_head}, the bottleneck as the last
# next_layer). Every alias starts with this; no primary name does.
_DYN_ALIAS_PREFIX = "skip_layers."


class MonaiDynUNet(common.MonaiMapping):
  """monai.networks.nets.DynUNet <-> medjax "unet" (see the module docstring for the UNet options).

  spatial_dims: 2 or 3. strides: DynUNet's `strides[1:]` (= its `upsample_kernel_size`), one entry per transition,
  each an int or a per-axis tuple; its length fixes the number of levels. Both are the UNet's fields, which
  `bind` fills in: `MonaiDynUNet()` (the registered instance) is unbound and names nothing until bound.
  """

  model_names = ("unet",)

  def __init__(self, spatial_dims: int = 3, strides: Optional[Sequence[Any]] = None):
    super().__init__(spatial_dims)
    self.strides: Optional[Tuple[Tuple[int, ...], ...]] = None
    if strides is not None:
      self.strides = tuple(layers.to_tuple(s, self.spatial_dims, "strides") for s in strides)

  @property
  def levels(self) -> int:
    return len(self._bound_strides()) + 1

  def _bound_strides(self) -> Tuple[Tuple[int, ...], ...]:
    if self.strides is None:
      raise ValueError("MonaiDynUNet() names tensors once bound to a model: bind('unet', model_kwargs) (the "
                       "transfer.from_torch / to_torch entry points do)")
    return self.strides

  def bind(self, model_name, model_kwargs):
    self.check_model_name(model_name)
    nd = int(self._field(model_name, model_kwargs, "spatial_dims"))
    features = self._field(model_name, model_kwargs, "features")
    strides = layers.per_stage(self._field(model_name, model_kwargs, "strides"), len(features) - 1, nd, "strides")
    return type(self)(nd, strides)

  def ignored(self, name: str) -> bool:
    # The skip_layers aliases duplicate the primary tensors (written back on export).
    return name.startswith(_DYN_ALIAS_PREFIX) or super().ignored(name)

  def _block(self, i: int) -> str:
    return "input_block" if i == 0 else ("bottleneck" if i == self.levels - 1 else f"downsamples.{i - 1}")

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    strides = self._bound_strides()
    _, *modules, leaf = path
    head, rest = modules[0] if modules else "", modules[1:]
    stage = re.fullmatch(r"(enc|dec|up|ds_head)(\d+)", head)
    i = int(stage[2]) if stage else -1
    in_block = len(rest) == 2 and rest[0] in _DYN_BLOCK and rest[1] in ("conv", "norm")
    if stage and stage[1] in ("enc", "dec") and in_block:
      prefix = self._block(i) if stage[1] == "enc" else f"upsamples.{self.levels - 2 - i}.conv_block"
      conv = _DYN_BLOCK[rest[0]]
      if rest[1] == "conv":
        return mapping.TorchKey(f"{prefix}.{conv}.conv.{mapping.leaf_name(path)}")
      return mapping.TorchKey(f"{prefix}.norm{conv[-1]}.{mapping.leaf_name(path)}")
    if stage and stage[1] == "up" and not rest and i < self.levels - 1:
      layout = common.transposed_conv_layout(strides[i]) if leaf == "kernel" else None
      return mapping.TorchKey(f"upsamples.{self.levels - 2 - i}.transp_conv.conv.{mapping.leaf_name(path)}", layout)
    if head == "seg_head" and not rest:
      return mapping.TorchKey(f"output_block.conv.conv.{mapping.leaf_name(path)}")
    if stage and stage[1] == "ds_head" and not rest:
      return mapping.TorchKey(f"deep_supervision_heads.{i - 1}.conv.conv.{mapping.leaf_name(path)}")
    raise common.unknown(path, "DynUNet")

  def model_kwargs(self, state_dict, model_kwargs):
    kwargs = self._fill_spatial_dims(state_dict, model_kwargs, "input_block.conv1.conv.weight")
    blocks = ["input_block"] + [f"downsamples.{i}" for i in range(common.count(state_dict, r"downsamples\.(\d+)\."))]
    blocks.append("bottleneck")
    weights = [state_dict.get(f"{b}.conv1.conv.weight") for b in blocks]
    if all(w is not None for w in weights):
      kwargs.setdefault("features", tuple(int(w.shape[0]) for w in weights))
      kwargs.setdefault("kernel_size", tuple(tuple(int(k) for k in w.shape[2:]) for w in weights))
      kwargs.setdefault("residual", any(f"{b}.conv3.conv.weight" in state_dict for b in blocks))
    # upsamples.{L-2-i} is transition i's up-convolution, whose kernel is its stride (upsample_kernel_size ==
    # strides[1:]); a given `strides` that disagrees shows up as mis-shaped up-convolutions.
    ups = [state_dict.get(f"upsamples.{len(blocks) - 2 - i}.transp_conv.conv.weight") for i in range(len(blocks) - 1)]
    if ups and all(w is not None for w in ups):
      kwargs.setdefault("strides", tuple(tuple(int(k) for k in w.shape[2:]) for w in ups))
    if "output_block.conv.conv.weight" in state_dict:
      kwargs.setdefault("num_classes", int(state_dict["output_block.conv.conv.weight"].shape[0]))
    kwargs.setdefault("deep_supervision", common.count(state_dict, r"deep_supervision_heads\.(\d+)\."))
    kwargs.setdefault("upsample_bias", "upsamples.0.transp_conv.conv.bias" in state_dict)
    norm = common.spatial_norm_kind(state_dict, "input_block.norm1", "instance")
    if norm is not None:
      kwargs.setdefault("norm", norm)
    kwargs.setdefault("blocks_per_stage", 2)
    kwargs.setdefault("decoder_residual", False)
    kwargs.setdefault("decoder_kernel_from_below", True)
    return kwargs

  def in_channels(self, state_dict) -> int:
    return self._in_channels(state_dict, "input_block.conv1.conv.weight")

  def input_shape(self, model, model_kwargs, in_channels):
    # The smallest input: one voxel at the bottleneck (the shapes do not depend on the size). From the model's
    # own fields, so that an unbound mapping traces too.
    strides = layers.per_stage(model.strides, len(model.features) - 1, model.spatial_dims, "strides")
    total = np.prod(np.array(strides), axis=0) if strides else np.ones(model.spatial_dims, int)
    return (1, *(int(t) for t in total), in_channels)

  def extra_torch_tensors(self, variables):
    # MONAI's skip_layers names of the same modules (see _DYN_ALIAS_PREFIX).
    prefixes = {}
    for i in range(self.levels - 1):
      chain = _DYN_ALIAS_PREFIX + "next_layer." * i
      prefixes[self._block(i) + "."] = chain + "downsample."
      prefixes[f"upsamples.{self.levels - 2 - i}."] = chain + "upsample."
      prefixes[f"deep_supervision_heads.{i - 1}."] = chain + "super_head."  # level 0 has none (i - 1 = -1)
    prefixes["bottleneck."] = _DYN_ALIAS_PREFIX + "next_layer." * (self.levels - 1)
    out = {}
    for name, value in self._primary_tensors(variables).items():
      for prefix, alias in prefixes.items():
        if name.startswith(prefix):
          out[alias + name[len(prefix):]] = value
    return out

  def _primary_tensors(self, variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """The tensors `mapping.to_torch` writes from the variables (their aliases hold the same values)."""
    out = {}
    flat = mapping.flatten({c: variables[c] for c in ("params", "batch_stats") if c in variables})
    for path, value in flat.items():
      key = self.torch_key(path)
      out[key.name] = np.array((key.layout or mapping.auto_layout(path)).to_torch(np.asarray(value)))
      if path[0] == "batch_stats" and path[-1] == "mean":
        out[key.name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out


# ------------------------------------------------------------------------------------------------- DenseNet121


class MonaiDenseNet121(common.MonaiMapping):
  """monai.networks.nets.DenseNet121 (and DenseNet169/201/264 as "densenet121" with their block_config) <->
  medjax "densenet121", 2D or 3D: the layouts do not depend on the dimension, which is read off the state dict."""

  model_names = ("densenet121",)
  _STEM = "features.conv0.weight"

  def __init__(self):
    super().__init__(spatial_dims=0)  # unused: no layout here depends on it

  def bind(self, model_name, model_kwargs):
    del model_name, model_kwargs  # the names and layouts are the same for every configuration
    return self

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, _ = path
    head, rest = modules[0] if modules else "", modules[1:]
    names = {"stem_conv": "features.conv0", "stem_norm": "features.norm0", "final_norm": "features.norm5",
             "head": "class_layers.out"}
    if head in names and not rest:
      return mapping.TorchKey(f"{names[head]}.{mapping.leaf_name(path)}")
    layer = re.fullmatch(r"block(\d+)_layer(\d+)", head)
    if layer and len(rest) == 1 and rest[0] in ("norm1", "conv1", "norm2", "conv2"):
      prefix = f"features.denseblock{layer[1]}.denselayer{layer[2]}.layers"
      return mapping.TorchKey(f"{prefix}.{rest[0]}.{mapping.leaf_name(path)}")
    transition = re.fullmatch(r"transition(\d+)", head)
    if transition and rest in (["norm"], ["conv"]):
      return mapping.TorchKey(f"features.transition{transition[1]}.{rest[0]}.{mapping.leaf_name(path)}")
    raise common.unknown(path, "DenseNet")

  def model_kwargs(self, state_dict, model_kwargs):
    kwargs = dict(model_kwargs)
    stem = state_dict.get(self._STEM)
    if stem is not None:
      kwargs.setdefault("spatial_dims", stem.ndim - 2)
      kwargs.setdefault("init_features", int(stem.shape[0]))
    if "class_layers.out.weight" in state_dict:
      kwargs.setdefault("num_classes", int(state_dict["class_layers.out.weight"].shape[0]))
    blocks = common.count(state_dict, r"features\.denseblock(\d+)\.")
    if blocks:
      kwargs.setdefault("block_config", tuple(
          common.count(state_dict, rf"features\.denseblock{b}\.denselayer(\d+)\.") for b in range(1, blocks + 1)))
    conv1, conv2 = (state_dict.get(f"features.denseblock1.denselayer1.layers.conv{k}.weight") for k in (1, 2))
    if conv1 is not None and conv2 is not None:
      kwargs.setdefault("growth_rate", int(conv2.shape[0]))
      kwargs.setdefault("bn_size", int(conv1.shape[0]) // int(conv2.shape[0]))
    return kwargs

  def in_channels(self, state_dict) -> int:
    return self._in_channels(state_dict, self._STEM)

  def input_shape(self, model, model_kwargs, in_channels):
    return (1,) + (mapping.TRACE_SIZE,) * model.spatial_dims + (in_channels,)
