"""torchvision EfficientNet B0-B3, MobileNetV2 and MobileNetV3 Small / Large <-> medjax variables
(`medjax.models.efficientnet`, `medjax.models.mobilenet`, blocks in `medjax.models.mobile_blocks`).

Names (torchvision -> medjax). `CNA` is torchvision's `Conv2dNormActivation` (`.0` conv, `.1` batch norm) and
stands for the medjax `ConvNormAct` (`conv`, `norm`): `P.0.weight` <- `P'/conv/kernel`, `P.1.{weight,bias}` <-
`P'/norm/{scale,bias}`, `P.1.{running_mean,running_var}` <- `batch_stats/P'/norm/{mean,var}`.

  EfficientNet (`i` the stage 1..7, `j` its block 0..n-1; `e` = 1 where the block has an expand conv, i.e.
  every stage but the first, whose expand ratio is 1; `L` = 8):
    features.0 (CNA)                    stem
    features.{i}.{j}.block.0 (CNA)      stage{i}_block{j}/expand                 (only where e = 1)
    features.{i}.{j}.block.{e} (CNA)    stage{i}_block{j}/depthwise
    features.{i}.{j}.block.{e+1}.fc1/fc2.{weight,bias}
                                        stage{i}_block{j}/se/fc1/fc2/{kernel,bias}
    features.{i}.{j}.block.{e+2} (CNA)  stage{i}_block{j}/project
    features.{L} (CNA)                  head_conv
    classifier.1.{weight,bias}          classifier/{kernel,bias}                 (classifier.0 is the dropout)
  MobileNetV2 (`n` = 1..17 the block counted over all stages: stage i block j is n = 1 + blocks before it;
  `e` = 1 but in stage 1, expand ratio 1):
    features.0 (CNA)                    stem
    features.{n}.conv.0 (CNA)           stage{i}_block{j}/expand                 (only where e = 1)
    features.{n}.conv.{e} (CNA)         stage{i}_block{j}/depthwise
    features.{n}.conv.{e+1}.weight      stage{i}_block{j}/project/conv/kernel    (a bare conv ...
    features.{n}.conv.{e+2}.*           stage{i}_block{j}/project/norm/*          ... and batch norm)
    features.18 (CNA)                   head_conv
    classifier.1.{weight,bias}          classifier/{kernel,bias}
  MobileNetV3 (`b` the block 0..14 large / 0..10 small; `e` = 0 for block 0, whose expanded width equals its
  input, else 1; `s` = 1 where the block has squeeze-excitation; `L` = 16 large / 12 small):
    features.0 (CNA)                    stem
    features.{b+1}.block.0 (CNA)        block{b}/expand                          (only where e = 1)
    features.{b+1}.block.{e} (CNA)      block{b}/depthwise
    features.{b+1}.block.{e+1}.fc1/fc2  block{b}/se/fc1/fc2                      (only where s = 1)
    features.{b+1}.block.{e+1+s} (CNA)  block{b}/project
    features.{L} (CNA)                  head_conv
    classifier.0.{weight,bias}          classifier_hidden/{kernel,bias}
    classifier.3.{weight,bias}          classifier/{kernel,bias}                 (.1 hard-swish, .2 dropout)
  *.num_batches_tracked                 ignored on import (medjax keeps no counter); exported as 0
Layouts: conv weights `(O, I, kh, kw)` <-> kernels `(kh, kw, I, O)` (a depthwise conv: `(C, 1, kh, kw)` <->
`(kh, kw, 1, C)`, Flax's grouped layout); linear weights `(out, in)` <-> `(in, out)`; torchvision's
squeeze-excitation layers are 1x1 convs with bias, `(out, in, 1, 1)` <-> the medjax Dense kernels `(in, out)`
(`SE_DENSE`); everything else is copied.

Conventions checked against the medjax models (the tests compare eval-mode logits at a non-square, odd input):
  - padding: torchvision pads `(k - 1) // 2` on both sides, stride 2 included; medjax pads `k // 2`
    symmetrically (`layers.conv`), the same for the odd kernels (3, 5) used here, so odd sizes agree.
  - batch norm: torchvision's EfficientNet B0-B4 and MobileNetV2 use PyTorch's defaults (eps 1e-5, momentum
    0.1), as medjax (`layers.NORM_EPSILON`, Flax momentum 0.9). eps 1e-3 / momentum 0.01 is torchvision's
    setting for EfficientNet B5-B7 and V2 only, which medjax does not build. MobileNetV3 uses eps 1e-3 and
    momentum 0.01 in both (`mobilenet.V3_NORM`, Flax momentum 0.99).
  - activations: hard-sigmoid relu6(x + 3) / 6 and hard-swish x * hard-sigmoid(x) in both (PyTorch's
    Hardsigmoid / Hardswish, jax.nn's hard_sigmoid / hard_swish); EfficientNet uses SiLU, MobileNetV2 ReLU6.
  - squeeze-excitation widths: EfficientNet `max(1, C_in // 4)` of the block input, MobileNetV3
    `make_divisible(expanded // 4)`, both as torchvision; ReLU (MobileNetV3) / SiLU (EfficientNet) between the
    layers and a hard-sigmoid / sigmoid gate.
  - channel rounding (`make_divisible`), MobileNetV2's `round(C_in * expand)` hidden width, the head widths
    and the residual condition (stride 1 and equal widths) are torchvision's.
  - stochastic depth (EfficientNet, torchvision's "row" mode and linear schedule) and dropout (before the
    classifier; inside it, after the hard-swish, in MobileNetV3) act only when training; eval is unaffected.
Limits: torchvision's models are 2D; `width_mult` may be passed in `model_kwargs` (the tables above hold at
any width for EfficientNet and MobileNetV2). For MobileNetV3 they assume that every block after the first has
an expand conv, true unless `width_mult` is so small (0.13 and below) that a block's expanded width rounds to
its input width; `from_torch` refuses such widths (ValueError), and `to_torch`, which is not told the width,
would write names that torchvision's strict `load_state_dict` rejects, never silently wrong weights.

Inputs: medjax takes channels-last `(B, H, W, C)`, torch `(B, C, H, W)`; the weights are the same either way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from medjax.models import efficientnet, mobile_blocks, mobilenet
from medjax.transfer import mapping

# A Dense kernel (in, out) stored as torchvision's 1x1 conv weight (out, in, 1, 1) (squeeze-excitation).
SE_DENSE = mapping.Layout("se_dense", lambda t, shape: t[:, :, 0, 0].T, lambda x: x.T[:, :, None, None],
                          lambda s: (s[1], s[0], 1, 1))
# medjax ConvNormAct submodule -> torchvision Conv2dNormActivation index.
_CNA = {"conv": "0", "norm": "1"}
_STAGE_BLOCK = re.compile(r"stage(\d+)_block(\d+)$")
_BLOCK = re.compile(r"block(\d+)$")


def _unknown(path: mapping.Path) -> ValueError:
  return ValueError(f"no torchvision name for the medjax variable {'/'.join(path)}")


def _join(path: mapping.Path, parts: List[str], rest: Sequence[str], children: Mapping[str, str]) -> mapping.TorchKey:
  """The torch name `parts + [children[rest...]] + leaf` of `path`, whose modules after `parts` are `rest`
  (exactly one of `children`, or none); SE_DENSE for the squeeze-excitation kernels."""
  if len(rest) != 1 or rest[0] not in children:
    raise _unknown(path)
  layout = SE_DENSE if rest[0] in ("fc1", "fc2") and path[-1] == "kernel" else None
  return mapping.TorchKey(".".join(parts + [children[rest[0]], mapping.leaf_name(path)]), layout)


def _block_key(path: mapping.Path, prefix: str, rest: Sequence[str], expand: bool, se: bool) -> mapping.TorchKey:
  """An inverted-residual block whose torch `nn.Sequential` (`prefix`) holds, in order, the expand conv (if
  `expand`), the depthwise conv, the squeeze-excitation (if `se`) and the projection, each a
  Conv2dNormActivation but the SE layer (fc1, fc2)."""
  order = (["expand"] if expand else []) + ["depthwise"] + (["se"] if se else []) + ["project"]
  if not rest or rest[0] not in order:
    raise _unknown(path)
  index = str(order.index(rest[0]))
  children = {"fc1": "fc1", "fc2": "fc2"} if rest[0] == "se" else _CNA
  return _join(path, [prefix, index], rest[1:], children)


def _v3_blocks_expand(arch: str, width_mult: float) -> bool:
  """Whether MobileNetV3 `arch` at `width_mult` has an expand conv in every block but the first (as at width 1)."""
  width = lambda c: mobile_blocks.make_divisible(c * width_mult)
  c_in = width(16)
  for i, (_, expanded, c_out, *_) in enumerate(mobilenet.V3_BLOCKS[arch]):
    if (width(expanded) != c_in) != (i > 0):
      return False
    c_in = width(c_out)
  return True


class _TorchvisionMobile(mapping.TorchMapping):
  """What the three families share: the stem is `features.0`, the first conv fixes the input channels, the
  last linear layer (`_classifier`) the classes."""

  source = "torchvision"
  _classifier = "classifier.1"

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    weight = state_dict.get(f"{self._classifier}.weight")
    if "num_classes" not in kwargs and weight is not None:
      kwargs["num_classes"] = int(np.shape(weight)[0])
    return kwargs

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    stem = state_dict.get("features.0.0.weight")
    return int(stem.shape[1]) if stem is not None and stem.ndim >= 2 else 3


class TorchvisionEfficientNet(_TorchvisionMobile):
  """torchvision.models.efficientnet_b{0,1,2,3} (B4-B7 and V2 are not built by medjax)."""

  model_names = ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, _ = path
    head = f"features.{len(efficientnet.STAGES) + 1}"
    top = {"stem": ("features.0", _CNA), "head_conv": (head, _CNA), "classifier": ("classifier.1", None)}
    if modules and modules[0] in top:
      prefix, children = top[modules[0]]
      if children is None:
        if len(modules) != 1:
          raise _unknown(path)
        return mapping.TorchKey(f"{prefix}.{mapping.leaf_name(path)}")
      return _join(path, [prefix], modules[1:], children)
    block = _STAGE_BLOCK.match(modules[0]) if modules else None
    if not block or not 1 <= int(block[1]) <= len(efficientnet.STAGES):
      raise _unknown(path)
    stage = int(block[1])
    # Stage 1's expand ratio is 1: its expanded width equals the input width at any width_mult, so no expand conv.
    expand = efficientnet.STAGES[stage - 1][0] != 1
    return _block_key(path, f"features.{stage}.{block[2]}.block", modules[1:], expand, se=True)


class TorchvisionMobileNetV2(_TorchvisionMobile):
  """torchvision.models.mobilenet_v2 (any `width_mult`)."""

  model_names = ("mobilenet_v2",)

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, _ = path
    head = f"features.{sum(s[2] for s in mobilenet.V2_STAGES) + 1}"
    if modules and modules[0] in ("stem", "head_conv"):
      return _join(path, ["features.0" if modules[0] == "stem" else head], modules[1:], _CNA)
    if modules == ["classifier"]:
      return mapping.TorchKey(f"classifier.1.{mapping.leaf_name(path)}")
    block = _STAGE_BLOCK.match(modules[0]) if modules else None
    stages = mobilenet.V2_STAGES
    if not block or not 1 <= int(block[1]) <= len(stages) or int(block[2]) >= stages[int(block[1]) - 1][2]:
      raise _unknown(path)
    stage, index = int(block[1]), int(block[2])
    n = 1 + sum(s[2] for s in stages[:stage - 1]) + index
    e = int(stages[stage - 1][0] != 1)  # round(C_in * 1) == C_in: no expand conv at expand ratio 1
    rest = modules[1:]
    if rest and rest[0] == "project":
      # torchvision's projection is a bare conv and a batch norm, two entries of the block's Sequential.
      return _join(path, [f"features.{n}.conv"], rest[1:], {"conv": str(e + 1), "norm": str(e + 2)})
    return _block_key(path, f"features.{n}.conv", rest, expand=bool(e), se=False)


class TorchvisionMobileNetV3(_TorchvisionMobile):
  """torchvision.models.mobilenet_v3_{large,small}: one subclass per `arch`, since the blocks with
  squeeze-excitation (and so the torch indices) differ."""

  arch = "large"
  _classifier = "classifier.3"

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = super().model_kwargs(state_dict, model_kwargs)
    width_mult = kwargs.get("width_mult", 1.0)
    if not _v3_blocks_expand(self.arch, width_mult):
      raise ValueError(f"mobilenet_v3_{self.arch} at width_mult={width_mult}: a block after the first keeps its "
                       "input width (no expand conv), which this torchvision name table does not cover")
    return kwargs

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, _ = path
    blocks = mobilenet.V3_BLOCKS[self.arch]
    top = {"stem": "features.0", "head_conv": f"features.{len(blocks) + 1}"}
    if modules and modules[0] in top:
      return _join(path, [top[modules[0]]], modules[1:], _CNA)
    linear = {"classifier_hidden": "classifier.0", "classifier": "classifier.3"}
    if len(modules) == 1 and modules[0] in linear:
      return mapping.TorchKey(f"{linear[modules[0]]}.{mapping.leaf_name(path)}")
    block = _BLOCK.match(modules[0]) if modules else None
    if not block or int(block[1]) >= len(blocks):
      raise _unknown(path)
    b = int(block[1])
    # Block 0 expands the 16-channel stem to 16 (no expand conv); every later block widens (see Limits above).
    return _block_key(path, f"features.{b + 1}.block", modules[1:], expand=b > 0, se=blocks[b][3])


class TorchvisionMobileNetV3Large(TorchvisionMobileNetV3):
  model_names = ("mobilenet_v3_large",)
  arch = "large"


class TorchvisionMobileNetV3Small(TorchvisionMobileNetV3):
  model_names = ("mobilenet_v3_small",)
  arch = "small"
