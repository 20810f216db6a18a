"""The exported predictor: a trained model's predict function serialised with `jax.export` (StableHLO), loadable
without medjax (`predictor_loader.py`), with the input normalisation and, for volumes, the sliding window inside.

  fn, weights = predict_function(model.apply, variables, normalization=schemes, window=options)
  metadata = export_predictor("model/", model.apply, variables, input_shape=(28, 28, 1), ...)

An artefact folder holds `predict.jaxexport` (the function `fn(weights, images) -> outputs`), `weights.npz`
(its first argument, one array per leaf), `metadata.json` (`METADATA_KEYS`) and `load_predictor.py` (a copy
of `predictor_loader.py`); the loader's docstring is the user's manual. The batch is symbolic ("b": any size)
unless a fixed one is asked for; the spatial shape is fixed, because the sliding window's geometry (window
origins, padding) is worked out in Python from concrete sizes, and a U-Net's skip connections need sizes that
divide by its strides, which a symbolic size does not promise.

What the function computes is what the run's evaluation computes (`medjax.build.evaluation`):
  - images: `make_predict_fn(apply)` with `output` (softmax probabilities by default), and with `flips` the
    flip-TTA mean of the logits before the activation (`inference.flip_tta_apply`, as `eval_apply_fn`);
  - volumes (`window`: the keywords of `inference.sliding_window_inference` but the image, the function and
    the mesh): every example of the batch in turn (`lax.map`, so one volume's windows are in memory at a
    time, and the batch can stay symbolic) through the sliding window, each window's probabilities flip-TTA
    averaged, as `build.evaluation._window_predictor` and `medjax.tools.predict` do.
Before that the images are normalised channel by channel (`normalize`) as the run's dataset normalised them,
where that is an array operation on the image (`preprocessing_from_data_config`); what is not (reorienting,
cropping, resampling to the training spacing, a site's harmonisation) is listed in the metadata under
["normalization"]["before"] for the caller to do.

Numerics: the reloaded function gives the in-memory model's float32 outputs bit for bit on the same device: the
weights enter as arguments (predictor_loader.py says why), and the tests compare a reload in a fresh process with
`make_predict_fn` / `sliding_window_inference` after `normalize`. Against medjax's datasets, which normalise on the
host with numpy in float64 (`data.preprocess`), a per-volume z-score agrees to about 1e-6 relative, not bit for
bit. MedMNIST's scaling is the dataset's float32 formula, x * float32(2 / 255) - 1, equal to within 1.2e-7 (a
float32 ulp at 1): XLA may fuse the multiply and the add into one FMA, which rounds once instead of twice.

This module takes plain arguments (a model's `apply`, variables, dicts); the config is read by
`medjax.tools.export`, which decides them as `medjax.build` does.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export, lax

from medjax import atomic, inference, provenance
from medjax.data import preprocess
from medjax.compress import predictor_loader as loader
from medjax.typing import Array, PyTree

OUTPUTS = ("softmax", "sigmoid", "logits")
SCHEMES = ("none", "affine", "zscore", "ct", "window")
BATCH_SYMBOL = "b"
# The keys of metadata.json, in the order written.
METADATA_KEYS = ("format", "format_version", "task", "input", "output", "classes", "spacing_mm", "normalization",
                 "sliding_window", "flips", "model", "provenance", "jax_version", "platforms", "weights", "files",
                 "created_at")
# MedMNIST's images are (x / 255 - 0.5) / 0.5 of the uint8 pixels, computed in float32 as
# `medjax.data.datasets.medmnist` does: x * float32(2 / 255) - 1.
MEDMNIST_SCALE, MEDMNIST_OFFSET = float(np.float32(2.0 / 255.0)), -1.0
_VOLUME_DATASETS = ("msd", "image_folder", "nifti_folder")
_SYNTHETIC_DATASETS = ("synthetic_phantoms", "synthetic_lesions")
_ZSCORE_FLOOR = 1e-8  # the std floor of `data.preprocess.zscore` and `ct_normalize`


# ----------------------------------------------------------------------------------------- normalisation


def _volume_schemes(spec: inference.PreprocessSpec, num_channels: int) -> List[Dict[str, Any]]:
  schemes = []
  for channel, name in enumerate(spec.schemes(num_channels)):
    if name == "ct":
      if len(spec.intensity_stats) != num_channels:
        raise ValueError(f"preprocessing intensity_stats has {len(spec.intensity_stats)} channel(s), the model takes "
                         f"{num_channels}.")
      stats = spec.intensity_stats[channel]
      schemes.append({"scheme": "ct", **{k: float(stats[k]) for k in ("p005", "p995", "mean", "std")}})
    elif name in ("zscore", "none"):
      schemes.append({"scheme": name})
    else:  # a CT window by name
      center, width = preprocess.CT_WINDOWS[name]
      schemes.append({"scheme": "window", "name": name, "center": float(center), "width": float(width)})
  return schemes


class Preprocessing(NamedTuple):
  """How images reach the exported function: `inside` one scheme dict per channel (`normalize`), `before` the
  host-side steps the caller does, in words, and `spacing_mm` the voxel size the inputs are expected at (None
  when the run does not fix one)."""
  inside: List[Dict[str, Any]]
  before: List[str]
  spacing_mm: Optional[Tuple[float, ...]] = None


def preprocessing_from_data_config(data: Mapping[str, Any], num_channels: int, **overrides: Any) -> Preprocessing:
  """What of the run's input preprocessing goes inside the exported function, and what the caller does before.

  Args:
    data: the run's `config.data` (a dict; its "name" is the dataset).
    num_channels: the channels the model takes.
    overrides: for volume datasets, `inference.PreprocessSpec` fields replacing the config's (non-None ones),
      as `medjax.tools.predict --normalization` does.
  Returns:
    `Preprocessing`: schemes {"scheme": "none"}, {"scheme": "affine", "scale", "offset"} (MedMNIST),
    {"scheme": "zscore"}, {"scheme": "ct", "p005", "p995", "mean", "std"} or {"scheme": "window", "name",
    "center", "width"} (volume datasets, from `PreprocessSpec.from_data_config`), with the steps before.
  Raises ValueError as `PreprocessSpec.from_data_config` does (an "msd" run with no normalization set).
  """
  data = dict(data or {})
  name = data.get("name")
  if name == "medmnist":
    before = ["pass MedMNIST pixel values 0..255 (the uint8 images of the subset's .npz, at its size), as float32"]
    if data.get("channels") == 3:
      before.append("repeat a grayscale image to 3 channels (config.data.channels=3)")
    return Preprocessing([{"scheme": "affine", "scale": MEDMNIST_SCALE, "offset": MEDMNIST_OFFSET}] * num_channels,
                         before)
  if name in _VOLUME_DATASETS:
    spec = inference.PreprocessSpec.from_data_config(data, **overrides)
    before = ["reorient to RAS+ voxel order, spatial order (z, y, x) (medjax.data.io.to_canonical)"]
    if spec.crop_nonzero:
      before.append("crop to the bounding box of the nonzero voxels of any channel")
    if spec.target_spacing_mm is not None:
      before.append(f"resample to spacing_mm {list(spec.target_spacing_mm)} (z, y, x; spline order "
                    f"{spec.image_order}, nearest along a thick axis: medjax.data.preprocess.resample)")
    before.append("pad with 0 (or crop) to the exported input shape")
    return Preprocessing(_volume_schemes(spec, num_channels), before, spec.target_spacing_mm)
  if name == "sites":
    base = preprocessing_from_data_config(data.get("base") or {}, num_channels, **overrides)
    if data.get("harmonise"):
      base.before.append(f"harmonise the image with its site's fitted {data['harmonise']!r} normaliser (config.data."
                         "harmonise; fitted on that site's training images, not inside this function)")
    return base
  what = f"the {name} generator makes them (already in the network's units)" if name in _SYNTHETIC_DATASETS else (
      f"dataset {name!r} yields them (no normalisation is applied inside)")
  return Preprocessing([{"scheme": "none"}] * num_channels, [f"pass images as {what}"])


def _check_schemes(schemes: Sequence[Mapping[str, Any]], num_channels: int) -> None:
  if len(schemes) != num_channels:
    raise ValueError(f"normalization has {len(schemes)} scheme(s), the images have {num_channels} channel(s).")
  for channel, s in enumerate(schemes):
    if s.get("scheme") not in SCHEMES:
      raise ValueError(f"normalization channel {channel}: scheme {s.get('scheme')!r} is not one of {SCHEMES}.")


def normalize(images: Array, schemes: Sequence[Mapping[str, Any]]) -> Array:
  """`images` (B, *spatial, C) normalised channel by channel with `schemes` (one dict per channel, as
  `preprocessing_from_data_config` returns them), statistics per image; float32 (B, *spatial, C).

  "affine": x * scale + offset; "ct": clip to [p005, p995], minus mean, over max(std, 1e-8); "window":
  (clip(x, lo, lo + width) - lo) / width with lo = center - width / 2; "zscore": over the channel's nonzero
  voxels of each image (population std, floored at 1e-8), 0 elsewhere, as `medjax.data.preprocess.zscore`.
  """
  images = jnp.asarray(images, jnp.float32)
  _check_schemes(schemes, images.shape[-1])
  if all(s["scheme"] == "none" for s in schemes):
    return images
  axes = tuple(range(1, images.ndim - 1))
  f32 = jnp.float32
  channels = []
  for channel, s in enumerate(schemes):
    x = images[..., channel]
    kind = s["scheme"]
    if kind == "affine":
      x = x * f32(s["scale"]) + f32(s["offset"])
    elif kind == "ct":
      x = (jnp.clip(x, f32(s["p005"]), f32(s["p995"])) - f32(s["mean"])) / f32(max(s["std"], _ZSCORE_FLOOR))
    elif kind == "window":
      lo = s["center"] - s["width"] / 2.0
      x = (jnp.clip(x, f32(lo), f32(lo + s["width"])) - f32(lo)) / f32(s["width"])
    elif kind == "zscore":
      mask = x != 0
      count = jnp.maximum(jnp.sum(mask, axes, keepdims=True), 1).astype(f32)
      mean = jnp.sum(jnp.where(mask, x, 0), axes, keepdims=True) / count
      std = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(x - mean), 0), axes, keepdims=True) / count)
      x = jnp.where(mask, (x - mean) / jnp.maximum(std, f32(_ZSCORE_FLOOR)), 0)
    channels.append(x)
  return jnp.stack(channels, axis=-1)


# ----------------------------------------------------------------------------------------- the function


def _check_window(window: Mapping[str, Any]) -> Dict[str, Any]:
  accepted = set(inspect.signature(inference.sliding_window_inference).parameters) - {"predict_fn", "image", "mesh"}
  unknown = sorted(set(window) - accepted)
  if unknown:
    raise ValueError(f"sliding window: unknown option(s) {unknown}; accepted: {', '.join(sorted(accepted))}.")
  if not window.get("roi_size"):
    raise ValueError("sliding window: roi_size is needed.")
  return {**window, "roi_size": tuple(int(r) for r in window["roi_size"])}


def predict_function(apply_fn: Callable[..., Any], variables: PyTree, *,
                     normalization: Optional[Sequence[Mapping[str, Any]]] = None, output: str = "softmax",
                     flips: Optional[Sequence[Sequence[int]]] = None,
                     window: Optional[Mapping[str, Any]] = None) -> Tuple[Callable[[list, Array], Array], List[Any]]:
  """The function that gets exported, and its first argument.

  Args:
    apply_fn: a Flax model's `apply` (`(variables, x, train=False) -> (outputs, aux)` or outputs).
    variables: its variables ({"params": ..., "batch_stats": ...}).
    normalization: one scheme per channel (`normalize`), or None: the images are the network's input.
    output: "softmax" (probabilities), "sigmoid" (per-label probabilities) or "logits".
    flips: mirrorings to average over (`inference.flip_tta`: spatial axes, 0-based), as config.eval_flips.
    window: keywords of `inference.sliding_window_inference` (roi_size, overlap, mode, sigma_scale,
      window_batch, ...) for volumes predicted through a sliding window; None predicts whole images.
  Returns:
    (fn, weights): `fn(weights, images (B, *spatial, C)) -> float32 (B, K) or (B, *spatial, K)`, where
    `weights` is the list of the variables' leaves (`jax.tree_util` order), so they enter as arguments.
  """
  if output not in OUTPUTS:
    raise ValueError(f"export: output must be one of {OUTPUTS}, got {output!r}.")
  window = _check_window(window) if window is not None else None
  flips = tuple(tuple(int(a) for a in combo) for combo in flips) if flips else None
  weights, treedef = jax.tree_util.tree_flatten(variables)

  def fn(weights: list, images: Array) -> Array:
    variables = jax.tree_util.tree_unflatten(treedef, weights)
    x = normalize(images, normalization) if normalization else jnp.asarray(images, jnp.float32)
    if window is None:
      model = inference.flip_tta_apply(apply_fn, flips) if flips else apply_fn  # TTA of the logits, as evaluation
      return inference.make_predict_fn(model, variables, output)(x)
    per_window = inference.make_predict_fn(apply_fn, variables, output)
    if flips:
      per_window = inference.flip_tta(per_window, flips)
    return lax.map(lambda one: inference.sliding_window_inference(per_window, one[None], **window)[0], x)

  return fn, weights


def input_spec(input_shape: Sequence[int], batch: Optional[int] = None) -> jax.ShapeDtypeStruct:
  """float32 `(batch, *input_shape)` with `input_shape` = (*spatial, C); the batch symbolic ("b") when None."""
  if batch is not None and (isinstance(batch, bool) or int(batch) < 1):
    raise ValueError(f"export: batch must be a positive int or None (symbolic), got {batch!r}.")
  dims = jax_export.symbolic_shape(BATCH_SYMBOL) if batch is None else (int(batch),)
  return jax.ShapeDtypeStruct(tuple(dims) + tuple(int(s) for s in input_shape), jnp.float32)


def export_function(fn: Callable[[list, Array], Array], weights: Sequence[Any], input_shape: Sequence[int], *,
                    batch: Optional[int] = None, platforms: Optional[Sequence[str]] = None) -> jax_export.Exported:
  """`jax.export` of `jax.jit(fn)` for `weights` and float32 images `(batch, *input_shape)` (batch symbolic when
  None), lowered for `platforms` ("cpu", "cuda", "rocm", "tpu"; default: this process's backend)."""
  platforms = tuple(platforms) if platforms else (jax_export.default_export_platform(),)
  weight_specs = [jax.ShapeDtypeStruct(np.shape(w), jnp.result_type(w)) for w in weights]
  return jax_export.export(jax.jit(fn), platforms=platforms)(weight_specs, input_spec(input_shape, batch))


# ----------------------------------------------------------------------------------------- the artefact


def _shape(aval) -> List[Any]:
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def _weight_arrays(weights: Sequence[Any]) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """The npz entries and dtype names: leaves whose dtype numpy's format has no name for (bfloat16 and the other
  ml_dtypes) are stored as unsigned ints of their width, and the loader views them back."""
  arrays, dtypes = {}, []
  for i, w in enumerate(weights):
    a = np.ascontiguousarray(np.asarray(w))
    dtypes.append(str(a.dtype))
    if a.dtype.kind not in "biufc":
      a = a.view(np.dtype(f"u{a.dtype.itemsize}"))
    arrays[loader.weight_key(i)] = a
  return arrays, dtypes


def _axes(spatial_dims: int) -> List[str]:
  return ["z", "y", "x"][3 - spatial_dims:] if spatial_dims <= 3 else [f"s{i}" for i in range(spatial_dims)]


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"export folder {os.path.abspath(out_dir)} is a file.")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"export folder {os.path.abspath(out_dir)} exists and is not empty (overwrite=True, "
                          "--overwrite, replaces the export files in it).")


