"""Whole cases of many shapes through few compiled sliding-window programs.

`sliding_window_inference` plans its windows from the image shape while tracing, so every case shape is a
new program; a validation split of 50 differently sized cases would compile 50 of them. Here the plan is
data instead. `place_case` (host side, numpy) puts a case into a canvas (per axis one window plus whole
window steps) and lists the case's window origins in a fixed-size array; `sliding_window_planned` runs only
those windows (a loop with a data-dependent trip count) and blends them into a canvas-sized output. One
program serves every case whose canvas has the same shape, and most cases of a dataset share a few canvases.

The windows are exactly those `sliding_window_inference` uses on the case alone: axes shorter than the
window are padded to it (centred, `pad_mode`) before planning, the canvas beyond the padded case is never
read, and windows are visited and accumulated in the same raster order. Voxels outside the case score 0 for
every class; `mask` marks the case's own voxels.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax.inference import sliding_window as sw
from medjax.sharding import DATA_AXIS
from medjax.typing import Array

def canvas_shape(spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> Tuple[int, ...]:
  """The canvas of a case of `spatial_shape`: per axis one window plus whole window steps
  (`round(roi * (1 - overlap))`, as `sliding_window.window_starts`), so a case on the window grid fills it."""
  out = []
  for s, r in zip(spatial_shape, roi_size):
    step = max(1, int(round(int(r) * (1.0 - overlap))))
    out.append(int(r) + -(-max(0, int(s) - int(r)) // step) * step)
  return tuple(out)


def place_case(example: Mapping[str, np.ndarray], *, roi_size: Sequence[int], overlap: float, window_batch: int,
               pad_mode: str = "constant", pad_value: float = 0.0) -> Dict[str, np.ndarray]:
  """Puts one example (a whole case) on its canvas with its window plan (host side, numpy).

  Args:
    example: "image" (*spatial, C) and optionally "label" (*spatial); other keys are kept as they are.
    roi_size / overlap / pad_mode / pad_value: as for `sliding_window_inference`.
    window_batch: windows per network call (a multiple of the mesh's data axis when one is used).
  Returns:
    The example with "image" (*canvas, C) (zeros beyond the padded case), "label" (*canvas) int32 (0 beyond
    the case), "mask" (*canvas) bool (True on the case's own voxels), "window_origins" (steps, window_batch,
    nd) int32, "window_valid" (steps, window_batch) float32 (0 for filler windows) and "window_steps" ()
    int32, the number of window batches this case needs (`steps` is the canvas's worst case).
  """
  image = np.asarray(example["image"])
  spatial = tuple(image.shape[:-1])
  roi = tuple(int(r) for r in roi_size)
  if len(roi) != len(spatial):
    raise ValueError(f"place_case: roi_size {roi} needs {len(spatial)} axes for an image of shape {image.shape}.")
  pads = sw._padding(spatial, roi)
  if any(p != (0, 0) for p in pads):
    extra = {"constant_values": pad_value} if pad_mode == "constant" else {}
    image = np.pad(image, list(pads) + [(0, 0)], mode=pad_mode, **extra)
  padded = tuple(image.shape[:-1])
  canvas = canvas_shape(spatial, roi, overlap)
  out = dict(example)
  out["image"] = np.zeros(canvas + image.shape[-1:], np.float32)
  out["image"][tuple(slice(0, n) for n in padded)] = image
  region = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
  out["mask"] = np.zeros(canvas, bool)
  out["mask"][region] = True
  if "label" in example:
    out["label"] = np.zeros(canvas, np.int32)
    out["label"][region] = np.asarray(example["label"])

  origins = sw.window_origins(padded, roi, overlap)
  most = len(sw.window_origins(canvas, roi, overlap))  # window counts grow with the axis lengths
  steps = math.ceil(most / window_batch)
  plan = np.zeros((steps * window_batch, len(roi)), np.int32)
  plan[:len(origins)] = origins
  valid = np.zeros(steps * window_batch, np.float32)
  valid[:len(origins)] = 1.0
  out["window_origins"] = plan.reshape(steps, window_batch, len(roi))
  out["window_valid"] = valid.reshape(steps, window_batch)
  out["window_steps"] = np.asarray(math.ceil(len(origins) / window_batch), np.int32)
  return out


def sliding_window_planned(predict_fn: Callable[[Array], Array], image: Array, window_origins: Array,
                           window_valid: Array, window_steps: Array, *, roi_size: Sequence[int], mode: str = "gaussian",
                           sigma_scale: float = 0.125, mesh: Optional[Mesh] = None) -> Array:
  """Blends the planned windows of one case on its canvas (jittable; call it inside `jax.jit`).

  Args:
    predict_fn: windows (n, *roi, C) -> (n, *roi, K), as for `sliding_window_inference`.
    image: (1, *canvas, C), from `place_case`.
    window_origins / window_valid / window_steps: the plan from `place_case`.
    roi_size / mode / sigma_scale: as for `sliding_window_inference`.
    mesh: optional mesh; each window batch is split over its data axis.
  Returns:
    float32 (1, *canvas, K): the importance-weighted mean of the window predictions on the padded case, 0
    where no window reaches.
  """
  if mode not in sw.BLEND_MODES:
    raise ValueError(f"sliding_window_planned: mode must be one of {sw.BLEND_MODES}, got {mode!r}.")
  roi = tuple(int(r) for r in roi_size)
  nd = len(roi)
  channels = image.shape[-1]
  window_batch = window_origins.shape[1]
  window_shape = (window_batch,) + roi + (channels,)
  classes = jax.eval_shape(predict_fn, jax.ShapeDtypeStruct(window_shape, image.dtype)).shape[-1]
  importance = sw._importance_on_device(roi, mode, sigma_scale)
  window_sharding = NamedSharding(mesh, P(DATA_AXIS)) if mesh is not None else None
  volume = image[0]

  def gather(origin):
    return lax.dynamic_slice(volume, [origin[i] for i in range(nd)] + [0], roi + (channels,))

  def predict_batch(step, carry):
    out, weights = carry
    origins, valid = window_origins[step], window_valid[step]
    windows = jax.vmap(gather)(origins)
    if window_sharding is not None:
      windows = lax.with_sharding_constraint(windows, window_sharding)
    predictions = predict_fn(windows).astype(jnp.float32)
    weighted = predictions * (importance[..., None] * valid.reshape((-1,) + (1,) * (nd + 1)))

    def add_window(j, carry):
      out, weights = carry
      start = [origins[j, i] for i in range(nd)]
      current = lax.dynamic_slice(out, start + [0], roi + (classes,))
      out = lax.dynamic_update_slice(out, current + weighted[j], start + [0])
      current = lax.dynamic_slice(weights, start, roi)
      return out, lax.dynamic_update_slice(weights, current + importance * valid[j], start)

    return lax.fori_loop(0, window_batch, add_window, (out, weights))

  canvas = tuple(volume.shape[:-1])
  carry = (jnp.zeros(canvas + (classes,), jnp.float32), jnp.zeros(canvas, jnp.float32))
  out, weights = lax.fori_loop(0, window_steps, predict_batch, carry)
  covered = weights > 0
  return jnp.where(covered[..., None], out / jnp.where(covered, weights, 1.0)[..., None], 0.0)[None]


def crop_to_case(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The case's own voxels of a canvas-sized `array` (*canvas[, K]), cut by the bounding box of `mask`."""
  where = np.nonzero(mask)
  return array[tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)]
