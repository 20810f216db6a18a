"""PyTorch state dicts <-> medjax variables for every supported (source, model): the public entry points.

    variables = transfer.from_torch(transfer.load_state_dict("resnet18.pth"), "resnet18")
    state_dict = transfer.to_torch(variables, "resnet18")      # torchvision's load_state_dict(strict=True)

`source` names whose layout the state dict follows ("torchvision", "timm", "monai"); `supported()` lists
every (source, model name) pair. One family module per source and family names the tensors
(`medjax.transfer.mapping.TorchMapping`); the conversion itself is `mapping.from_torch` / `mapping.to_torch`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from medjax.transfer import (mapping, monai_cnns, monai_transformers, torchvision_cnns, torchvision_mobile,
                             torchvision_resnet, vit_weights)

_FAMILIES: Tuple[mapping.TorchMapping, ...] = (
    torchvision_resnet.TorchvisionResNet(), torchvision_resnet.TimmResNet(),
    torchvision_mobile.TorchvisionEfficientNet(), torchvision_mobile.TorchvisionMobileNetV2(),
    torchvision_mobile.TorchvisionMobileNetV3Large(), torchvision_mobile.TorchvisionMobileNetV3Small(),
    vit_weights.TorchvisionViT(), vit_weights.TimmViT(),
    torchvision_cnns.TorchvisionVGG(), torchvision_cnns.TorchvisionDenseNet(), torchvision_cnns.TorchvisionGoogLeNet(),
    torchvision_cnns.TorchvisionShuffleNetV2(),
    # One instance per family serves every configuration: `bind` configures it from the model kwargs.
    monai_transformers.MonaiUNETR(), monai_transformers.MonaiSwinUNETR(), monai_cnns.MonaiDynUNet(),
    monai_cnns.MonaiDenseNet121(),
)
_BY_KEY: Dict[Tuple[str, str], mapping.TorchMapping] = {
    (family.source, name): family for family in _FAMILIES for name in family.model_names}


def supported() -> List[Tuple[str, str]]:
  """Every (source, medjax model name) pair with a mapping, sorted."""
  return sorted(_BY_KEY)


def family(model_name: str, source: str = "torchvision") -> mapping.TorchMapping:
  """The mapping of `model_name`'s weights in `source`'s layout; ValueError listing the pairs there are."""
  try:
    return _BY_KEY[source, model_name]
  except KeyError:
    pairs = ", ".join(f"{s}:{m}" for s, m in supported())
    raise ValueError(f"no {source} weight mapping for the medjax model {model_name!r}; supported (source:model): "
                     f"{pairs}") from None


def from_torch(state_dict: Mapping[str, Any], model_name: str, model_kwargs: Optional[Mapping[str, Any]] = None,
               *, source: str = "torchvision") -> Dict[str, Any]:
  """Converts a PyTorch state dict into the variables of the medjax model `model_name`.

  state_dict: `{torch name: array}` (numpy arrays or anything `np.asarray` takes, e.g. CPU tensors).
  model_name: a registered medjax model with a `source` mapping (`supported()`).
  model_kwargs: the model's fields (as `config.model`); a family fills what the state dict fixes (e.g.
    `num_classes` from the classifier's rows, the input channels from the first convolution).
  Returns `{"params": ..., "batch_stats": ...}` (only the collections the model has), nested dicts of numpy
  arrays in the model's parameter dtype. Buffers medjax keeps no counterpart of (`num_batches_tracked`, ...)
  are ignored.

  Raises:
    WeightMismatchError (a ValueError): one error listing every missing, unexpected and mis-shaped tensor.
    ValueError: `model_name` has no `source` mapping.
  """
  return mapping.from_torch(family(model_name, source), state_dict, model_name, model_kwargs)


def to_torch(variables: Mapping[str, Any], model_name: str, model_kwargs: Optional[Mapping[str, Any]] = None, *,
             source: str = "torchvision") -> Dict[str, np.ndarray]:
  """Converts medjax variables (`{"params": ..., "batch_stats": ...}`) into a `source` state dict
  `{torch name: np.ndarray}` that the PyTorch model's strict `load_state_dict` accepts (buffers medjax does not
  keep are written with their initial values, e.g. `num_batches_tracked` = 0). `from_torch` inverts it exactly.
  model_kwargs: the model's fields where the names depend on them (MONAI DynUNet's spatial_dims, features and
    strides, SwinUNETR's spatial_dims and window_size, VGG's stage_sizes and batch_norm; the model's defaults
    where absent); else unused.

  Raises ValueError: `model_name` has no `source` mapping, or a variable has no torch name (e.g. a ResNet
  built with `norm="group"`).
  """
  return mapping.to_torch(family(model_name, source), variables, model_name, model_kwargs)