def export_predictor(out_dir: str, apply_fn: Callable[..., Any], variables: PyTree, *, input_shape: Sequence[int],
                     batch: Optional[int] = None, normalization: Optional[Sequence[Mapping[str, Any]]] = None,
                     before: Sequence[str] = (), output: str = "softmax",
                     flips: Optional[Sequence[Sequence[int]]] = None, window: Optional[Mapping[str, Any]] = None,
                     platforms: Optional[Sequence[str]] = None, task: Optional[str] = None,
                     class_names: Optional[Sequence[str]] = None, spacing_mm: Optional[Sequence[float]] = None,
                     model: Optional[Mapping[str, Any]] = None, workdir: Optional[str] = None,
                     overwrite: bool = False) -> Dict[str, Any]:
  """Writes the artefact folder `out_dir` (module docstring) and returns its metadata (also in metadata.json).

  Args:
    out_dir: the folder to write; created when missing. An existing non-empty folder is refused
      (FileExistsError naming it) unless `overwrite`, which replaces the export's files in it.
    apply_fn, variables, normalization, output, flips, window: as in `predict_function`.
    input_shape: the images' `(*spatial, C)`; spatial order (z, y, x) or (y, x).
    batch: a fixed batch size, or None for a symbolic one ("b").
    before: what the caller does to an image before calling (`preprocessing_from_data_config`).
    platforms: as in `export_function`.
    task, class_names, spacing_mm, model: described in the metadata as given ("classification" or
      "segmentation"; the class names; the (z, y, x) / (y, x) mm spacing the inputs are expected at; the model's
      name, checkpoint step and the like).
    workdir: the training run, whose env.json (`medjax.provenance`) gives the run's commit.
  Returns:
    the metadata dict: `METADATA_KEYS`; its "files" give the bytes of each file but metadata.json, whose own
    size the returned dict has under "metadata_bytes" (not in the file).
  """
  out_dir = os.fspath(out_dir)
  _check_out_dir(out_dir, overwrite)
  fn, weights = predict_function(apply_fn, variables, normalization=normalization, output=output, flips=flips,
                                 window=window)
  exported = export_function(fn, weights, input_shape, batch=batch, platforms=platforms)
  spatial_dims = len(input_shape) - 1
  in_shape, out_shape = _shape(exported.in_avals[-1]), _shape(exported.out_avals[0])
  arrays, dtypes = _weight_arrays(weights)
  os.makedirs(out_dir, exist_ok=True)
  atomic.write_atomically(os.path.join(out_dir, loader.PREDICT_FILE), lambda tmp: _write_bytes(tmp, exported))
  atomic.write_atomically(os.path.join(out_dir, loader.WEIGHTS_FILE), lambda tmp: np.savez(tmp, **arrays))
  with open(loader.__file__, encoding="utf-8") as f:  # the loader travels with the artefact
    atomic.write_text_atomically(os.path.join(out_dir, loader.LOADER_FILE), f.read())
  per_voxel = len(out_shape) == len(in_shape)
  run_env = provenance.read(workdir) if workdir else None
  metadata = {
      "format": loader.FORMAT,
      "format_version": loader.FORMAT_VERSION,
      "task": task,
      "input": {"shape": in_shape, "dtype": "float32", "layout": "channels_last",
                "axes": ["batch", *_axes(spatial_dims), "channel"], "spatial_order": _axes(spatial_dims),
                "batch": "symbolic: any size >= 1" if batch is None else f"fixed: {int(batch)}"},
      "output": {"shape": out_shape, "dtype": "float32", "kind": "logits" if output == "logits" else "probabilities",
                 "activation": None if output == "logits" else output,
                 "axes": ["batch", *(_axes(spatial_dims) if per_voxel else []), "class"]},
      "classes": list(class_names) if class_names is not None else None,
      "spacing_mm": [float(s) for s in spacing_mm] if spacing_mm is not None else None,
      "normalization": {"inside": [dict(s) for s in normalization] if normalization else [],
                        "before": list(before)},
      "sliding_window": {k: list(v) if isinstance(v, tuple) else v for k, v in _check_window(window).items()}
                        if window is not None else None,
      "flips": [list(f) for f in flips] if flips else None,
      "model": dict(model or {}),
      "provenance": {
          "run": {"workdir": os.path.abspath(workdir) if workdir else None,
                  "git_commit": (run_env or {}).get("git_commit"), "git_dirty": (run_env or {}).get("git_dirty")},
          "export": provenance.git_state()},
      "jax_version": jax.__version__,
      "platforms": list(exported.platforms),
      "weights": {"count": len(weights), "dtypes": dtypes,
                  "parameters": int(sum(np.size(w) for w in weights))},
      "files": {name: os.path.getsize(os.path.join(out_dir, name))
                for name in (loader.PREDICT_FILE, loader.WEIGHTS_FILE, loader.LOADER_FILE)},
      "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  path = atomic.write_text_atomically(os.path.join(out_dir, loader.METADATA_FILE),
                                      json.dumps(metadata, indent=2) + "\n")
  return {**metadata, "metadata_bytes": os.path.getsize(path)}


def _write_bytes(path: str, exported: jax_export.Exported) -> None:
  with open(path, "wb") as f:
    f.write(exported.serialize())
