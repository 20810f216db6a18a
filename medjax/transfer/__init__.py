"""Weight transfer: reading weight files from local paths and converting foreign state dicts to and from
medjax variables. Imports medjax.models and numpy only (never training, build, checkpoint or tools), and
models never import it (.importlinter).

  files               load_state_dict / save_state_dict (.safetensors, .npz; .pt/.pth with torch).
  torchvision_resnet  torchvision ResNet-18/34/50/101(/152) <-> medjax ResNet variables.
"""

from __future__ import annotations

from medjax.transfer.files import WeightFileError, load_state_dict, save_state_dict
from medjax.transfer.torchvision_resnet import WeightMismatchError, export_torchvision, import_torchvision

__all__ = ["WeightFileError", "WeightMismatchError", "export_torchvision", "import_torchvision",
           "load_state_dict", "save_state_dict"]
