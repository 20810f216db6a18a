"""Tests for medjax.pretext.corruptions: Models Genesis corruptions and rotation prediction, 2D and 3D."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.pretext import corruptions
from medjax.pretext.corruptions import (genesis_corrupt, in_painting, local_pixel_shuffle, nonlinear_intensity,
                                        num_rotation_classes, out_painting, random_rotations, rotate)

SHAPES = {2: (7, 10), 3: (5, 6, 7)}  # non-square on purpose (rotation tests use square planes)
BLOCKS = {2: (2, 3), 3: (2, 2, 3)}  # neither shape is divisible: the last row/column stays uncovered
DIMS = [2, 3]


def _images(dims, batch=3, channels=2, seed=0):
  """Float32 (B, *S, C) with distinct values and a different range per example."""
  x = np.random.default_rng(seed).normal(size=(batch,) + SHAPES[dims] + (channels,))
  x = x * np.arange(1, batch + 1).reshape((batch,) + (1,) * (dims + 1)) + np.arange(batch).reshape(
      (batch,) + (1,) * (dims + 1))
  return jnp.asarray(x, jnp.float32)


# Options that make every stage fire, so different keys give different outputs.
CASES = {
    "nonlinear": (nonlinear_intensity, dict(prob=1.0)),
    "shuffle": (local_pixel_shuffle, dict(prob=1.0, block_size=2, fraction=0.5)),
    "in_painting": (in_painting, dict()),
    "out_painting": (out_painting, dict()),
    "genesis": (genesis_corrupt, dict(shuffle_prob=1.0, nonlinear_prob=1.0, paint_prob=1.0, inpaint_rate=0.5)),
}


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("name", list(CASES))
def test_deterministic(name, dims):
  fn, kwargs = CASES[name]
  x = _images(dims)
  out = fn(jax.random.key(0), x, **kwargs)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, fn(jax.random.key(0), x, **kwargs))
  assert not np.allclose(out, fn(jax.random.key(1), x, **kwargs))
  assert not np.allclose(out, x)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("name", list(CASES))
def test_jit_matches_eager(name, dims):
  """The public functions jit themselves; wrapped in an outer jit (inlined, fused anew) they agree."""
  fn, kwargs = CASES[name]
  x = _images(dims)
  jitted = jax.jit(functools.partial(fn, **kwargs))(jax.random.key(0), x)
  np.testing.assert_allclose(jitted, fn(jax.random.key(0), x, **kwargs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("name", list(CASES))
def test_examples_are_independent(name, dims):
  fn, kwargs = CASES[name]
  x = _images(dims)
  other = x.at[2].set(x[2] * 7.0 - 3.0)
  a, b = fn(jax.random.key(3), x, **kwargs), fn(jax.random.key(3), other, **kwargs)
  np.testing.assert_array_equal(a[:2], b[:2])
  assert not np.allclose(a[2], b[2])


# ---------------------------------------------------------------------------------------- nonlinear

@pytest.mark.parametrize("dims", DIMS)
def test_nonlinear_intensity_monotonic_and_keeps_range(dims):
  x = _images(dims)
  directions = set()
  for seed in range(6):
    out = np.asarray(nonlinear_intensity(jax.random.key(seed), x, prob=1.0))
    for xi, oi in zip(np.asarray(x), out):
      assert oi.min() == xi.min() and oi.max() == xi.max()  # exact: the end points map to the end points
      mapped = oi.ravel()[np.argsort(xi.ravel())]
      steps = np.diff(mapped)
      increasing = bool(np.all(steps >= -1e-5))
      assert increasing or np.all(steps <= 1e-5), "order neither kept nor reversed"
      directions.add(increasing)
  assert directions == {True, False}  # both directions are drawn


def test_nonlinear_known_curves():
  """Inner control points (1/3, 1/3), (2/3, 2/3) make the straight line: identity, or min + max - x reversed."""
  x = _images(2)[0]
  line = [0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3]
  one = jax.jit(functools.partial(corruptions._nonlinear_one, prob=0.9))
  same = one(jnp.array(line + [0.2]), x)
  np.testing.assert_allclose(same, x, atol=2e-5)
  flipped = one(jnp.array(line + [0.7]), x)
  np.testing.assert_allclose(flipped, x.min() + x.max() - x, atol=2e-5)
  unchanged = one(jnp.array([0.95] + line[1:] + [0.7]), x)  # 0.95 >= prob: does not fire
  np.testing.assert_array_equal(unchanged, x)


@pytest.mark.parametrize("dims", DIMS)
def test_nonlinear_constant_image_and_prob_zero(dims):
  const = jnp.full((2,) + SHAPES[dims] + (1,), 3.5, jnp.float32)
  out = nonlinear_intensity(jax.random.key(0), const, prob=1.0)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, const)
  x = _images(dims)
  np.testing.assert_array_equal(nonlinear_intensity(jax.random.key(0), x, prob=0.0), x)


@pytest.mark.parametrize("name", ["nonlinear", "shuffle"])
def test_prob_fires_per_example(name):
  fn, kwargs = CASES[name]
  x = _images(2, batch=8)
  out = fn(jax.random.key(0), x, **{**kwargs, "prob": 0.5})
  same = [bool(np.array_equal(out[i], x[i])) for i in range(8)]
  assert 0 < sum(same) < 8, same
  full = fn(jax.random.key(0), x, **kwargs)  # prob=1: same numbers, every example fires
  for i in range(8):
    np.testing.assert_array_equal(out[i], x[i] if same[i] else full[i])


# ------------------------------------------------------------------------------------------ shuffle

def _blocks(a, blocks):
  """(*S, C) -> list of (index, values (V, C)) over the whole blocks from the origin."""
  grid = [n // b for n, b in zip(a.shape[:-1], blocks)]
  out = []
  for index in np.ndindex(*grid):
    sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, blocks))
    out.append((sl, a[sl].reshape(-1, a.shape[-1])))
  return out


@pytest.mark.parametrize("dims", DIMS)
def test_local_pixel_shuffle_permutes_within_chosen_blocks(dims):
  x = np.asarray(_images(dims, channels=1))
  x = np.concatenate([x, 10.0 * x + 1.0], axis=-1)  # channel 1 is a function of channel 0
  blocks = BLOCKS[dims]
  out = np.asarray(local_pixel_shuffle(jax.random.key(0), jnp.asarray(x), prob=1.0, block_size=blocks,
                                       fraction=0.5))
  covered = tuple(slice(0, (n // b) * b) for n, b in zip(SHAPES[dims], blocks))
  num_blocks = math.prod(n // b for n, b in zip(SHAPES[dims], blocks))
  for xi, oi in zip(x, out):
    outside = np.ones(xi.shape, bool)
    outside[covered] = False
    np.testing.assert_array_equal(oi[outside], xi[outside])  # the uncovered rim never moves
    np.testing.assert_array_equal(oi[..., 1], 10.0 * oi[..., 0] + 1.0)  # channels move together
    changed = 0
    for (_, before), (_, after) in zip(_blocks(xi, blocks), _blocks(oi, blocks)):
      np.testing.assert_array_equal(np.sort(after[:, 0]), np.sort(before[:, 0]))
      changed += not np.array_equal(after, before)
    assert changed == round(0.5 * num_blocks)


@pytest.mark.parametrize("dims", DIMS)
def test_local_pixel_shuffle_prob_zero_and_default_blocks(dims):
  x = _images(dims)
  np.testing.assert_array_equal(local_pixel_shuffle(jax.random.key(0), x, prob=0.0, block_size=2), x)
  big = jnp.tile(x, (1,) + (2,) * dims + (1,))  # (14, 20) or (10, 12, 14): default blocks n // 8
  default = local_pixel_shuffle(jax.random.key(5), big, prob=1.0)
  explicit = local_pixel_shuffle(jax.random.key(5), big, prob=1.0, block_size=[n // 8 or 1 for n in big.shape[1:-1]])
  np.testing.assert_array_equal(default, explicit)


def test_local_pixel_shuffle_errors():
  x = _images(2)
  with pytest.raises(ValueError, match=r"local_pixel_shuffle: block_size \(8, 3\) must be one int or one per spatial axis, each in \[1, axis size\], for spatial shape \(7, 10\)\."):
    local_pixel_shuffle(jax.random.key(0), x, block_size=(8, 3))
  with pytest.raises(ValueError, match=r"block_size \(2, 2, 2\) must be one int or one per spatial axis"):
    local_pixel_shuffle(jax.random.key(0), x, block_size=(2, 2, 2))
  with pytest.raises(ValueError, match=r"local_pixel_shuffle: fraction must be in \[0, 1\], got 1.5\."):
    local_pixel_shuffle(jax.random.key(0), x, fraction=1.5)


# ----------------------------------------------------------------------------------------- painting

def _changed(x, out):
  """Spatial mask (*S) of voxels where any channel changed."""
  return np.any(np.asarray(out) != np.asarray(x), axis=-1)


def _bounding_box(mask):
  idx = np.nonzero(mask)
  return tuple(slice(i.min(), i.max() + 1) for i in idx)


@pytest.mark.parametrize("dims", DIMS)
def test_in_painting_one_box(dims):
  x = _images(dims)
  out = np.asarray(in_painting(jax.random.key(0), x, num_boxes=1, max_fraction=0.5))
  for xi, oi in zip(np.asarray(x), out):
    changed = _changed(xi, oi)
    box = _bounding_box(changed)
    assert changed[box].all() and changed.sum() == changed[box].size  # exactly one box
    assert np.all(oi[box] != xi[box])  # every channel inside is noise
    for sl, n in zip(box, SHAPES[dims]):
      assert 1 <= sl.stop - sl.start <= max(1, math.floor(0.5 * n))
    assert oi.min() >= xi.min() and oi.max() <= xi.max()


@pytest.mark.parametrize("dims", DIMS)
def test_in_painting_boxes_stay_small_and_in_range(dims):
  x = _images(dims)
  out = np.asarray(in_painting(jax.random.key(1), x))  # 5 boxes, sides <= floor(0.3 n)
  limit = 5 * math.prod(max(1, math.floor(0.3 * n)) for n in SHAPES[dims])
  for xi, oi in zip(np.asarray(x), out):
    assert 0 < _changed(xi, oi).sum() <= limit
    assert oi.min() >= xi.min() and oi.max() <= xi.max()


@pytest.mark.parametrize("dims", DIMS)
def test_out_painting_keeps_one_box(dims):
  x = _images(dims)
  out = np.asarray(out_painting(jax.random.key(0), x, min_fraction=0.4, max_fraction=0.8))
  for xi, oi in zip(np.asarray(x), out):
    kept = np.all(oi == xi, axis=-1)
    box = _bounding_box(kept)
    assert kept[box].all() and kept.sum() == kept[box].size  # the kept voxels form one box
    outside = np.ones(kept.shape, bool)
    outside[box] = False
    assert np.all(oi[outside] != xi[outside])  # every voxel and channel outside is noise
    for sl, n in zip(box, SHAPES[dims]):
      assert math.ceil(0.4 * n) <= sl.stop - sl.start <= math.floor(0.8 * n)
    assert oi.min() >= xi.min() and oi.max() <= xi.max()


def test_painting_errors():
  x = _images(2)
  with pytest.raises(ValueError, match=r"in_painting: need num_boxes >= 1 and max_fraction in \(0, 1\], got 0 and 0.3\."):
    in_painting(jax.random.key(0), x, num_boxes=0)
  with pytest.raises(ValueError, match=r"out_painting: need 0 < min_fraction <= max_fraction <= 1, got 0.9 and 0.5\."):
    out_painting(jax.random.key(0), x, min_fraction=0.9, max_fraction=0.5)


# ------------------------------------------------------------------------------------------ genesis

OFF = dict(shuffle_prob=0.0, nonlinear_prob=0.0, paint_prob=0.0)
STAGES = {  # genesis options with one stage on -> (stage function, its options, fold_in index)
    "none": (OFF, None, None, None),
    "shuffle": ({**OFF, "shuffle_prob": 1.0}, local_pixel_shuffle, dict(prob=1.0), 0),
    "nonlinear": ({**OFF, "nonlinear_prob": 1.0}, nonlinear_intensity, dict(prob=1.0), 1),
    "in_painting": ({**OFF, "paint_prob": 1.0, "inpaint_rate": 1.0}, in_painting, dict(), 3),
    "out_painting": ({**OFF, "paint_prob": 1.0, "inpaint_rate": 0.0}, out_painting, dict(), 4),
}


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_genesis_stages_use_folded_keys(stage, dims):
  shape = (16, 18) if dims == 2 else (16, 16, 17)  # default shuffle blocks (n // 8) of 2 voxels
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2,) + shape + (1,)), jnp.float32)
  key = jax.random.key(4)
  options, fn, kwargs, index = STAGES[stage]
  out = genesis_corrupt(key, x, **options)
  expected = x if fn is None else fn(jax.random.fold_in(key, index), x, **kwargs)
  np.testing.assert_array_equal(out, expected)
  assert fn is None or not np.array_equal(out, x)


def test_genesis_mixes_in_and_out_painting_per_example():
  x, key = _images(2, batch=8), jax.random.key(2)
  fold = functools.partial(jax.random.fold_in, key)
  out = genesis_corrupt(key, x, shuffle_prob=0.0, nonlinear_prob=0.0, paint_prob=0.75, inpaint_rate=0.5)
  inp, outp = in_painting(fold(3), x), out_painting(fold(4), x)
  kinds = []
  for i in range(8):
    matches = [name for name, ref in (("none", x), ("in", inp), ("out", outp)) if np.array_equal(out[i], ref[i])]
    assert len(matches) == 1
    kinds.append(matches[0])
  assert set(kinds) == {"none", "in", "out"}, kinds


def test_genesis_bfloat16_dtype():
  x = _images(3).astype(jnp.bfloat16)
  out = genesis_corrupt(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, genesis_corrupt(jax.random.key(0), x))


def test_input_errors():
  with pytest.raises(ValueError, match=r"genesis_corrupt: images must be \(B, H, W, C\) or \(B, D, H, W, C\), got shape \(7, 10, 1\)\."):
    genesis_corrupt(jax.random.key(0), jnp.zeros((7, 10, 1)))
  with pytest.raises(ValueError, match=r"in_painting: images must be floating point, got dtype int32\."):
    in_painting(jax.random.key(0), jnp.zeros((1, 7, 10, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"nonlinear_intensity: prob must be in \[0, 1\], got -0.1\."):
    nonlinear_intensity(jax.random.key(0), _images(2), prob=-0.1)


# ----------------------------------------------------------------------------------------- rotation

def _cube(batch=2, size=4, channels=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch,) + (size,) * 3 + (channels,)), jnp.float32)


def test_num_rotation_classes():
  assert (num_rotation_classes(2), num_rotation_classes(3)) == (4, 10)
  with pytest.raises(ValueError, match=r"num_rotation_classes: spatial_dims must be 2 or 3, got 4\."):
    num_rotation_classes(4)


def test_rotate_2d_matches_rot90():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 5, 2)), jnp.float32)
  out = np.asarray(rotate(x, jnp.array([0, 1, 2, 3])))
  for k in range(4):
    np.testing.assert_array_equal(out[k], np.rot90(np.asarray(x[k]), k, axes=(0, 1)))
  once = jnp.ones(4, jnp.int32)
  y = x
  for _ in range(4):
    y = rotate(y, once)
  np.testing.assert_array_equal(y, x)
  assert not np.array_equal(rotate(x, once), x)


def test_rotate_3d_classes():
  x = _cube(batch=1)
  outs = np.asarray(rotate(jnp.repeat(x, 10, axis=0), jnp.arange(10)))
  ref = np.asarray(x[0])
  np.testing.assert_array_equal(outs[0], ref)
  planes = [(1, 2), (0, 2), (0, 1)]
  for c in range(1, 10):
    a, k = divmod(c - 1, 3)
    np.testing.assert_array_equal(outs[c], np.rot90(ref, k + 1, axes=planes[a]))
    np.testing.assert_array_equal(np.sort(outs[c].ravel()), np.sort(ref.ravel()))  # a true rotation
  flat = outs.reshape(10, -1)
  assert len({row.tobytes() for row in flat}) == 10  # all classes differ


@pytest.mark.parametrize("dims", DIMS)
def test_random_rotations(dims):
  x = _cube(batch=16)[:, 0] if dims == 2 else _cube(batch=16)
  out, classes = random_rotations(jax.random.key(0), x)
  assert classes.shape == (16,) and classes.dtype == jnp.int32
  assert int(classes.min()) >= 0 and int(classes.max()) < num_rotation_classes(dims)
  assert len(set(np.asarray(classes).tolist())) > 2
  np.testing.assert_array_equal(out, rotate(x, classes))
  again, classes_again = jax.jit(random_rotations)(jax.random.key(0), x)
  np.testing.assert_array_equal(classes_again, classes)
  np.testing.assert_array_equal(again, out)
  assert not np.array_equal(random_rotations(jax.random.key(1), x)[1], classes)


def test_rotate_errors_and_out_of_range():
  with pytest.raises(ValueError, match=r"rotate: 90-degree rotations need square planes, but the \(y, x\) plane of images with shape \(2, 7, 10, 2\) is 7 x 10\."):
    rotate(_images(2, batch=2), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"rotate: 90-degree rotations need square planes, but the \(z, x\) plane of images with shape \(1, 3, 4, 4, 1\) is 3 x 4\."):
    rotate(jnp.zeros((1, 3, 4, 4, 1)), jnp.zeros(1, jnp.int32))
  with pytest.raises(ValueError, match=r"random_rotations: images must be \(B, H, W, C\)"):
    random_rotations(jax.random.key(0), jnp.zeros((4, 4, 1)))
  with pytest.raises(ValueError, match=r"rotate: classes must be int \(2,\), got float32 \(2,\)\."):
    rotate(_cube(), jnp.zeros(2))
  out = rotate(_cube(), jnp.array([0, 10]))
  assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[0]))
