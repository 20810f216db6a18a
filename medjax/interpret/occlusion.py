"""Occlusion sensitivity (Zeiler & Fergus 2014): how much the score drops when a window of the input is replaced by
a baseline, for 2D images and 3D volumes (issue 20).

Semantics are those of Captum's `Occlusion` with a window that spans all channels (Captum on NCHW input with
`sliding_window_shapes=(C, h, w)`): the attribution of a position is the average, over the windows that contain it,
of `score(x) - score(x with the window set to the baseline)`.

Window placement (as Captum's): along each spatial axis of size S with window W and stride s, windows start at
0, s, 2s, ..., ceil((S - W) / s) * s; when s does not divide S - W the last window runs past the edge and is clipped
there (Captum pads its window mask with a negative amount, which crops it), so every position is covered at least
once. As in Captum, the stride may not exceed the window (positions would be left uncovered) unless the window spans
the axis.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medjax.interpret.gradients import tile_target
from medjax.interpret import loops
from medjax.interpret.targets import Target, join_target, scores, split_target


def _per_axis(value: Union[int, Sequence[int]], spatial: Tuple[int, ...], name: str) -> Tuple[int, ...]:
  values = (int(value),) * len(spatial) if np.ndim(value) == 0 else tuple(int(v) for v in value)
  if len(values) != len(spatial):
    raise ValueError(f"{name} needs one value per spatial axis {spatial}, got {value}")
  if min(values) < 1:
    raise ValueError(f"{name} must be >= 1 on every axis, got {value}")
  return values


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
  """Start positions of the windows along one axis (module docstring): 0, stride, ... up to the first start whose
  window reaches the edge; the last window may run past the edge and is clipped."""
  if window > size:
    raise ValueError(f"window {window} exceeds the input size {size}")
  if stride > window and window < size:
    raise ValueError(f"stride {stride} exceeds the window {window}: positions would be left unoccluded")
  return np.arange(math.ceil((size - window) / stride) + 1) * stride


@functools.partial(jax.jit, static_argnames=("model", "class_index", "window", "chunk"))
def _occlusion(model, variables, images, baseline, target_array, starts, valid, counts, *, class_index, window,
               chunk):
  """starts `(P, D)` int32 window starts padded to a multiple of `chunk` (valid 0 on padding), counts `(*spatial)`
  how many windows cover each position. Returns `(B, *spatial)`."""
  batch, spatial = images.shape[0], images.shape[1:-1]
  baseline = jnp.broadcast_to(baseline, images.shape)
  grids = [jnp.arange(n) for n in spatial]
  tiled = join_target(tile_target(target_array, chunk), class_index)
  logits, _ = model.apply(variables, images, train=False)
  clean = scores(logits, join_target(target_array, class_index))

  def window_mask(start):
    # Product of per-axis indicators; positions past the edge do not exist, so a window running past it is clipped.
    mask = jnp.ones(spatial, jnp.float32)
    for axis, (grid, width) in enumerate(zip(grids, window)):
      inside = ((grid >= start[axis]) & (grid < start[axis] + width)).astype(jnp.float32)
      mask = mask * inside.reshape((1,) * axis + (-1,) + (1,) * (len(spatial) - axis - 1))
    return mask

  def body(total, step):
    starts_chunk, valid_chunk = step
    masks = jax.vmap(window_mask)(starts_chunk)  # (chunk, *spatial)
    m = masks[:, None, ..., None]  # (chunk, 1, *spatial, 1): the same window on every image and every channel
    occluded = images[None] * (1.0 - m) + baseline[None] * m
    logits, _ = model.apply(variables, occluded.reshape((chunk * batch,) + images.shape[1:]), train=False)
    drop = (clean[None] - scores(logits, tiled).reshape(chunk, batch)) * valid_chunk[:, None]  # (chunk, B)
    return total + jnp.tensordot(drop, masks, axes=([0], [0])), None

  total, _ = loops.sweep(body, jnp.zeros((batch,) + spatial, jnp.float32), (starts, valid))
  return total / counts[None]


def occlusion(model: Any, variables: Any, images: jax.Array, target: Target, *, window: Union[int, Sequence[int]],
              stride: Union[int, Sequence[int], None] = None, baseline: Union[float, jax.Array] = 0.0,
              batch_size: int = 64) -> jax.Array:
  """Occlusion map `(B, *spatial)` float32: per position, the mean over the windows containing it of the score drop
  `score(x) - score(x occluded)` (positive where occluding lowers the score); module docstring for placement.

  images: `(B, *spatial, C)` channels-last, 2D or 3D; the occluder covers all channels.
  window, stride: in voxels, one int for every spatial axis or one per axis. stride None: the window (non-overlapping
    tiles); Captum's default stride is 1, which costs prod(S - W + 1) forward passes per image.
  baseline: what the window is set to: a scalar (Captum's default 0) or an array broadcastable to `images` (e.g. the
    per-channel mean, or a blurred copy).
  batch_size: occluded images per forward pass (windows per pass = max(1, batch_size // B)); the windows are swept
    under `loops.sweep`, so memory is bounded by one pass.
  """
  images = jnp.asarray(images)
  if images.ndim < 3:
    raise ValueError(f"images must be (B, *spatial, C) with at least one spatial axis, got shape {images.shape}")
  images = images.astype(jnp.float32)
  spatial = tuple(images.shape[1:-1])
  window = _per_axis(window, spatial, "window")
  stride = window if stride is None else _per_axis(stride, spatial, "stride")
  per_axis = [window_starts(n, w, s) for n, w, s in zip(spatial, window, stride)]
  starts = np.array(list(itertools.product(*per_axis)), np.int32).reshape(-1, len(spatial))
  counts = np.ones((), np.float32)
  for axis, (n, w, axis_starts) in enumerate(zip(spatial, window, per_axis)):
    covered = np.zeros(n, np.float32)
    for s in axis_starts:
      covered[s:s + w] += 1.0
    counts = counts * covered.reshape((1,) * axis + (-1,) + (1,) * (len(spatial) - axis - 1))
  chunk = max(1, min(int(batch_size) // images.shape[0], len(starts)))
  pad = -len(starts) % chunk
  valid = np.concatenate([np.ones(len(starts), np.float32), np.zeros(pad, np.float32)])
  starts = np.concatenate([starts, np.repeat(starts[:1], pad, axis=0)])
  baseline = jnp.asarray(baseline, jnp.float32)
  array, class_index = split_target(target)
  return _occlusion(model, variables, images, baseline, array, jnp.asarray(starts.reshape(-1, chunk, len(spatial))),
                    jnp.asarray(valid.reshape(-1, chunk)), jnp.asarray(counts), class_index=class_index,
                    window=window, chunk=chunk)
