"""Masked image modelling (medjax.pretext.masking): patch layout (PatchEmbed's order), exact mask counts, masking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.vit import PatchEmbed
from medjax.pretext import masking

# (spatial, patch, channels): 2D and 3D, non-square on purpose, int and per-axis patch sizes.
LAYOUTS = [
    ((6, 4), (3, 2), 3),
    ((4, 6), 2, 1),
    ((4, 6, 2), (2, 3, 1), 2),
    ((2, 4, 6), 2, 3),
]


def _axes(patch, spatial):
  return (patch,) * len(spatial) if isinstance(patch, int) else tuple(patch)


def _images(spatial, channels, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *spatial, channels)), jnp.float32)


@pytest.mark.parametrize("spatial,patch,channels", LAYOUTS)
def test_patchify_shape_and_exact_round_trip(spatial, patch, channels):
  x = _images(spatial, channels)
  patches = masking.patchify(x, patch)
  per_axis = _axes(patch, spatial)
  grid = [s // p for s, p in zip(spatial, per_axis)]
  assert patches.shape == (2, math.prod(grid), math.prod(per_axis) * channels)
  np.testing.assert_array_equal(np.asarray(masking.unpatchify(patches, patch, spatial)), np.asarray(x))


def test_patchify_known_layout_2d():
  # One channel, 4 x 6 image of values 10 y + x; patches of (2, 3): a (2, 2) grid, row-major.
  y, x = np.mgrid[:4, :6]
  image = jnp.asarray((10 * y + x)[None, ..., None], jnp.float32)
  patches = np.asarray(masking.patchify(image, (2, 3)))
  np.testing.assert_array_equal(patches[0], [[0, 1, 2, 10, 11, 12], [3, 4, 5, 13, 14, 15],
                                             [20, 21, 22, 30, 31, 32], [23, 24, 25, 33, 34, 35]])


def test_patchify_known_layout_channels_last_3d():
  # (1, 2, 2, 2) image with 2 channels: one patch holds voxel (z, y, x) then channel, channels fastest.
  image = jnp.arange(16, dtype=jnp.float32).reshape(1, 2, 2, 2, 2)
  np.testing.assert_array_equal(np.asarray(masking.patchify(image, 2)), np.arange(16).reshape(1, 1, 16))
  # With patches of (1, 1, 2) the grid is (2, 2, 1): patch n = voxels (z, y, 0..1) with z, y row-major.
  np.testing.assert_array_equal(np.asarray(masking.patchify(image, (1, 1, 2))), np.arange(16).reshape(1, 4, 4))


@pytest.mark.parametrize("spatial,patch,channels", LAYOUTS)
def test_patch_order_agrees_with_vit_patch_embed(spatial, patch, channels):
  per_axis = _axes(patch, spatial)
  x = _images(spatial, channels, seed=1)
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.normal(size=(*per_axis, channels, 5)), jnp.float32)  # as nn.Conv stores it
  bias = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  tokens = PatchEmbed(hidden_size=5, patch_size=per_axis).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  expected = masking.patchify(x, patch) @ kernel.reshape(-1, 5) + bias
  np.testing.assert_allclose(np.asarray(tokens.reshape(2, -1, 5)), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda: masking.patchify(jnp.zeros((1, 6, 5, 1)), (3, 2)),
     "patchify: spatial shape \\(6, 5\\) is not divisible by patch_size \\(3, 2\\)."),
    (lambda: masking.patchify(jnp.zeros((1, 4, 4, 4, 1)), (2, 2)),
     "patchify: patch_size \\(2, 2\\) has 2 entries but there are 3 spatial axes."),
    (lambda: masking.patchify(jnp.zeros((4, 4)), 2), "at least one spatial axis, got shape \\(4, 4\\)"),
    (lambda: masking.unpatchify(jnp.zeros((1, 4, 6)), (2, 3), (4, 7)),
     "unpatchify: spatial shape \\(4, 7\\) is not divisible by patch_size \\(2, 3\\)."),
    (lambda: masking.unpatchify(jnp.zeros((1, 3, 6)), (2, 3), (4, 6)),
     "unpatchify: patches of shape \\(1, 3, 6\\) do not fit spatial shape \\(4, 6\\) and patch_size \\(2, 3\\)"),
    (lambda: masking.unpatchify(jnp.zeros((1, 4, 7)), (2, 3), (4, 6)), "expected \\(B, 4, 6 \\* C\\)"),
])
def test_shape_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize("num_patches,ratio,expected", [
    (10, 0.75, 8),    # 7.5 -> 8
    (10, 0.25, 2),    # 2.5 -> 2: Python's round, ties to even
    (10, 0.0, 0),
    (10, 0.01, 1),    # clipped up: at least one masked
    (10, 0.99, 9),    # clipped down: at least one visible
    (196, 0.75, 147),  # ViT-B/16 at 224^2, MAE's default ratio
    (8, 0.6, 5),      # 4.8 -> 5
    (2, 0.9, 1),
])
def test_num_masked(num_patches, ratio, expected):
  assert masking.num_masked(num_patches, ratio) == expected


@pytest.mark.parametrize("num_patches,ratio,message", [
    (10, 1.0, "mask_ratio must be in \\[0, 1\\), got 1.0."),
    (10, -0.1, "mask_ratio must be in \\[0, 1\\), got -0.1."),
    (0, 0.5, "num_patches must be >= 1, got 0."),
    (1, 0.5, "mask_ratio 0.5 needs at least 2 patches"),
])
def test_num_masked_errors(num_patches, ratio, message):
  with pytest.raises(ValueError, match=message):
    masking.num_masked(num_patches, ratio)


@pytest.mark.parametrize("num_patches,ratio", [(10, 0.75), (10, 0.25), (24, 0.5), (7, 0.01), (7, 0.99), (5, 0.0)])
def test_random_patch_mask_has_the_exact_count_in_every_row(num_patches, ratio):
  mask = masking.random_patch_mask(jax.random.key(3), 16, num_patches, ratio)
  assert mask.shape == (16, num_patches) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), masking.num_masked(num_patches, ratio))


def test_random_patch_mask_rows_differ_and_the_key_decides():
  mask = np.asarray(masking.random_patch_mask(jax.random.key(0), 8, 16, 0.5))
  assert len({row.tobytes() for row in mask}) == 8
  np.testing.assert_array_equal(np.asarray(masking.random_patch_mask(jax.random.key(0), 8, 16, 0.5)), mask)
  assert not np.array_equal(np.asarray(masking.random_patch_mask(jax.random.key(1), 8, 16, 0.5)), mask)


def test_random_patch_mask_is_uniform_over_positions():
  mask = np.asarray(masking.random_patch_mask(jax.random.key(5), 4000, 10, 0.3))
  # Each position is masked with probability 3/10; 4000 rows give a standard error of 0.007.
  np.testing.assert_allclose(mask.mean(axis=0), 0.3, atol=0.03)


def test_random_patch_mask_under_jit():
  key = jax.random.key(7)
  jitted = jax.jit(masking.random_patch_mask, static_argnums=(1, 2, 3))(key, 4, 12, 0.75)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(masking.random_patch_mask(key, 4, 12, 0.75)))
  # A traced key (the train step's fold_in of the step) works too.
  traced = jax.jit(lambda k: masking.random_patch_mask(jax.random.fold_in(k, 1), 4, 12, 0.75))(key)
  np.testing.assert_array_equal(np.asarray(traced).sum(axis=1), 9)


def test_mask_to_voxels_known_map_2d():
  mask = jnp.asarray([[True, False, False, False, False, True]])  # grid (2, 3), patches (2, 1)
  voxels = masking.mask_to_voxels(mask, (2, 3), (2, 1))
  assert voxels.shape == (1, 4, 3, 1) and voxels.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(voxels)[0, ..., 0], [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]])


def test_mask_to_voxels_3d_counts_and_agrees_with_apply_mask():
  mask = masking.random_patch_mask(jax.random.key(2), 3, 2 * 3 * 2, 0.5)
  voxels = masking.mask_to_voxels(mask, (2, 3, 2), (1, 2, 3))
  assert voxels.shape == (3, 2, 6, 6, 1)
  np.testing.assert_array_equal(np.asarray(voxels).sum(axis=(1, 2, 3, 4)), 6 * 1 * 2 * 3)
  ones = jnp.ones((3, 2, 6, 6, 1))
  np.testing.assert_array_equal(np.asarray(voxels), 1 - np.asarray(masking.apply_mask(ones, mask, (1, 2, 3))))


@pytest.mark.parametrize("spatial,patch,channels", LAYOUTS)
def test_apply_mask_keeps_visible_voxels_and_fills_masked_patches(spatial, patch, channels):
  x = _images(spatial, channels, batch=3, seed=4)
  patches = masking.patchify(x, patch)
  n, size = patches.shape[1:]
  mask = masking.random_patch_mask(jax.random.key(1), 3, n, 0.5)
  fill = jnp.arange(size, dtype=jnp.float32) + 100.0
  out = masking.apply_mask(x, mask, patch, fill)
  assert out.shape == x.shape and out.dtype == x.dtype
  visible = np.asarray(masking.mask_to_voxels(mask, [s // p for s, p in zip(spatial, _axes(patch, spatial))],
                                              patch))[..., 0] == 0
  np.testing.assert_array_equal(np.asarray(out)[visible], np.asarray(x)[visible])  # bit-identical
  out_patches, mask = np.asarray(masking.patchify(out, patch)), np.asarray(mask)
  np.testing.assert_array_equal(out_patches[mask], np.broadcast_to(np.asarray(fill), (mask.sum(), size)))
  # The default fill is zeros; a 0/1 mask is the same as a bool mask.
  zeroed = np.asarray(masking.patchify(masking.apply_mask(x, mask.astype(np.float32), patch), patch))
  assert np.all(zeroed[mask] == 0)
  np.testing.assert_array_equal(zeroed[~mask], np.asarray(patches)[~mask])


def test_apply_mask_gradient_reaches_a_learned_fill():
  x = _images((4, 6), 2, batch=2)
  mask = jnp.asarray([[True, False, True, False], [False, False, False, True]])
  grad = jax.grad(lambda f: masking.apply_mask(x, mask, (2, 3), f).sum())(jnp.zeros(12))
  np.testing.assert_array_equal(np.asarray(grad), np.full(12, 3.0))  # three masked patches in the batch


@pytest.mark.parametrize("mask,fill,message", [
    (np.ones((2, 3), bool), None, "apply_mask: mask of shape \\(2, 3\\) does not match the \\(2, 4\\) patches"),
    (np.ones((2, 4), bool), np.zeros(5), "apply_mask: fill must be a scalar or one patch of shape \\(12,\\)"),
])
def test_apply_mask_errors(mask, fill, message):
  with pytest.raises(ValueError, match=message):
    masking.apply_mask(jnp.zeros((2, 4, 6, 2)), mask, (2, 3), fill)
