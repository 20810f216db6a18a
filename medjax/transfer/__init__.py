"""Weight transfer: reading weight files from local paths and converting foreign state dicts to and from
medjax variables. Imports medjax.models and numpy only (never training, build, checkpoint or tools), and
models never import it (.importlinter).

  files               load_state_dict / save_state_dict (.safetensors, .npz; .pt/.pth with torch).
  convert             from_torch / to_torch for every supported (source, model) pair; `supported()`.
  mapping             the one converter (layouts, fused tensors, the mismatch error); families name tensors.
  torchvision_resnet  torchvision/timm ResNet-18/34/50/101(/152) names (also into the ACS / 2.5D ResNets).
  torchvision_mobile  torchvision EfficientNet B0-B3, MobileNetV2, MobileNetV3 small/large names.
  torchvision_cnns    torchvision VGG-11/16 (+BN), DenseNet, GoogLeNet, ShuffleNetV2 names.
  vit_weights         torchvision and timm ViT names.
  monai_transformers  MONAI UNETR and SwinUNETR names (shared MONAI helpers: monai_common).
  monai_cnns          MONAI DynUNet (as medjax "unet") and DenseNet121 names.
  adapt               2D -> 3D inflation, input-channel adaptation of pretrained kernels.
  partial             merge pretrained variables into a fresh model, with a LoadReport by path.
"""

from __future__ import annotations

from medjax.transfer.adapt import INFLATE_MODES, adapt_input_channels, inflate_kernel
from medjax.transfer.convert import family, from_torch, supported, to_torch
from medjax.transfer.files import SUFFIXES, WeightFileError, load_state_dict, save_state_dict
from medjax.transfer.mapping import WeightMismatchError, flatten, unflatten
from medjax.transfer.partial import LoadReport, merge

__all__ = ["INFLATE_MODES", "SUFFIXES", "LoadReport", "WeightFileError", "WeightMismatchError", "adapt_input_channels",
           "family", "flatten", "from_torch", "inflate_kernel", "load_state_dict", "merge", "save_state_dict",
           "supported", "to_torch", "unflatten"]
