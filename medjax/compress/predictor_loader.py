"""Loads a predictor exported by `python -m medjax.tools.export` with numpy and jax only: no medjax, no TensorFlow.

The export tool copies this file into every artefact folder as `load_predictor.py`, so a hospital or a
deployment needs nothing but the folder and `pip install jax` (a version that reads the export: the folder's
`metadata.json` names the one that wrote it under "jax_version"; newer ones read it too). The folder holds

  predict.jaxexport   the predict function, serialised with `jax.export` (StableHLO): images -> outputs, with
                      the intensity normalisation and, for volumes, the sliding window inside
  weights.npz         the network's weights, the function's first argument: one array per leaf, "w00000", ...
  metadata.json       input and output specs, class names, spacing, what the caller does before calling
                      (["normalization"]["before"]) and what the function does (["normalization"]["inside"]),
                      the commits of the run and of the export, the jax version, platforms, file sizes
  load_predictor.py   this file

Usage:

  import sys; sys.path.insert(0, "model")            # or copy load_predictor.py next to your script
  import load_predictor
  predictor = load_predictor.load("model")
  predictor.metadata["input"]["shape"]               # e.g. ["b", 28, 28, 1]: any batch size b
  probabilities = predictor.predict(images)          # float32 (b, 28, 28, 1) -> numpy float32 (b, K)

Input: channels last `(batch, *spatial, channels)`, spatial order (z, y, x) in 3D and (y, x) in 2D, cast to
float32 (integer pixel values are taken as they are, e.g. MedMNIST's 0..255 when the normalisation inside
expects them). A batch written "b" is symbolic: any size >= 1 works, each new size compiles once; a number is
fixed. Spatial sizes are fixed (a sliding window's geometry depends on them). Output: float32 as
metadata["output"] says (probabilities by default; (b, K) per image, or (b, *spatial, K) per voxel).

The weights are an argument of the function rather than constants inside it: XLA folds constant subexpressions
(an eval-mode batch norm's scale) at compile time with its own evaluator, which may change the last bits, while
with arguments the program is the one the in-memory model compiles, and the outputs agree exactly on one device.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

FORMAT = "medjax-export"
FORMAT_VERSION = 1
PREDICT_FILE = "predict.jaxexport"
WEIGHTS_FILE = "weights.npz"
METADATA_FILE = "metadata.json"
LOADER_FILE = "load_predictor.py"
# jax.export's platform names for the backends `jax.default_backend()` reports.
_PLATFORMS = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


def weight_key(index: int) -> str:
  """The name of the `index`-th weight array in weights.npz (leaf order of the function's first argument)."""
  return f"w{index:05d}"


class Predictor:
  """An exported predict function with its weights: `predict(images) -> np.ndarray` (module docstring).

  Attributes:
    metadata: the folder's metadata.json as a dict.
    input_shape: the input's shape, None where a dimension is symbolic (the batch "b"), e.g. (None, 28, 28, 1).
    platforms: the platforms the function was exported for ("cpu", "cuda", "rocm", "tpu").
  """

  def __init__(self, exported, weights, metadata: dict):
    self.metadata = metadata
    self.platforms = tuple(exported.platforms)
    self.input_shape = tuple(d if isinstance(d, int) else None for d in metadata["input"]["shape"])
    self._weights = weights
    self._call = jax.jit(exported.call)  # one compilation per input shape

  def check(self, images: np.ndarray) -> None:
    """Raises ValueError naming the expected shape when `images` does not fit the input spec."""
    want = self.input_shape
    fits = images.ndim == len(want) and all(w is None or w == s for w, s in zip(want, images.shape))
    if not fits or images.shape[0] < 1:
      shown = ", ".join("b" if w is None else str(w) for w in want)
      raise ValueError(f"predict: images of shape {images.shape}; this predictor takes ({shown}) float32, channels "
                       f"last, spatial order {tuple(self.metadata['input']['spatial_order'])}"
                       + (" (b: any batch size >= 1)." if want[0] is None else "."))

  def predict(self, images) -> np.ndarray:
    """Outputs for `images` (module docstring: shapes, dtype, layout), as a float32 numpy array on the host."""
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.number) or np.iscomplexobj(images):
      raise ValueError(f"predict: images must be real numbers, got dtype {images.dtype}.")
    images = images.astype(np.float32, copy=False)
    self.check(images)
    return np.asarray(self._call(self._weights, images))


def _read_weights(path: str, dtypes) -> list:
  """The weight arrays in leaf order on the default device. Leaves whose dtype the npz format has no name for
  (bfloat16 and the other ml_dtypes, which numpy knows once jax is imported) are stored as unsigned integers of
  their width and viewed back through the dtype names of metadata.json."""
  with np.load(path, allow_pickle=False) as npz:
    arrays = [npz[weight_key(i)] for i in range(len(dtypes))]
  return [jax.device_put(a if a.dtype == np.dtype(d) else a.view(np.dtype(d))) for a, d in zip(arrays, dtypes)]


def load(folder) -> Predictor:
  """The `Predictor` of an export folder. Raises FileNotFoundError naming a missing file, ValueError for a folder
  of another format or version, a truncated file (its size differs from metadata.json's), or a platform that
  the function was not exported for."""
  folder = os.fspath(folder)
  meta_path = os.path.join(folder, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path} not found: {folder} is no medjax export folder.")
  with open(meta_path, encoding="utf-8") as f:
    metadata = json.load(f)
  if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: format {metadata.get('format')!r} version {metadata.get('format_version')!r}; "
                     f"this loader reads {FORMAT!r} version {FORMAT_VERSION}.")
  for name, size in metadata["files"].items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found (listed in {meta_path}).")
    if os.path.getsize(path) != size:
      raise ValueError(f"{path} has {os.path.getsize(path)} bytes, {meta_path} says {size}: a truncated or "
                       "replaced file.")
  with open(os.path.join(folder, PREDICT_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  backend = jax.default_backend()
  here = _PLATFORMS.get(backend, (backend,))
  if not set(here) & set(exported.platforms):
    raise ValueError(f"{os.path.join(folder, PREDICT_FILE)} was exported for {tuple(exported.platforms)}; this "
                     f"process runs on {backend!r}. Export again with --platforms {here[0]}.")
  weights = _read_weights(os.path.join(folder, WEIGHTS_FILE), metadata["weights"]["dtypes"])
  return Predictor(exported, weights, metadata)
