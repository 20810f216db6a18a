"""Reconstruction losses (medjax.losses.reconstruction): hand values, masked-only dependence, dtypes, 1 vs 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.losses import reconstruction
from medjax.losses.reconstruction import masked_patch_loss, restoration_loss


def _by_hand(pred, target, mask, norm_pix=False, eps=1e-6):
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  values = []
  for b in range(len(pred)):
    terms = []
    for n in range(pred.shape[1]):
      if mask[b][n]:
        t = target[b, n]
        if norm_pix:
          t = (t - t.mean()) / np.sqrt(((t - t.mean()) ** 2).mean() + eps)
        terms.append(np.mean((pred[b, n] - t) ** 2))
    values.append(np.mean(terms) if terms else 0.0)
  return np.array(values)


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mask(batch, num_patches, count, seed):
  """`count` True per row at random positions (numpy; the losses test imports no pretext module)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, num_patches), bool)
  for row in mask:
    row[rng.permutation(num_patches)[:count]] = True
  return mask


def test_equals_the_hand_computed_value_on_a_tiny_example():
  pred = np.array([[[1.0, 2.0], [5.0, 5.0], [3.0, 3.0]],
                   [[0.0, 0.0], [1.0, -1.0], [0.0, 4.0]]], np.float32)
  target = np.zeros_like(pred)
  mask = np.array([[True, False, True], [False, True, False]])
  value = np.asarray(masked_patch_loss(pred, target, mask))
  # Example 0: patches 0 and 2 count, (1 + 4) / 2 = 2.5 and 9; example 1: patch 1, (1 + 1) / 2 = 1.
  np.testing.assert_array_equal(value, [(2.5 + 9.0) / 2, 1.0])
  assert value.dtype == np.float32


def test_norm_pix_equals_the_hand_computed_value_on_a_tiny_example():
  target = np.array([[[1.0, 3.0], [2.0, 2.0]]], np.float32)
  pred = np.array([[[0.0, 0.0], [1.0, 0.0]]], np.float32)
  value = float(masked_patch_loss(pred, target, np.array([[True, True]]), norm_pix=True, eps=1e-6)[0])
  # Patch 0: mean 2, var 1 -> target (-1, 1) / sqrt(1 + 1e-6); patch 1: var 0 -> target (0, 0).
  s = 1 / np.sqrt(1 + 1e-6)
  expected = ((s ** 2 + s ** 2) / 2 + (1 + 0) / 2) / 2
  assert value == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_matches_numpy_on_random_patches(norm_pix):
  pred, target = _random((4, 6, 5), 0), 3.0 * _random((4, 6, 5), 1) + 2.0
  mask = _mask(4, 6, 3, 2)
  mask[3] = False  # an all-visible row
  value = np.asarray(masked_patch_loss(pred, target, mask, norm_pix=norm_pix))
  np.testing.assert_allclose(value, _by_hand(pred, target, mask, norm_pix), rtol=1e-5)
  assert value[3] == 0.0


@pytest.mark.parametrize("norm_pix", [False, True])
def test_visible_predictions_do_not_change_the_loss_but_masked_ones_do(norm_pix):
  """Acceptance test: only the masked patches' predictions count, bit for bit."""
  pred, target, mask = _random((4, 8, 6), 3), _random((4, 8, 6), 4), _mask(4, 8, 6, 5)
  loss = jax.jit(functools.partial(masked_patch_loss, norm_pix=norm_pix))
  base = np.asarray(loss(pred, target, mask))
  for seed, amount in enumerate([1e-3, -7.0, 1e30, np.inf, np.nan]):
    changed = np.where(mask[..., None], pred, pred + amount * _random(pred.shape, 10 + seed))
    np.testing.assert_array_equal(np.asarray(loss(changed, target, mask)), base)
    np.testing.assert_array_equal(np.asarray(masked_patch_loss(changed, target, mask, norm_pix=norm_pix)),
                                  np.asarray(masked_patch_loss(pred, target, mask, norm_pix=norm_pix)))
  b, n = 2, int(np.argmax(mask[2]))
  changed = pred.copy()
  changed[b, n, 0] += 0.5
  new = np.asarray(loss(changed, target, mask))
  assert new[b] != base[b]
  np.testing.assert_array_equal(np.delete(new, b), np.delete(base, b))  # the other examples are untouched
  # The gradient is exactly zero on visible patches and nonzero on masked ones.
  grad = np.asarray(jax.grad(lambda p: loss(p, target, mask).sum())(jnp.asarray(pred)))
  assert np.all(grad[~mask] == 0) and np.all(np.abs(grad[mask]).sum(axis=-1) > 0)


