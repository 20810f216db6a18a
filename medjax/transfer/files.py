"""Reading and writing weight files (state dicts: flat `{name: array}`) from local paths; nothing is downloaded.

Formats, chosen by the file suffix:
  .safetensors  read and written with `safetensors.numpy` (no torch needed).
  .npz          numpy's zip of arrays (`np.load(allow_pickle=False)`, so no code runs on load).
  .pt / .pth    PyTorch pickles, read with `torch.load(weights_only=True, map_location="cpu")`; needs torch.

Every error a user can cause (missing file, unknown suffix, corrupt or non-state-dict content, torch absent)
names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Union

import numpy as np

PathLike = Union[str, os.PathLike]
SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")
_TORCH_HINT = "pip install torch"


class WeightFileError(ValueError):
  """A weight file that exists but cannot be read as a state dict (unknown suffix, corrupt, wrong content)."""


def _suffix(path: Path) -> str:
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise WeightFileError(f"{path}: unknown weight file suffix {path.suffix!r}; expected one of {list(SUFFIXES)}")
  return suffix


def _import_torch(path: Path, action: str):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path}: {action} a PyTorch weight file needs torch, which is not installed "
                      f"(`{_TORCH_HINT}`), or convert it to .safetensors") from e
  return torch


def _torch_to_numpy(torch, path: Path, name: str, value) -> np.ndarray:
  if not isinstance(value, torch.Tensor):
    raise WeightFileError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; expected a flat "
                          "state dict {name: tensor} (e.g. checkpoint['state_dict'] saved on its own)")
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
    value = value.float()
  return value.numpy()


def load_state_dict(path: PathLike) -> Dict[str, np.ndarray]:
  """Reads the state dict in the local file `path` (.safetensors, .npz, .pt or .pth) as `{name: np.ndarray}`
  with the stored shapes and dtypes (bfloat16 from .pt becomes float32).

  Raises:
    FileNotFoundError: `path` does not exist.
    WeightFileError (a ValueError): unknown suffix, or the file is corrupt or not a flat state dict.
    ImportError: a .pt/.pth file and torch is not installed (the message says `pip install torch`).
  """
  path = Path(path)
  suffix = _suffix(path)
  if not path.is_file():
    raise FileNotFoundError(f"weight file not found: {path}")
  if suffix in (".pt", ".pth"):
    torch = _import_torch(path, "reading")
    try:
      loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
      raise WeightFileError(f"{path}: cannot read the PyTorch weight file: {type(e).__name__}: {e}") from e
    if not isinstance(loaded, Mapping):
      raise WeightFileError(f"{path}: holds a {type(loaded).__name__}, not a state dict {{name: tensor}}")
    return {str(k): _torch_to_numpy(torch, path, str(k), v) for k, v in loaded.items()}
  try:
    if suffix == ".safetensors":
      from safetensors.numpy import load_file
      return dict(load_file(str(path)))
    with np.load(path, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except Exception as e:  # safetensors raises SafetensorError, numpy BadZipFile / ValueError / OSError
    raise WeightFileError(f"{path}: cannot read the {suffix} weight file: {type(e).__name__}: {e}") from e


def save_state_dict(path: PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes `state_dict` ({name: array}) to `path`, in the format its suffix names (.pt/.pth need torch).
  Parent directories must exist."""
  path = Path(path)
  suffix = _suffix(path)
  # np.asarray(order="C"), not np.ascontiguousarray, which turns 0-d arrays (num_batches_tracked) into 1-d.
  arrays = {name: np.asarray(value, order="C") for name, value in state_dict.items()}
  if suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file(arrays, str(path))
  elif suffix == ".npz":
    # np.savez appends ".npz" to a name without it; `path` always has it here, so the name is kept.
    np.savez(path, **arrays)
  else:
    torch = _import_torch(path, "writing")
    torch.save({name: torch.from_numpy(value) for name, value in arrays.items()}, path)
