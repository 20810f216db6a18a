"""Weight transfer: reading weight files from local paths and converting foreign state dicts to and from
medjax variables. Imports medjax.models and numpy only (never training, build, checkpoint or tools), and
models never import it (.importlinter).

  files               load_state_dict / save_state_dict (.safetensors, .npz; .pt/.pth with torch).
  convert             from_torch / to_torch for every supported (source, model) pair; `supported()`.
  mapping             the one converter (layouts, fused tensors, the mismatch error); families name tensors.
  torchvision_resnet  torchvision/timm ResNet-18/34/50/101(/152) names.
"""

from __future__ import annotations

from medjax.transfer.convert import family, from_torch, supported, to_torch
from medjax.transfer.files import WeightFileError, load_state_dict, save_state_dict
from medjax.transfer.mapping import WeightMismatchError

__all__ = ["WeightFileError", "WeightMismatchError", "family", "from_torch", "load_state_dict", "save_state_dict",
           "supported", "to_torch"]
