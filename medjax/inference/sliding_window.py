"""Sliding-window prediction over 2D and 3D images with Gaussian blending, compiled as one program.

A network trained on patches of size `roi_size` is applied to a whole image by tiling it with overlapping
windows and averaging the window predictions, each weighted by an importance map that trusts window
centres more than window borders (a network sees less context near a patch border). Per axis the window
starts lie on a regular grid with step `round(roi * (1 - overlap))`, plus one window flush with the far
border; axes shorter than the window are padded to it and the result is cropped back.

Everything after the Python-side geometry (window origins are static: they depend only on shapes) runs in
one `jax.jit` program: a `lax.scan` over batches of `window_batch` windows gathers each batch with
`lax.dynamic_slice` under `vmap`, runs the network once on the batch, and adds the weighted predictions
into an output buffer with `lax.dynamic_update_slice`; a weight buffer accumulates the importance map the
same way, and the output is their ratio. With a `mesh`, each window batch is split over the mesh's data
axis, so the devices share the windows.

`predict_fn` maps windows `(n, *roi, C)` to `(n, *roi, K)`. Pass a `jax.tree_util.Partial` that carries the
network weights as its arguments (`tta.make_predict_fn` builds one) so the weights enter the compiled
program as arguments, not as constants, and the compiled program is reused across calls.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax.sharding import DATA_AXIS
from medjax.typing import Array

BLEND_MODES = ("gaussian", "constant")
PAD_MODES = ("constant", "edge", "reflect", "symmetric")
# Floor of the importance map relative to its peak: keeps every weight positive where a narrow Gaussian
# would underflow float32 in window corners (exp(-50)^3 at sigma_scale 0.05), so the final division never
# meets 0/0. nnU-Net guards the same division by replacing the zeros of its map with the smallest nonzero
# value (Isensee et al., Nature Methods 18:203-211, 2021; nnU-Net v2 `compute_gaussian`).
MIN_IMPORTANCE = 1e-6


def _axis_profiles(roi_size: Sequence[int], sigma_scale: float) -> List[np.ndarray]:
  """Per-axis Gaussian profiles (float64), each with peak 1, centred exactly between the middle voxels."""
  profiles = []
  for r in roi_size:
    offsets = np.arange(r, dtype=np.float64) - (r - 1) / 2.0  # symmetric for even and odd r
    profile = np.exp(-0.5 * (offsets / (sigma_scale * r)) ** 2)
    profiles.append(profile / profile.max())
  return profiles


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
  """Separable Gaussian weights of shape `roi_size`, float32, peak 1 at the centre, floored at MIN_IMPORTANCE.

  Axis `a` uses sigma = `sigma_scale * roi_size[a]` voxels (1/8 of the window as in nnU-Net, Isensee et al.
  2021). The centre is `(roi - 1) / 2`, so the map equals its own flip along every axis.
  """
  roi_size = _check_roi(roi_size, len(tuple(roi_size)))
  _check_sigma(sigma_scale)
  weights = functools.reduce(np.multiply.outer, _axis_profiles(roi_size, sigma_scale))
  return np.maximum(weights, MIN_IMPORTANCE).astype(np.float32)


def _importance_on_device(roi_size: Tuple[int, ...], mode: str, sigma_scale: float) -> Array:
  """The blending map inside the compiled program, built from 1-D profiles so no roi-sized constant is embedded."""
  if mode == "constant":
    return jnp.ones(roi_size, jnp.float32)
  nd = len(roi_size)
  weights = jnp.ones((1,) * nd, jnp.float32)
  for axis, profile in enumerate(_axis_profiles(roi_size, sigma_scale)):
    shape = [1] * nd
    shape[axis] = roi_size[axis]
    weights = weights * jnp.asarray(profile, jnp.float32).reshape(shape)
  return jnp.maximum(weights, MIN_IMPORTANCE)


def window_starts(size: int, roi: int, overlap: float) -> Tuple[int, ...]:
  """Starts of the windows along one axis of length `size >= roi`: 0, step, 2*step, ... and `size - roi`.

  step = max(1, round(roi * (1 - overlap))); the last window is flush with the border, so consecutive
  windows overlap by at least `overlap * roi` voxels.
  """
  if size < roi:
    raise ValueError(f"window_starts: axis of {size} voxels is shorter than the window ({roi}); pad it first.")
  step = max(1, int(round(roi * (1.0 - overlap))))
  starts = list(range(0, size - roi + 1, step))
  if starts[-1] != size - roi:
    starts.append(size - roi)
  return tuple(starts)


def window_origins(spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> List[Tuple[int, ...]]:
  """All window origins (one int per spatial axis) for a padded image of `spatial_shape`, in raster order."""
  per_axis = [window_starts(int(s), int(r), overlap) for s, r in zip(spatial_shape, roi_size)]
  return list(itertools.product(*per_axis))


def _check_roi(roi_size: Sequence[int], nd: int) -> Tuple[int, ...]:
  roi = tuple(int(r) for r in roi_size)
  if len(roi) != nd or any(r < 1 for r in roi):
    raise ValueError(f"roi_size={tuple(roi_size)} must be {nd} positive ints, one per spatial axis.")
  return roi


def _check_sigma(sigma_scale: float) -> None:
  if not sigma_scale > 0:
    raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}.")


def _padding(spatial: Sequence[int], roi: Sequence[int]) -> List[Tuple[int, int]]:
  """Centres an axis shorter than the window inside it: (before, after) voxels per spatial axis."""
  return [((r - s) // 2, r - s - (r - s) // 2) if s < r else (0, 0) for s, r in zip(spatial, roi)]


def _run(predict_fn: Callable, image: Array, *, roi_size: Tuple[int, ...], overlap: float, mode: str,
         sigma_scale: float, window_batch: int, num_classes: Optional[int], pad_mode: str, pad_value: float,
         mesh: Optional[Mesh]) -> Array:
  """The traced body of `sliding_window_inference` (arguments already validated)."""
  batch, spatial, channels = image.shape[0], tuple(image.shape[1:-1]), image.shape[-1]
  nd = len(spatial)
  pads = _padding(spatial, roi_size)
  if any(p != (0, 0) for p in pads):
    extra = {"constant_values": pad_value} if pad_mode == "constant" else {}
    image = jnp.pad(image, [(0, 0)] + pads + [(0, 0)], mode=pad_mode, **extra)
  padded = tuple(image.shape[1:-1])

  starts = window_origins(padded, roi_size, overlap)
  jobs = [(b,) + s for b in range(batch) for s in starts]  # every (example, window) pair
  data_size = mesh.shape[DATA_AXIS] if mesh is not None else 1
  # No wider than the work needs (a small image is one call), but still a multiple of the data axis.
  window_batch = min(window_batch, data_size * math.ceil(len(jobs) / data_size))
  num_steps = math.ceil(len(jobs) / window_batch)
  filler = num_steps * window_batch - len(jobs)
  valid = np.concatenate([np.ones(len(jobs), np.float32), np.zeros(filler, np.float32)])
  origins = np.asarray(jobs + [jobs[-1]] * filler, np.int32).reshape(num_steps, window_batch, nd + 1)
  valid = valid.reshape(num_steps, window_batch)

  window_shape = (window_batch,) + roi_size + (channels,)
  out_shape = jax.eval_shape(predict_fn, jax.ShapeDtypeStruct(window_shape, image.dtype))
  if (not hasattr(out_shape, "shape") or len(out_shape.shape) != nd + 2
      or tuple(out_shape.shape[:-1]) != window_shape[:-1]):
    got = getattr(out_shape, "shape", type(out_shape).__name__)
    raise ValueError(f"sliding_window_inference: predict_fn must map windows {window_shape} to one array "
                     f"{window_shape[:-1] + ('K',)}, got {got}; wrap a Flax model with make_predict_fn.")
  classes = out_shape.shape[-1]
  if num_classes is not None and classes != num_classes:
    raise ValueError(f"sliding_window_inference: num_classes={num_classes} but predict_fn returns {classes} "
                     "channels.")

  importance = _importance_on_device(roi_size, mode, sigma_scale)
  window_sharding = NamedSharding(mesh, P(DATA_AXIS)) if mesh is not None else None

  def gather(origin):
    start = [origin[i] for i in range(nd + 1)] + [0]
    return lax.dynamic_slice(image, start, (1,) + roi_size + (channels,))[0]

  def predict_batch(out, inputs):
    batch_origins, batch_valid = inputs
    windows = jax.vmap(gather)(batch_origins)
    if window_sharding is not None:
      windows = lax.with_sharding_constraint(windows, window_sharding)
    predictions = predict_fn(windows).astype(jnp.float32)
    # Filler windows (batch padding) get weight 0, so they add nothing.
    weighted = predictions * (importance[..., None] * batch_valid.reshape((-1,) + (1,) * (nd + 1)))

    def add_window(j, out):
      start = [batch_origins[j, i] for i in range(nd + 1)] + [0]
      current = lax.dynamic_slice(out, start, (1,) + roi_size + (classes,))
      return lax.dynamic_update_slice(out, current + weighted[j][None], start)

    return lax.fori_loop(0, window_batch, add_window, out), None

  def add_weight(weights, origin):
    start = [origin[i] for i in range(nd)]
    current = lax.dynamic_slice(weights, start, roi_size)
    return lax.dynamic_update_slice(weights, current + importance, start), None

  out = jnp.zeros((batch,) + padded + (classes,), jnp.float32)
  out, _ = lax.scan(predict_batch, out, (jnp.asarray(origins), jnp.asarray(valid)))
  weights, _ = lax.scan(add_weight, jnp.zeros(padded, jnp.float32), jnp.asarray(np.asarray(starts, np.int32)))
  out = out / weights[None, ..., None]
  crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
  return out[(slice(None),) + crop]


_run_jit = jax.jit(_run, static_argnames=("roi_size", "overlap", "mode", "sigma_scale", "window_batch",
                                          "num_classes", "pad_mode", "pad_value", "mesh"))


def sliding_window_inference(predict_fn: Callable[[Array], Array], image: Array, *, roi_size: Sequence[int],
                             overlap: float = 0.5, mode: str = "gaussian", sigma_scale: float = 0.125,
                             window_batch: int = 8, num_classes: Optional[int] = None,
                             pad_mode: str = "constant", pad_value: float = 0.0,
                             mesh: Optional[Mesh] = None) -> Array:
  """Predicts a whole image `(B, *spatial, C)` with a patch model, blending overlapping windows.

  Args:
    predict_fn: windows `(n, *roi_size, C)` -> `(n, *roi_size, K)`; ideally a `jax.tree_util.Partial`
      carrying the weights (`make_predict_fn`), so they are arguments of the compiled program. Whatever it
      returns is what gets averaged: probabilities (the default of `make_predict_fn`) or logits.
    image: `(B, *spatial, C)`, 2 or 3 spatial axes of any size (axes shorter than the window are padded).
    roi_size: window size, one int per spatial axis (need not be cubic).
    overlap: fraction of a window shared with its neighbour, in [0, 1); step = round(roi * (1 - overlap)).
    mode: "gaussian" (weights from `gaussian_importance_map`) or "constant" (plain mean).
    sigma_scale: Gaussian sigma as a fraction of the window size per axis.
    window_batch: windows per network call (all examples' windows are pooled); with a mesh, a multiple of
      its data-axis size, and the windows of each call are split over that axis.
    num_classes: expected K, checked against `predict_fn` when given.
    pad_mode: how axes shorter than the window are padded: "constant" (with `pad_value`), "edge",
      "reflect" or "symmetric" (numpy's modes).
    mesh: optional device mesh with a "data" axis; the weights in `predict_fn` are replicated onto it.
  Returns:
    float32 `(B, *spatial, K)`: the importance-weighted mean of the window predictions at every voxel.
  """
  image = jnp.asarray(image) if not isinstance(image, jax.Array) else image
  nd = image.ndim - 2
  if nd not in (2, 3):
    raise ValueError(f"sliding_window_inference: image must be (B, *spatial, C) with 2 or 3 spatial axes, "
                     f"got shape {image.shape}.")
  roi = _check_roi(roi_size, nd)
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"sliding_window_inference: overlap must be in [0, 1), got {overlap}.")
  if mode not in BLEND_MODES:
    raise ValueError(f"sliding_window_inference: mode must be one of {BLEND_MODES}, got {mode!r}.")
  _check_sigma(sigma_scale)
  if pad_mode not in PAD_MODES:
    raise ValueError(f"sliding_window_inference: pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.")
  if window_batch < 1:
    raise ValueError(f"sliding_window_inference: window_batch must be >= 1, got {window_batch}.")
  if not isinstance(predict_fn, jax.tree_util.Partial):
    predict_fn = jax.tree_util.Partial(predict_fn)
  if mesh is not None:
    if DATA_AXIS not in mesh.shape:
      raise ValueError(f"sliding_window_inference: mesh axes {tuple(mesh.shape)} lack {DATA_AXIS!r}.")
    if window_batch % mesh.shape[DATA_AXIS]:
      raise ValueError(f"sliding_window_inference: window_batch={window_batch} is not divisible by the mesh's "
                       f"{DATA_AXIS!r} axis ({mesh.shape[DATA_AXIS]} devices).")
    if not isinstance(image, jax.core.Tracer):
      replicated = NamedSharding(mesh, P())
      image = jax.device_put(image, replicated)
      predict_fn = jax.device_put(predict_fn, replicated)
  return _run_jit(predict_fn, image, roi_size=roi, overlap=float(overlap), mode=mode,
                  sigma_scale=float(sigma_scale), window_batch=int(window_batch), num_classes=num_classes,
                  pad_mode=pad_mode, pad_value=float(pad_value), mesh=mesh)
