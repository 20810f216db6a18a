"""Masked image modelling (issue 21): N-D patches, random patch masks and masked inputs, for MAE-style pretraining
of ViT / UNETR / Swin encoders in 2D and 3D.

MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", CVPR) masks a large random subset of the
patches (75%), encodes only the visible ones and reconstructs the pixels of the masked ones; SimMIM (Xie et al. 2022,
"SimMIM: A Simple Framework for Masked Image Modeling", CVPR) keeps every token, replaces the masked patches by a
learned mask embedding and regresses their pixels with a one-layer head. Both need the same parts, all pure
functions of arrays that run under `jax.jit`:

  patchify / unpatchify   `(B, *spatial, C) <-> (B, N, prod(patch) * C)`, the reconstruction targets
  num_masked              the (static) number of masked patches per example
  random_patch_mask       `(B, N)` bool, True = masked, exactly `num_masked` per row (MAE's argsort of noise)
  mask_to_voxels          the patch mask as a `(B, *spatial, 1)` voxel map (for plots and voxel-space losses)
  apply_mask              masked patches replaced by a fill patch (zeros, or SimMIM's learned patch of pixels)

The layout of a patch row is that of `medjax.models.vit.PatchEmbed`'s space-to-depth: the grid of patches is
flattened in row-major order (the last spatial axis fastest), and each row holds the patch's voxels in row-major
order with the channels last, `(*patch, C)` flattened. So token n of a ViT encoder sees exactly `patchify(x)[:, n]`
(`PatchEmbed(x) == patchify(x) @ kernel.reshape(-1, hidden) + bias`), and the loss on token n's prediction is
`medjax.losses.reconstruction.masked_patch_loss`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medjax.typing import Array

IntOrTuple = Union[int, Sequence[int]]


def _per_axis(patch_size: IntOrTuple, ndim: int, what: str) -> Tuple[int, ...]:
  """`2 -> (2,) * ndim`; a sequence must have `ndim` positive entries."""
  if isinstance(patch_size, (int, np.integer)):
    patch = (int(patch_size),) * ndim
  else:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != ndim:
      raise ValueError(f"{what}: patch_size {patch} has {len(patch)} entries but there are {ndim} spatial axes.")
  if any(p < 1 for p in patch):
    raise ValueError(f"{what}: patch_size must be positive, got {patch}.")
  return patch


def _grid(spatial: Sequence[int], patch: Sequence[int], what: str) -> Tuple[int, ...]:
  spatial, patch = tuple(spatial), tuple(patch)
  if any(s % p for s, p in zip(spatial, patch)):
    raise ValueError(f"{what}: spatial shape {spatial} is not divisible by patch_size {patch}.")
  return tuple(s // p for s, p in zip(spatial, patch))


def patchify(images: Array, patch_size: IntOrTuple) -> jax.Array:
  """Non-overlapping N-D patches: `(B, *spatial, C) -> (B, N, prod(patch) * C)`, N = prod(spatial / patch).

  images: `(B, *spatial, C)`, 2D or 3D (any number of spatial axes), any dtype (kept).
  patch_size: an int (every axis) or a per-axis tuple; every spatial size must be divisible by it.
  Patches are in row-major grid order; a patch's values are its voxels in row-major order, channels last
  (`PatchEmbed`'s space-to-depth order; module docstring). The inverse is `unpatchify`.
  """
  images = jnp.asarray(images)
  if images.ndim < 3:
    raise ValueError(f"patchify: images must be (B, *spatial, C) with at least one spatial axis, got shape "
                     f"{images.shape}.")
  b, *spatial, c = images.shape
  nd = len(spatial)
  patch = _per_axis(patch_size, nd, "patchify")
  grid = _grid(spatial, patch, "patchify")
  # (B, g1, p1, g2, p2, ..., C) -> (B, g1, g2, ..., p1, p2, ..., C), as PatchEmbed.
  x = images.reshape(b, *[v for g, p in zip(grid, patch) for v in (g, p)], c)
  x = x.transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
  return x.reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(patches: Array, patch_size: IntOrTuple, spatial_shape: Sequence[int]) -> jax.Array:
  """The exact inverse of `patchify`: `(B, N, prod(patch) * C) -> (B, *spatial_shape, C)`.

  patch_size: as given to `patchify`; spatial_shape: the images' spatial shape (divisible by patch_size), which
  fixes the grid, so N must be prod(spatial_shape / patch). C is inferred from the last axis.
  """
  patches = jnp.asarray(patches)
  spatial = tuple(int(s) for s in spatial_shape)
  nd = len(spatial)
  patch = _per_axis(patch_size, nd, "unpatchify")
  grid = _grid(spatial, patch, "unpatchify")
  volume = math.prod(patch)
  if patches.ndim != 3 or patches.shape[1] != math.prod(grid) or patches.shape[2] % volume:
    raise ValueError(f"unpatchify: patches of shape {patches.shape} do not fit spatial shape {spatial} and "
                     f"patch_size {patch}: expected (B, {math.prod(grid)}, {volume} * C).")
  b, c = patches.shape[0], patches.shape[2] // volume
  x = patches.reshape(b, *grid, *patch, c)
  x = x.transpose(0, *[a for i in range(nd) for a in (1 + i, 1 + nd + i)], 2 * nd + 1)
  return x.reshape(b, *spatial, c)


def num_masked(num_patches: int, mask_ratio: float) -> int:
  """The number of masked patches per example: `round(mask_ratio * num_patches)` (Python's round, ties to even:
  2.5 -> 2), clipped to [1, num_patches - 1] when 0 < mask_ratio < 1 so that at least one patch is masked and
  one is visible; 0 for mask_ratio 0. mask_ratio must be in [0, 1)."""
  num_patches = int(num_patches)
  mask_ratio = float(mask_ratio)
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
  if num_patches < 1:
    raise ValueError(f"num_patches must be >= 1, got {num_patches}.")
  if mask_ratio == 0.0:
    return 0
  if num_patches < 2:
    raise ValueError(f"mask_ratio {mask_ratio} needs at least 2 patches (one masked, one visible), got "
                     f"{num_patches}; use smaller patches.")
  return min(max(round(mask_ratio * num_patches), 1), num_patches - 1)


def random_patch_mask(key: jax.Array, batch_size: int, num_patches: int, mask_ratio: float) -> jax.Array:
  """A random patch mask `(B, N)` bool, True = masked, with exactly `num_masked(N, mask_ratio)` True per row.

  Each row is an independent uniformly random subset (MAE's random masking: the patches whose uniform noise
  ranks lowest stay visible). `batch_size`, `num_patches` and `mask_ratio` fix the shape and the count, so they
  are static under `jax.jit` (`static_argnums=(1, 2, 3)`). Because every row masks the same number of patches,
  the visible token indices are `jnp.argsort(mask, axis=1, stable=True)[:, :N - num_masked]` (a dense array).
  """
  count = num_masked(num_patches, mask_ratio)
  noise = jax.random.uniform(key, (int(batch_size), int(num_patches)))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # ids_restore: each patch's rank in its row
  return ranks >= int(num_patches) - count


def _check_mask(mask: Array, batch: int, num_patches: int, what: str) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.shape != (batch, num_patches):
    raise ValueError(f"{what}: mask of shape {mask.shape} does not match the ({batch}, {num_patches}) patches "
                     "(B, N).")
  return mask.astype(bool)


def mask_to_voxels(mask: Array, grid: Sequence[int], patch_size: IntOrTuple) -> jax.Array:
  """The patch mask `(B, N)` expanded to a voxel map `(B, *spatial, 1)` float32: 1 on the voxels of masked
  patches, 0 elsewhere; N = prod(grid) patches in row-major order, spatial = grid * patch."""
  grid = tuple(int(g) for g in grid)
  patch = _per_axis(patch_size, len(grid), "mask_to_voxels")
  mask = jnp.asarray(mask)
  mask = _check_mask(mask, mask.shape[0] if mask.ndim else 0, math.prod(grid), "mask_to_voxels")
  values = jnp.broadcast_to(mask.astype(jnp.float32)[..., None], (*mask.shape, math.prod(patch)))
  return unpatchify(values, patch, [g * p for g, p in zip(grid, patch)])


def apply_mask(images: Array, mask: Array, patch_size: IntOrTuple, fill: Optional[Array] = None) -> jax.Array:
  """Masked patches of `images` replaced by `fill`: `(B, *spatial, C) -> (B, *spatial, C)`, images' dtype.

  mask: `(B, N)` bool (or 0/1), True = masked, N the number of patches of `images`.
  fill: the patch that replaces a masked one, `(prod(patch) * C,)` in patch-row order (a learned patch of pixels,
    e.g. a parameter of the pretext model; gradients flow into it), or a scalar; zeros by default.
  Visible voxels come through bit-identical.
  """
  images = jnp.asarray(images)
  patches = patchify(images, patch_size)
  mask = _check_mask(mask, patches.shape[0], patches.shape[1], "apply_mask")
  if fill is None:
    fill = jnp.zeros((), images.dtype)
  fill = jnp.asarray(fill)
  if fill.shape not in ((), (patches.shape[2],)):
    raise ValueError(f"apply_mask: fill must be a scalar or one patch of shape ({patches.shape[2]},) (prod(patch) "
                     f"* C), got shape {fill.shape}.")
  patches = jnp.where(mask[..., None], fill.astype(images.dtype), patches)
  return unpatchify(patches, patch_size, images.shape[1:-1])
