"""Pretext-task corruptions for self-supervised pretraining: Models Genesis and rotation prediction.

Pure, jittable JAX on channels-last float images, one code path for 2D `(B, H, W, C)` (spatial `(y, x)`) and
3D `(B, D, H, W, C)` (spatial `(z, y, x)`). Shapes are static, there are no host callbacks and no Python loops
over the batch: each per-example transform runs under `jax.vmap`.

Randomness: every function takes an explicit key. A per-example transform draws all its numbers as one flat
uniform array of B rows (row i for example i), so an example's output depends only on the key, its own image,
its index and the batch size, never on the other examples. Outputs keep the input's shape and dtype (computed
in at least float32). The public functions are jitted (options static), so eager calls compile once too.

Models Genesis (Zhou, Sodha, Pang, Gotway, Liang, "Models Genesis", Medical Image Analysis 67:101840, 2021):
a network is pretrained to restore an image from a corrupted copy. The four corruptions and their chain
follow the paper's description; the code is our own:

  local_pixel_shuffle   the voxels inside a random subset of blocks are permuted (texture lost, values kept)
  nonlinear_intensity   a monotonic cubic Bezier curve remaps intensities (increasing or decreasing)
  in_painting           random boxes are replaced by uniform noise in the example's [min, max]
  out_painting          everything outside one random box is replaced by such noise
  genesis_corrupt       shuffle -> nonlinear intensity -> (in- or out-)painting, each with its probability

Rotation prediction (Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018): classify which rotation was applied. 2D: 4 classes, k * 90 degrees in the (y, x)
plane. 3D (Taleb et al., "3D Self-Supervised Methods for Medical Imaging", NeurIPS 2020): 10 classes, the
identity plus 90/180/270 degrees in each of the (y, x), (z, x) and (z, y) planes (about the z, y, x axes).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medjax.typing import Array

_BEZIER_SAMPLES = 1000  # parameter values t at which the Bezier curve is sampled (then interpolated)
_EPS = 1e-9  # slack for floor/ceil of fraction * size (0.57 * 100 = 56.99999999999999)
# Stage indices for `jax.random.fold_in(key, stage)` in genesis_corrupt (fixed: part of the random stream).
_SHUFFLE, _NONLINEAR, _PAINT_CHOICE, _IN_PAINT, _OUT_PAINT = range(5)
_PLANES_3D = ((1, 2), (0, 2), (0, 1))  # spatial axis pairs of the 3D rotation classes, in class order
_AXIS_NAMES = {2: "yx", 3: "zyx"}


# ---------------------------------------------------------------------------------------------- helpers

def _check(images: Array, name: str) -> None:
  if images.ndim not in (4, 5):
    raise ValueError(f"{name}: images must be (B, H, W, C) or (B, D, H, W, C), got shape {tuple(images.shape)}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{name}: images must be floating point, got dtype {images.dtype}.")


def _check_prob(value: float, name: str) -> float:
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}.")
  return float(value)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _per_example(fn: Callable[..., Array], key: Array, images: Array, count: int, options: tuple) -> Array:
  """vmap `fn(u_i, image_i, **options) -> image_i` over the batch; u_i: example i's own `count` uniforms in [0, 1).

  All B * count numbers come from one flat draw (row i = example i), so an example's numbers depend only on the
  key, its index and B. One flat call compiles far faster than per-example keys or multi-dimensional draws.
  The image is computed in at least float32 and cast back to its dtype.
  """
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  u = jax.random.uniform(key, (images.shape[0] * count,), dtype).reshape(images.shape[0], count)
  fn = functools.partial(fn, **dict(options))
  return jax.vmap(fn)(u, images.astype(dtype)).astype(images.dtype)


def _range(x: Array) -> Tuple[Array, Array]:
  """Min and max of one example (*S, C) over all voxels and channels (scalars)."""
  return jnp.min(x), jnp.max(x)


def _uniform_noise(u: Array, x: Array) -> Array:
  """Uniforms u (x.size,) -> noise shaped like x (*S, C), in [min(x), max(x)] of the example."""
  mn, mx = _range(x)
  return jnp.clip(mn + u.reshape(x.shape) * (mx - mn), mn, mx)


def _randint(u: Array, lo, hi) -> Array:
  """Integers uniform in [lo, hi] (inclusive, broadcast) from uniforms u in [0, 1)."""
  lo = jnp.asarray(lo, jnp.float32)
  span = jnp.asarray(hi, jnp.float32) - lo
  return (lo + jnp.minimum(jnp.floor(u * (span + 1.0)), span)).astype(jnp.int32)


def _box_mask(start: Array, size: Array, shape: Sequence[int]) -> Array:
  """Boolean (*lead, *S), True inside the boxes [start_d, start_d + size_d); start, size: int (*lead, D)."""
  lead = start.shape[:-1]
  ndim = len(shape)
  inside = jnp.ones(lead + (1,) * ndim, bool)
  for d, n in enumerate(shape):
    idx = jnp.arange(n).reshape([n if e == d else 1 for e in range(ndim)])
    s = start[..., d].reshape(lead + (1,) * ndim)
    e = s + size[..., d].reshape(lead + (1,) * ndim)
    inside = inside & (idx >= s) & (idx < e)
  return inside


# --------------------------------------------------------------------------------------- Models Genesis

def _bezier_curve(u: Array, dtype) -> Tuple[Array, Array]:
  """(x(t), y(t)) at _BEZIER_SAMPLES values of t for control points (0, 0), (u0, u1), (u2, u3), (1, 1).

  With inner points in [0, 1]^2 both coordinates are non-decreasing in t (the derivative's Bernstein
  coefficients a, b - a, 1 - b satisfy |b - a| <= sqrt(a (1 - b))); cummax removes rounding wiggles.
  """
  t = jnp.linspace(0.0, 1.0, _BEZIER_SAMPLES, dtype=dtype)
  basis = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3]
  xs = basis[1] * u[0] + basis[2] * u[2] + basis[3]  # the (0, 0) control point adds nothing
  ys = basis[1] * u[1] + basis[2] * u[3] + basis[3]
  monotone = lambda v: jnp.clip(jax.lax.cummax(v, axis=0), 0.0, 1.0)
  return monotone(xs), monotone(ys)


def _nonlinear_one(u: Array, x: Array, *, prob: float) -> Array:
  """u: (6,) uniforms: fire, two inner control points, direction."""
  mn, mx = _range(x)
  span = mx - mn
  v = jnp.where(span > 0, (x - mn) / jnp.where(span > 0, span, 1.0), 0.0)
  xs, ys = _bezier_curve(u[1:5], x.dtype)
  ys = jnp.where(u[5] < 0.5, ys, ys[::-1])  # increasing or decreasing, each with probability 1/2
  y = jnp.interp(v, xs, ys)
  y = jnp.where(v <= 0, ys[0], jnp.where(v >= 1, ys[-1], y))  # exact end points, so the range is kept
  out = jnp.where(y >= 1, mx, jnp.where(y <= 0, mn, jnp.clip(mn + y * span, mn, mx)))
  return jnp.where(u[0] < prob, out, x)


def nonlinear_intensity(key: Array, images: Array, *, prob: float = 0.9) -> Array:
  """Monotonic Bezier intensity remapping (Models Genesis), independently per example.

  Args:
    key: PRNG key. Random per example: whether the transform fires (probability `prob`), the two inner
      control points (uniform in [0, 1]^2; the outer ones are (0, 0) and (1, 1)) and the direction
      (increasing or decreasing, 1/2 each).
    images: float (B, *S, C), any range.
    prob: probability that an example is transformed (else returned unchanged).

  Returns:
    (B, *S, C), same dtype: each example is mapped to [0, 1] by its own min/max (over voxels and channels),
    through the curve (x -> y, sampled at fixed t and linearly interpolated) and back to [min, max]. The order
    of the voxel values is kept or reversed, the min and max are kept; a constant example stays unchanged.
  """
  _check(images, "nonlinear_intensity")
  prob = _check_prob(prob, "nonlinear_intensity: prob")
  if prob == 0.0:
    return images
  return _per_example(_nonlinear_one, key, images, 6, (("prob", prob),))


def _block_shape(block_size, shape: Sequence[int]) -> Tuple[int, ...]:
  if block_size is None:
    return tuple(max(1, n // 8) for n in shape)
  blocks = (int(block_size),) * len(shape) if np.ndim(block_size) == 0 else tuple(int(b) for b in block_size)
  if len(blocks) != len(shape) or any(not 1 <= b <= n for b, n in zip(blocks, shape)):
    raise ValueError(f"local_pixel_shuffle: block_size {block_size} must be one int or one per spatial axis, "
                     f"each in [1, axis size], for spatial shape {tuple(shape)}.")
  return blocks


def _shuffle_count(shape: Sequence[int], blocks: Tuple[int, ...]) -> int:
  """Uniforms one example of local_pixel_shuffle needs: fire, one per block, one per covered voxel."""
  num_blocks = math.prod(n // b for n, b in zip(shape, blocks))
  return 1 + num_blocks + num_blocks * math.prod(blocks)


def _shuffle_one(u: Array, x: Array, *, prob: float, blocks: Tuple[int, ...], fraction: float) -> Array:
  shape, channels, ndim = x.shape[:-1], x.shape[-1], x.ndim - 1
  grid = tuple(n // b for n, b in zip(shape, blocks))
  covered = tuple(g * b for g, b in zip(grid, blocks))
  num_blocks, volume = math.prod(grid), math.prod(blocks)
  fire, u_blocks, u_voxels = u[0] < prob, u[1:1 + num_blocks], u[1 + num_blocks:].reshape(num_blocks, volume)
  # (g0 b0, g1 b1, ..., C) -> (g0, b0, g1, b1, ..., C) -> (g0, g1, ..., b0, b1, ..., C) -> (G, V, C)
  split = sum(((g, b) for g, b in zip(grid, blocks)), ()) + (channels,)
  order = tuple(range(0, 2 * ndim, 2)) + tuple(range(1, 2 * ndim, 2)) + (2 * ndim,)
  part = x[tuple(slice(0, c) for c in covered)]
  tiles = part.reshape(split).transpose(order).reshape(num_blocks, volume, channels)
  chosen = jnp.argsort(jnp.argsort(u_blocks)) < round(fraction * num_blocks)  # exactly that many blocks
  perm = jnp.where(chosen[:, None], jnp.argsort(u_voxels, axis=1), jnp.arange(volume)[None, :])
  tiles = jnp.take_along_axis(tiles, perm[:, :, None], axis=1)  # channels move together
  part = tiles.reshape(grid + blocks + (channels,)).transpose(np.argsort(order)).reshape(part.shape)
  return jnp.where(fire, x.at[tuple(slice(0, c) for c in covered)].set(part), x)


def local_pixel_shuffle(key: Array, images: Array, *, prob: float = 0.5,
                        block_size: Optional[Union[int, Sequence[int]]] = None, fraction: float = 0.25) -> Array:
  """Local pixel shuffling (Models Genesis), independently per example.

  The spatial grid is tiled from the origin into blocks of `block_size`; voxels past the last whole block of
  an axis (when the axis is not divisible) are never moved.

  Args:
    key: PRNG key. Random per example: whether it fires (probability `prob`), which round(fraction * G) of
      the G blocks are chosen, and a uniform permutation of the voxels of each chosen block.
    images: float (B, *S, C).
    prob: probability that an example is shuffled.
    block_size: block sides in voxels, one int or one per spatial axis; None: max(1, n // 8) per axis.
    fraction: share of the blocks that are shuffled.

  Returns:
    (B, *S, C), same dtype. Voxels (all channels together) move only within their chosen block, so each
    block keeps its multiset of values; everything outside the chosen blocks is unchanged.
  """
  _check(images, "local_pixel_shuffle")
  prob = _check_prob(prob, "local_pixel_shuffle: prob")
  fraction = _check_prob(fraction, "local_pixel_shuffle: fraction")
  blocks = _block_shape(block_size, images.shape[1:-1])
  if prob == 0.0 or fraction == 0.0:
    return images
  options = (("prob", prob), ("blocks", blocks), ("fraction", fraction))
  return _per_example(_shuffle_one, key, images, _shuffle_count(images.shape[1:-1], blocks), options)


def _in_paint_one(u: Array, x: Array, *, num_boxes: int, max_fraction: float) -> Array:
  """u: (2 * num_boxes * D + x.size,) uniforms: box sizes, box positions, noise."""
  shape = x.shape[:-1]
  boxes = u[:2 * num_boxes * len(shape)].reshape(2, num_boxes, len(shape))
  size = _randint(boxes[0], 1, [max(1, math.floor(max_fraction * n + _EPS)) for n in shape])
  start = _randint(boxes[1], 0, jnp.asarray(shape) - size)
  mask = jnp.any(_box_mask(start, size, shape), axis=0)[..., None]
  return jnp.where(mask, _uniform_noise(u[2 * num_boxes * len(shape):], x), x)


def in_painting(key: Array, images: Array, *, num_boxes: int = 5, max_fraction: float = 0.3) -> Array:
  """Image in-painting corruption (Models Genesis), independently per example.

  Args:
    key: PRNG key. Random per example: `num_boxes` axis-aligned boxes (each side uniform in
      [1, max(1, floor(max_fraction * n))] voxels, position uniform inside the image; boxes may overlap) and
      the noise, uniform in the example's [min, max] (over voxels and channels), drawn per voxel and channel.
    images: float (B, *S, C).
    num_boxes: boxes per example (>= 1).
    max_fraction: largest box side as a fraction of the axis, in (0, 1].

  Returns:
    (B, *S, C), same dtype: noise inside the union of the boxes (all channels), the image elsewhere.
  """
  _check(images, "in_painting")
  if int(num_boxes) < 1 or not 0.0 < float(max_fraction) <= 1.0:
    raise ValueError(f"in_painting: need num_boxes >= 1 and max_fraction in (0, 1], got {num_boxes} and "
                     f"{max_fraction}.")
  count = 2 * int(num_boxes) * (images.ndim - 2) + math.prod(images.shape[1:])
  options = (("num_boxes", int(num_boxes)), ("max_fraction", float(max_fraction)))
  return _per_example(_in_paint_one, key, images, count, options)


def _out_paint_one(u: Array, x: Array, *, min_fraction: float, max_fraction: float) -> Array:
  """u: (2 * D + x.size,) uniforms: box size, box position, noise."""
  shape = x.shape[:-1]
  box, u = u[:2 * len(shape)].reshape(2, len(shape)), u[2 * len(shape):]
  lo = [min(n, max(1, math.ceil(min_fraction * n - _EPS))) for n in shape]
  hi = [max(low, min(n, math.floor(max_fraction * n + _EPS))) for low, n in zip(lo, shape)]
  size = _randint(box[0], lo, hi)
  start = _randint(box[1], 0, jnp.asarray(shape) - size)
  keep = _box_mask(start, size, shape)[..., None]
  return jnp.where(keep, x, _uniform_noise(u, x))


def out_painting(key: Array, images: Array, *, min_fraction: float = 0.5, max_fraction: float = 0.9) -> Array:
  """Image out-painting corruption (Models Genesis), independently per example.

  Args:
    key: PRNG key. Random per example: one axis-aligned box (each side uniform in
      [max(1, ceil(min_fraction * n)), max(that, floor(max_fraction * n))] voxels, position uniform inside
      the image) and the noise, uniform in the example's [min, max], drawn per voxel and channel.
    images: float (B, *S, C).
    min_fraction, max_fraction: bounds of the kept box's sides as fractions of each axis,
      0 < min_fraction <= max_fraction <= 1.

  Returns:
    (B, *S, C), same dtype: the image inside the box, noise everywhere outside it (all channels).
  """
  _check(images, "out_painting")
  if not 0.0 < float(min_fraction) <= float(max_fraction) <= 1.0:
    raise ValueError(f"out_painting: need 0 < min_fraction <= max_fraction <= 1, got {min_fraction} and "
                     f"{max_fraction}.")
  count = 2 * (images.ndim - 2) + math.prod(images.shape[1:])
  options = (("min_fraction", float(min_fraction)), ("max_fraction", float(max_fraction)))
  return _per_example(_out_paint_one, key, images, count, options)


@functools.partial(jax.jit, static_argnames=("shuffle_prob", "nonlinear_prob", "paint_prob", "inpaint_rate"))
def genesis_corrupt(key: Array, images: Array, *, shuffle_prob: float = 0.5, nonlinear_prob: float = 0.9,
                    paint_prob: float = 0.9, inpaint_rate: float = 0.2) -> Array:
  """The Models Genesis corruption chain, independently per example, with default stage options.

  local_pixel_shuffle(prob=shuffle_prob) -> nonlinear_intensity(prob=nonlinear_prob) -> with probability
  `paint_prob`: in_painting with probability `inpaint_rate`, else out_painting. Stage s draws from
  `jax.random.fold_in(key, s)`: 0 shuffle, 1 non-linear intensity, 2 the paint choice (per example),
  3 in-painting, 4 out-painting.

  Args:
    key: PRNG key (see above for what each stage draws).
    images: float (B, *S, C).

  Returns:
    The corrupted images (B, *S, C), same dtype.
  """
  _check(images, "genesis_corrupt")
  paint_prob = _check_prob(paint_prob, "genesis_corrupt: paint_prob")
  inpaint_rate = _check_prob(inpaint_rate, "genesis_corrupt: inpaint_rate")
  x = local_pixel_shuffle(jax.random.fold_in(key, _SHUFFLE), images, prob=shuffle_prob)
  x = nonlinear_intensity(jax.random.fold_in(key, _NONLINEAR), x, prob=nonlinear_prob)
  if paint_prob == 0.0:
    return x
  u = jax.random.uniform(jax.random.fold_in(key, _PAINT_CHOICE), (2 * images.shape[0],)).reshape(-1, 2)
  as_mask = lambda m: m.reshape((-1,) + (1,) * (images.ndim - 1))
  paint, inner = as_mask(u[:, 0] < paint_prob), as_mask(u[:, 1] < inpaint_rate)
  painted = x
  if inpaint_rate < 1.0:
    painted = jnp.where(inner, painted, out_painting(jax.random.fold_in(key, _OUT_PAINT), x))
  if inpaint_rate > 0.0:
    painted = jnp.where(inner, in_painting(jax.random.fold_in(key, _IN_PAINT), x), painted)
  return jnp.where(paint, painted, x)


# ---------------------------------------------------------------------------------- rotation prediction

def num_rotation_classes(spatial_dims: int) -> int:
  """Number of rotation classes: 4 in 2D, 10 in 3D (identity + 3 angles x 3 planes)."""
  if spatial_dims == 2:
    return 4
  if spatial_dims == 3:
    return 1 + 3 * len(_PLANES_3D)
  raise ValueError(f"num_rotation_classes: spatial_dims must be 2 or 3, got {spatial_dims}.")


def _rotation_table(spatial_dims: int):
  """[(k quarter turns, (spatial axis i, spatial axis j))] in class order."""
  if spatial_dims == 2:
    return [(k, (0, 1)) for k in range(4)]
  return [(0, (0, 1))] + [(k, plane) for plane in _PLANES_3D for k in (1, 2, 3)]


def rotate(images: Array, classes: Array) -> Array:
  """Rotate example i by rotation class `classes[i]`.

  2D: class k is `jnp.rot90(image, k, axes=(y, x))` (k * 90 degrees, from y towards x). 3D: class 0 is the
  identity; class 1 + 3 a + (k - 1), for a in 0..2 and k in 1..3, is k quarter turns in the plane
  [(y, x), (z, x), (z, y)][a] (about the z, y, x axis), rot90's direction from the first axis to the second.
  Every version is computed and one is selected per example (cheap for pretext-sized inputs).

  Args:
    images: float (B, *S, C); the rotated planes must be square ((y, x) in 2D; a cube in 3D), else a
      ValueError naming the shape is raised at trace time.
    classes: int (B,) in [0, num_rotation_classes(len(S))); an example with a class outside is all NaN.

  Returns:
    (B, *S, C), same dtype. Nothing is random.
  """
  _check(images, "rotate")
  spatial = images.shape[1:-1]
  ndim = len(spatial)
  names = _AXIS_NAMES[ndim]
  table = _rotation_table(ndim)
  for k, (i, j) in table:
    if k % 2 and spatial[i] != spatial[j]:
      raise ValueError(f"rotate: 90-degree rotations need square planes, but the ({names[i]}, {names[j]}) plane "
                       f"of images with shape {tuple(images.shape)} is {spatial[i]} x {spatial[j]}.")
  classes = jnp.asarray(classes)
  if classes.shape != images.shape[:1] or not jnp.issubdtype(classes.dtype, jnp.integer):
    raise ValueError(f"rotate: classes must be int ({images.shape[0]},), got {classes.dtype} "
                     f"{tuple(classes.shape)}.")
  versions = [jnp.rot90(images, k, axes=(i + 1, j + 1)) for k, (i, j) in table]
  c = classes.reshape((-1,) + (1,) * (images.ndim - 1))
  return jnp.select([c == n for n in range(len(table))], versions, jnp.asarray(jnp.nan, images.dtype))


def random_rotations(key: Array, images: Array) -> Tuple[Array, Array]:
  """Rotate each example by a class drawn uniformly from the num_rotation_classes(len(S)) classes.

  Args:
    key: PRNG key; the (B,) classes are `jax.random.randint(key, (B,), 0, K)`.
    images: float (B, *S, C) with square planes (see `rotate`).

  Returns:
    (rotate(images, classes), classes): (B, *S, C) same dtype, and int32 (B,).
  """
  _check(images, "random_rotations")
  num = num_rotation_classes(images.ndim - 2)
  classes = jax.random.randint(key, images.shape[:1], 0, num, dtype=jnp.int32)
  return rotate(images, classes), classes