def test_an_all_visible_row_gives_zero_and_a_finite_gradient():
  pred, target = _random((2, 4, 3), 6), _random((2, 4, 3), 7)
  mask = np.array([[False] * 4, [True, False, True, False]])
  value = np.asarray(masked_patch_loss(pred, target, mask, norm_pix=True))
  assert value[0] == 0.0 and np.isfinite(value[1]) and value[1] > 0
  grad = jax.grad(lambda p: masked_patch_loss(p, target, mask).sum())(jnp.asarray(pred))
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[0] == 0)
  np.testing.assert_array_equal(np.asarray(masked_patch_loss(pred, target, np.zeros((2, 4), bool))), [0.0, 0.0])


def test_a_zero_one_mask_is_the_same_as_a_bool_mask():
  pred, target, mask = _random((3, 5, 4), 8), _random((3, 5, 4), 9), _mask(3, 5, 2, 10)
  np.testing.assert_array_equal(np.asarray(masked_patch_loss(pred, target, mask.astype(np.float32))),
                                np.asarray(masked_patch_loss(pred, target, mask)))
  np.testing.assert_array_equal(np.asarray(masked_patch_loss(pred, target, mask.astype(np.int32))),
                                np.asarray(masked_patch_loss(pred, target, mask)))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_bfloat16_inputs_give_float32_values(norm_pix):
  pred, target, mask = _random((2, 4, 8), 11), _random((2, 4, 8), 12), _mask(2, 4, 3, 13)
  pred16, target16 = jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16)
  value = masked_patch_loss(pred16, target16, mask, norm_pix=norm_pix)
  assert value.dtype == jnp.float32
  expected = _by_hand(np.asarray(pred16, np.float32), np.asarray(target16, np.float32), mask, norm_pix)
  np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-5)


@pytest.mark.parametrize("pred,target,mask", [
    ((2, 4, 3), (2, 4, 5), (2, 4)),
    ((2, 4, 3), (2, 4, 3), (2, 3)),
    ((2, 12), (2, 12), (2, 12)),
])
def test_masked_patch_loss_shape_errors(pred, target, mask):
  message = (f"masked_patch_loss: pred and target must both be (B, N, P) and mask (B, N), got pred {pred}, "
             f"target {target} and mask {mask}.").replace("(", "\\(").replace(")", "\\)")
  with pytest.raises(ValueError, match=message):
    masked_patch_loss(np.zeros(pred), np.zeros(target), np.zeros(mask, bool))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_one_and_eight_devices_give_the_same_value(norm_pix):
  pred, target, mask = _random((16, 6, 4), 14), _random((16, 6, 4), 15), _mask(16, 6, 4, 16)
  loss = functools.partial(masked_patch_loss, norm_pix=norm_pix)
  single = jax.jit(loss)(pred, target, mask)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  inputs = [jax.device_put(jnp.asarray(a), sharding) for a in (pred, target, mask)]
  sharded = jax.jit(loss, out_shardings=sharding)(*inputs)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(single), _by_hand(pred, target, mask, norm_pix), rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 2, 1), (2, 2, 4, 1, 2)])  # 8 and 16 values: exact means
def test_restoration_loss_hand_values(shape):
  target = np.zeros(shape, np.float32)
  pred = target.copy()
  pred[0].flat[0], pred[0].flat[1] = 2.0, -1.0  # example 0: two wrong values; example 1: perfect
  size = np.prod(shape[1:])
  np.testing.assert_array_equal(np.asarray(restoration_loss(pred, target)), [5.0 / size, 0.0])
  np.testing.assert_array_equal(np.asarray(restoration_loss(pred, target, kind="mse")), [5.0 / size, 0.0])
  np.testing.assert_array_equal(np.asarray(restoration_loss(pred, target, kind="l1")), [3.0 / size, 0.0])


def test_restoration_loss_matches_numpy_and_is_float32_for_bfloat16():
  pred, target = _random((3, 4, 5, 2), 17), _random((3, 4, 5, 2), 18)
  np.testing.assert_allclose(np.asarray(restoration_loss(pred, target)), ((pred - target) ** 2).mean(axis=(1, 2, 3)),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(restoration_loss(pred, target, kind="l1")),
                             np.abs(pred - target).mean(axis=(1, 2, 3)), rtol=1e-6)
  value = restoration_loss(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16), kind="l1")
  assert value.dtype == jnp.float32


@pytest.mark.parametrize("kwargs,shapes,message", [
    (dict(kind="huber"), ((2, 4, 1), (2, 4, 1)),
     "restoration_loss: kind must be one of \\('mse', 'l1'\\), got 'huber'."),
    ({}, ((2, 4, 1), (2, 4, 2)),
     "restoration_loss: pred and target must have the same \\(B, \\*spatial, C\\) shape, got \\(2, 4, 1\\) and "
     "\\(2, 4, 2\\)."),
])
def test_restoration_loss_errors(kwargs, shapes, message):
  with pytest.raises(ValueError, match=message):
    reconstruction.restoration_loss(np.zeros(shapes[0]), np.zeros(shapes[1]), **kwargs)
