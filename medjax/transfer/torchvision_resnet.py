"""torchvision ResNet (and timm ResNet, the same names) <-> medjax ResNet variables.

Names (torchvision -> medjax; `i` the stage 1..4, `j` the block 0..n-1, `k` 1..3):
  conv1.weight                          params/stem_conv/kernel
  bn1.{weight,bias}                     params/stem_norm/{scale,bias}
  bn1.{running_mean,running_var}        batch_stats/stem_norm/{mean,var}
  layer{i}.{j}.conv{k}.weight           params/stage{i}_block{j}/conv{k}/kernel
  layer{i}.{j}.bn{k}.*                  stage{i}_block{j}/norm{k}/* (as bn1)
  layer{i}.{j}.downsample.0.weight      params/stage{i}_block{j}/proj_conv/kernel
  layer{i}.{j}.downsample.1.*           stage{i}_block{j}/proj_norm/* (as bn1)
  fc.{weight,bias}                      params/head/{kernel,bias}
  *.num_batches_tracked                 ignored on import (medjax keeps no counter); exported as 0
Layouts: conv weights `(O, I, *k)` (OIHW) <-> kernels `(*k, I, O)` (HWIO); the linear weight `(out, in)` <->
`(in, out)`; everything else is copied unchanged.

Conventions checked against medjax's ResNet (`medjax.models.resnet`, `layers.make_norm`): batch norm
epsilon 1e-5 (`layers.NORM_EPSILON`) equals torch's default, and momentum 0.9 (Flax: weight of the old
running average) equals torch's momentum 0.1, so fine-tuning updates the imported running statistics as
torch would. Convolutions pad `k // 2` on both sides and the stem max-pool pads 1 like torch, so eval-mode
logits agree at any input size (tests/transfer check non-square inputs). torchvision's resnet152 is
`resnet101` with `model_kwargs={"stage_sizes": (3, 8, 36, 3)}`.

Inputs: medjax takes channels-last `(B, H, W, C)`, torch `(B, C, H, W)`; the weights are the same either way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping

import numpy as np

from medjax.transfer import mapping

_MODULE_NAMES = {"stem_conv": "conv1", "stem_norm": "bn1", "head": "fc", "proj_conv": "downsample.0",
                 "proj_norm": "downsample.1"}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)$")
_BLOCK_CHILD = re.compile(r"(conv|norm)(\d)$")
class TorchvisionResNet(mapping.TorchMapping):
  """torchvision.models.resnet{18,34,50,101,152}; timm's ResNets use the same names."""

  source = "torchvision"
  # ACS and 2.5D ResNets keep the 2D parameter tree (`medjax.models.acs`), so 2D weights load into them as they are.
  model_names = tuple(f"resnet{d}{kind}" for kind in ("", "_acs", "_2.5d") for d in (18, 34, 50, 101))

  def torch_key(self, path: mapping.Path) -> mapping.TorchKey:
    _, *modules, _ = path
    parts = []
    for module in modules:
      block, child = _BLOCK.match(module), _BLOCK_CHILD.match(module)
      if module in _MODULE_NAMES:
        parts.append(_MODULE_NAMES[module])
      elif block:
        parts.append(f"layer{block[1]}.{block[2]}")
      elif child:
        parts.append(("conv" if child[1] == "conv" else "bn") + child[2])
      else:
        raise ValueError(f"no torchvision name for the medjax variable {'/'.join(path)} (module {module!r})")
    return mapping.TorchKey(".".join(parts + [mapping.leaf_name(path)]))

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_kwargs)
    if "num_classes" not in kwargs and "fc.weight" in state_dict:
      kwargs["num_classes"] = int(np.shape(state_dict["fc.weight"])[0])
    return kwargs

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    conv1 = state_dict.get("conv1.weight")
    return int(conv1.shape[1]) if conv1 is not None and conv1.ndim >= 2 else 3


class TimmResNet(TorchvisionResNet):
  source = "timm"
