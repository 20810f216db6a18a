"""torchvision VGG, DenseNet, GoogLeNet and ShuffleNetV2 <-> medjax variables (`medjax.models.vgg`, `densenet`,
`inception`, `shufflenet`).

Names (torchvision -> medjax; every batch norm `X` is `X.{weight,bias}` <-> `params/x/{scale,bias}` and
`X.{running_mean,running_var}` <-> `batch_stats/x/{mean,var}`; `X.num_batches_tracked` is ignored on import and
exported as 0; conv / linear weights <-> `kernel`, biases <-> `bias`):

VGG (`i` the stage 1..5, `j` the conv 1..n_i; `f(i, j)` counts torchvision's `features` modules before it: per
conv a Conv2d, [BatchNorm2d,] ReLU, per stage a MaxPool2d):
  features.{f(i, j)}                    stage{i}/conv{j}
  features.{f(i, j) + 1}                stage{i}/norm{j}                 (the "_bn" variants)
  classifier.0 / .3 / .6                fc1 / fc2 / head
DenseNet (`i` the block, `j` the layer, both from 1):
  features.conv0 / features.norm0       stem_conv / stem_norm
  features.denseblock{i}.denselayer{j}.{norm1,conv1,norm2,conv2}   block{i}_layer{j}/{norm1,conv1,norm2,conv2}
  features.transition{i}.{norm,conv}    transition{i}/{norm,conv}
  features.norm5 / classifier           final_norm / head
GoogLeNet (`m` an Inception module 3a..5b, `k` 1..2):
  conv{1,2,3}.{conv,bn}                 conv{1,2,3}/{conv,norm}
  inception{m}.branch1.{conv,bn}        inception{m}/branch1/{conv,norm}
  inception{m}.branch{2,3}.0.*          inception{m}/branch{2,3}_reduce/*
  inception{m}.branch{2,3}.1.*          inception{m}/branch{2,3}/*
  inception{m}.branch4.1.*              inception{m}/branch4/*           (branch4.0 is the max-pool)
  aux{k}.conv.{conv,bn} / aux{k}.fc{1,2}   aux{k}/conv/{conv,norm} / aux{k}/fc{1,2}
  fc                                    head
ShuffleNetV2 (`i` the stage 2..4, `j` the unit from 0):
  conv1.{0,1} / conv5.{0,1} / fc        stem/{conv,norm} / head_conv/{conv,norm} / classifier
  stage{i}.{j}.branch1.{0,1}            stage{i}_block{j}/left_depthwise/{conv,norm}   (stride-2 units only)
  stage{i}.{j}.branch1.{2,3}            stage{i}_block{j}/left_project/{conv,norm}
  stage{i}.{j}.branch2.{0,1}            stage{i}_block{j}/right_expand/{conv,norm}
  stage{i}.{j}.branch2.{3,4}            stage{i}_block{j}/right_depthwise/{conv,norm}
  stage{i}.{j}.branch2.{5,6}            stage{i}_block{j}/right_project/{conv,norm}

Layouts: conv weights `(O, I/groups, *k)` <-> `(*k, I/groups, O)` (depthwise convs too), linear weights
`(out, in)` <-> `(in, out)`, except the first linear layer after a flatten (VGG's classifier.0, GoogLeNet's
aux{k}.fc1): torch flattens `(C, y, x)`, medjax channels-last `(y, x, C)`, so those kernels' rows are permuted
too (`channels_first_flatten`, 7x7 cells for VGG's adaptive pool, 4x4 for the aux heads).

Conventions checked against the medjax models (eval-mode logits agree to 1e-4 at non-square, mostly odd inputs in
tests/transfer/test_torchvision_cnns.py):
  * padding: every conv pads `k // 2` on both sides like torch; VGG's and DenseNet's pools are floor mode,
    DenseNet's and ShuffleNet's stem max-pools pad 1, as in torchvision; GoogLeNet's four max-pools use
    torch's ceil mode (`layers.max_pool_ceil`, no window of padding only) and its branch-4 pool pads 1.
  * VGG pools adaptively to 7x7 like torchvision (`pool_size=7`, any other size is refused on export and
    reported as a mis-shaped classifier.0 on import); dropout sits after each hidden ReLU in both.
  * batch norm: epsilon 1e-5 and momentum 0.9 (Flax) == torch's 0.1, except GoogLeNet's epsilon 1e-3 as
    torchvision's BasicConv2d (`inception.BN_EPSILON`).
  * GoogLeNet's `transform_input` (torchvision sets it for its pretrained weights) has no tensors: build the
    medjax model with `transform_input=True` for those weights (the same re-normalisation). The auxiliary
    heads: `aux_heads` is read from the state dict when not given (torchvision's `aux_logits=True` dicts hold
    aux1/aux2, `googlenet(weights=...)` without them does not); an explicit `aux_heads=False` with aux
    tensors in the dict reports them as unexpected. `init_weights` only changes torch's initialisation.
  * DenseNet and ShuffleNetV2 read their architecture from the state dict when not given (DenseNet:
    growth_rate, bn_size, block_config, init_features; ShuffleNet: stage_channels, stage_blocks), so
    torchvision's densenet161/169/201 load as medjax "densenet121" and any shufflenet_v2 width as any
    registered variant. VGG reads width and head_features; its stage layout (torch names count modules
    across stages, which a variable path alone does not tell) comes from the model's `stage_sizes` and
    `batch_norm` through `bind`.
  * norm other than "batch", DenseNet's `small_input` stem and VGG's `pool_size != 7` have no torchvision
    counterpart: to_torch refuses variables it cannot name; from_torch lists what does not fit.

Inputs: medjax takes channels-last `(B, H, W, C)`, torch `(B, C, H, W)`; the weights are the same either way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from medjax.models.base import MODELS
from medjax.transfer import mapping

SOURCE = "torchvision"


def channels_first_flatten(cells: int) -> mapping.Layout:
  """The first linear layer after a flatten of `cells` spatial positions: medjax kernel `(cells * C, out)`
  with rows ordered (cell, channel) (channels-last flatten) <-> torch weight `(out, C * cells)` with columns
  ordered (channel, cell)."""

  def to_medjax(t, shape):
    out, n = t.shape
    return t.reshape(out, n // cells, cells).transpose(2, 1, 0).reshape(shape)

  def to_torch(x):
    rows, out = x.shape
    if rows % cells:
      raise ValueError(f"a flattened {cells}-cell feature map needs a multiple of {cells} kernel rows, got "
                       f"{rows}: the model's pooled size differs from torchvision's")
    return x.reshape(cells, rows // cells, out).transpose(2, 1, 0).reshape(out, rows)

  return mapping.Layout(f"channels_first_flatten({cells})", to_medjax, to_torch, lambda s: (s[1], s[0]))


def _unnamed(path: mapping.Path, module: Any = None) -> ValueError:
  where = f" (module {module!r})" if module is not None else ""
  return ValueError(f"no {SOURCE} name for the medjax variable {'/'.join(path)}{where}")


def _key(path: mapping.Path, *parts: str, layout: Optional[mapping.Layout] = None) -> mapping.TorchKey:
  return mapping.TorchKey(".".join(parts + (mapping.leaf_name(path),)), layout)


def _first_conv_channels(state_dict: Mapping[str, np.ndarray], name: str) -> int:
  weight = state_dict.get(name)
  return int(weight.shape[1]) if weight is not None and weight.ndim >= 2 else 3


def _rows(state_dict: Mapping[str, np.ndarray], name: str) -> int:
  return int(np.shape(state_dict[name])[0])


def _count(state_dict: Mapping[str, np.ndarray], pattern: str) -> Dict[Tuple[int, ...], int]:
  """`{leading groups: number of distinct last groups}` over the names matching `pattern` (its last group an
  index), e.g. the layers of each dense block."""
  seen: Dict[Tuple[int, ...], set] = {}
  for name in state_dict:
    match = re.fullmatch(pattern, name)
    if match:
      *lead, last = (int(g) for g in match.groups())
      seen.setdefault(tuple(lead), set()).add(last)
  return {lead: len(members) for lead, members in sorted(seen.items())}


# ------------------------------------------------------------------------------------------------------ VGG


class TorchvisionVGG(mapping.TorchMapping):
  """torchvision.models.vgg11/vgg11_bn/vgg16/vgg16_bn <-> the medjax model of the same name (or any VGG whose
  `stage_sizes` torchvision has, e.g. vgg13's (2, 2, 2, 2, 2)). torchvision numbers the `features` modules
  across stages, so the names depend on the model's `stage_sizes` and `batch_norm`: `bind` configures the
  mapping from the model kwargs (the registered variant's defaults where absent); `TorchvisionVGG()` (one
  instance for every variant) names nothing until bound."""

  source = SOURCE
  model_names = ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn")
  CELLS = 7 * 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before the flatten

  def __init__(self, stage_sizes: Optional[Tuple[int, ...]] = None, batch_norm: bool = False):
    self.stage_sizes = None if stage_sizes is None else tuple(int(n) for n in stage_sizes)
    self.batch_norm = bool(batch_norm)

  def bind(self, model_name: str, model_kwargs: Mapping[str, Any]) -> TorchvisionVGG:
    self.check_model_name(model_name)
    model_cls = MODELS.get(model_name)  # the variants only change these defaults
    return type(self)(model_kwargs.get("stage_sizes", model_cls.stage_sizes),
                      model_kwargs.get("batch_norm", model_cls.batch_norm))

  def _feature_index(self, path: mapping.Path, stage: int, conv: int) -> int:
    if self.stage_sizes is None:
      raise ValueError("TorchvisionVGG() names tensors once bound to a model: bind(model_name, model_kwargs) (the "
                       "transfer.from_torch / to_torch entry points do)")
    if not (1 <= stage <= len(self.stage_sizes) and 1 <= conv <= self.stage_sizes[stage - 1]):
      raise ValueError(f"{'/'.join(path)} is not in the VGG stages {self.stage_sizes}")
    per_conv = 3 if self.batch_norm else 2  # Conv2d, [BatchNorm2d,] ReLU
    before = sum(n * per_conv + 1 for n in self.stage_sizes[:stage - 1])  # + 1: each stage's MaxPool2d
    return before + (conv - 1) * per_conv

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    modules = path[1:-1]
    if len(modules) == 1:
      index = {"fc1": 0, "fc2": 3, "head": 6}.get(modules[0])
      if index is None:
        raise _unnamed(path, modules[0])
      layout = channels_first_flatten(self.CELLS) if index == 0 and path[-1] == "kernel" else None
      return _key(path, f"classifier.{index}", layout=layout)
    stage = re.fullmatch(r"stage(\d+)", modules[0]) if len(modules) == 2 else None
    child = re.fullmatch(r"(conv|norm)(\d+)", modules[1]) if stage else None
    if not child or (child[1] == "norm" and not self.batch_norm):
      raise _unnamed(path, modules[-1])
    index = self._feature_index(path, int(stage[1]), int(child[2])) + (child[1] == "norm")
    return _key(path, f"features.{index}")

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    if "num_classes" not in kwargs and "classifier.6.weight" in state_dict:
      kwargs["num_classes"] = _rows(state_dict, "classifier.6.weight")
    if "width" not in kwargs and "features.0.weight" in state_dict:
      kwargs["width"] = _rows(state_dict, "features.0.weight")
    if "head_features" not in kwargs and {"classifier.0.weight", "classifier.3.weight"} <= set(state_dict):
      kwargs["head_features"] = (_rows(state_dict, "classifier.0.weight"), _rows(state_dict, "classifier.3.weight"))
    return kwargs

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    return _first_conv_channels(state_dict, "features.0.weight")


# ------------------------------------------------------------------------------------------------- DenseNet


class TorchvisionDenseNet(mapping.TorchMapping):
  """torchvision.models.densenet121 (and densenet161/169/201, whose architecture is read off the state dict
  into medjax "densenet121"'s fields) <-> medjax DenseNet."""

  source = SOURCE
  model_names = ("densenet121",)
  _TOP = {"stem_conv": "features.conv0", "stem_norm": "features.norm0", "final_norm": "features.norm5",
          "head": "classifier"}
  _CHILDREN = {"block": ("norm1", "conv1", "norm2", "conv2"), "transition": ("norm", "conv")}

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    modules = path[1:-1]
    if len(modules) == 1 and modules[0] in self._TOP:
      return _key(path, self._TOP[modules[0]])
    if len(modules) == 2:
      block = re.fullmatch(r"block(\d+)_layer(\d+)", modules[0])
      transition = re.fullmatch(r"transition(\d+)", modules[0])
      if block and modules[1] in self._CHILDREN["block"]:
        return _key(path, f"features.denseblock{block[1]}.denselayer{block[2]}", modules[1])
      if transition and modules[1] in self._CHILDREN["transition"]:
        return _key(path, f"features.transition{transition[1]}", modules[1])
    raise _unnamed(path, modules[-1] if modules else None)

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    layers = _count(state_dict, r"features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight")
    first = "features.denseblock1.denselayer1.conv{}.weight"
    inferred = {}
    if "classifier.weight" in state_dict:
      inferred["num_classes"] = _rows(state_dict, "classifier.weight")
    if "features.conv0.weight" in state_dict:
      inferred["init_features"] = _rows(state_dict, "features.conv0.weight")
    if first.format(2) in state_dict:
      inferred["growth_rate"] = _rows(state_dict, first.format(2))
      if first.format(1) in state_dict:
        inferred["bn_size"] = _rows(state_dict, first.format(1)) // inferred["growth_rate"]
    if layers and sorted(lead for lead, in layers) == list(range(1, len(layers) + 1)):
      inferred["block_config"] = tuple(layers.values())
    return {**inferred, **kwargs}

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    return _first_conv_channels(state_dict, "features.conv0.weight")


# ------------------------------------------------------------------------------------------------ GoogLeNet


class TorchvisionGoogLeNet(mapping.TorchMapping):
  """torchvision.models.googlenet (batch-normalised Inception v1, with or without aux heads) <-> medjax
  GoogLeNet. Build the medjax model with `transform_input=True` for torchvision's pretrained weights."""

  source = SOURCE
  model_names = ("googlenet",)
  _BRANCHES = {"branch1": "branch1", "branch2_reduce": "branch2.0", "branch2": "branch2.1",
               "branch3_reduce": "branch3.0", "branch3": "branch3.1", "branch4": "branch4.1"}
  _UNIT = {"conv": "conv", "norm": "bn"}  # a conv_bn (torchvision's BasicConv2d)
  AUX_CELLS = 4 * 4  # the aux heads' adaptive pool before their flatten

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    modules = path[1:-1]
    top, rest = (modules[0], modules[1:]) if modules else (None, ())
    if top == "head" and not rest:
      return _key(path, "fc")
    if re.fullmatch(r"conv[123]", top or "") and len(rest) == 1 and rest[0] in self._UNIT:
      return _key(path, top, self._UNIT[rest[0]])
    if re.fullmatch(r"inception[345][a-e]", top or "") and len(rest) == 2 and rest[0] in self._BRANCHES \
        and rest[1] in self._UNIT:
      return _key(path, top, self._BRANCHES[rest[0]], self._UNIT[rest[1]])
    if re.fullmatch(r"aux[12]", top or ""):
      if rest == ("fc1",):
        return _key(path, top, "fc1", layout=channels_first_flatten(self.AUX_CELLS) if path[-1] == "kernel" else None)
      if rest == ("fc2",):
        return _key(path, top, "fc2")
      if len(rest) == 2 and rest[0] == "conv" and rest[1] in self._UNIT:
        return _key(path, top, "conv", self._UNIT[rest[1]])
    raise _unnamed(path, modules[-1] if modules else None)

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    if "num_classes" not in kwargs and "fc.weight" in state_dict:
      kwargs["num_classes"] = _rows(state_dict, "fc.weight")
    if "aux_heads" not in kwargs:
      kwargs["aux_heads"] = any(name.startswith(("aux1.", "aux2.")) for name in state_dict)
    return kwargs

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    return _first_conv_channels(state_dict, "conv1.conv.weight")


# --------------------------------------------------------------------------------------------- ShuffleNetV2


class TorchvisionShuffleNetV2(mapping.TorchMapping):
  """torchvision.models.shufflenet_v2_x{0_5,1_0,1_5,2_0} <-> medjax ShuffleNetV2 (widths and units per stage
  are read off the state dict when not given)."""

  source = SOURCE
  model_names = ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")
  # medjax unit -> (torch branch, index of its conv in the branch's Sequential; the norm follows it)
  _UNITS = {"left_depthwise": ("branch1", 0), "left_project": ("branch1", 2), "right_expand": ("branch2", 0),
            "right_depthwise": ("branch2", 3), "right_project": ("branch2", 5)}
  _TOP = {"stem": "conv1", "head_conv": "conv5"}

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    modules = path[1:-1]
    if modules == ("classifier",):
      return _key(path, "fc")
    if len(modules) == 2 and modules[0] in self._TOP and modules[1] in ("conv", "norm"):
      return _key(path, self._TOP[modules[0]], str(int(modules[1] == "norm")))
    block = re.fullmatch(r"stage(\d+)_block(\d+)", modules[0]) if len(modules) == 3 else None
    if block and modules[1] in self._UNITS and modules[2] in ("conv", "norm"):
      branch, index = self._UNITS[modules[1]]
      return _key(path, f"stage{block[1]}.{block[2]}.{branch}", str(index + (modules[2] == "norm")))
    raise _unnamed(path, modules[-1] if modules else None)

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    units = _count(state_dict, r"stage(\d+)\.(\d+)\.branch2\.0\.weight")
    stages = [lead for lead, in units]
    inferred = {}
    if "fc.weight" in state_dict:
      inferred["num_classes"] = _rows(state_dict, "fc.weight")
    if stages and stages == list(range(2, 2 + len(stages))):
      inferred["stage_blocks"] = tuple(units.values())
      widths = ["conv1.0.weight"] + [f"stage{s}.0.branch2.5.weight" for s in stages] + ["conv5.0.weight"]
      if all(name in state_dict for name in widths):
        # each unit's right branch makes half of its output channels
        inferred["stage_channels"] = tuple(_rows(state_dict, n) * (2 if ".branch2." in n else 1) for n in widths)
    return {**inferred, **kwargs}

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    return _first_conv_channels(state_dict, "conv1.0.weight")
