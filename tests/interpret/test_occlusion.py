"""Occlusion against a numpy reference on linear models (2D, 3D, overlapping and edge-clipped windows)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.interpret.occlusion import occlusion, window_starts
from medjax.interpret.targets import RegionTarget
from tests.interpret.test_gradients import Linear, SegConv


def _starts(size, window, stride):
  """Windows slide from 0 by `stride` until one reaches the edge (the last may run past it and is clipped)."""
  starts = [0]
  while starts[-1] + window < size:
    starts.append(starts[-1] + stride)
  return starts


def _reference(weights, images, target, window, stride, baseline):
  """Per position: the mean over the windows containing it of the linear score's drop, sum of w * (x - baseline) over
  the (clipped) window and all channels."""
  images = np.asarray(images, np.float64)
  spatial = images.shape[1:-1]
  total = np.zeros(images.shape[:-1])
  counts = np.zeros(spatial)
  for b, t in enumerate(np.asarray(target)):
    contribution = (weights[:, t].reshape(images.shape[1:]) * (images[b] - baseline)).sum(-1)
    for start in itertools.product(*[_starts(n, w, s) for n, w, s in zip(spatial, window, stride)]):
      box = tuple(slice(a, a + w) for a, w in zip(start, window))
      total[b][box] += contribution[box].sum()
      if b == 0:
        counts[box] += 1
  return total / counts


def _linear(shape, seed=0):
  model = Linear()
  images = jax.random.normal(jax.random.key(seed), shape)
  variables = model.init(jax.random.key(seed + 1), images)
  return model, variables, images, np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)


def test_window_starts_follow_captum():
  assert list(window_starts(8, 3, 2)) == [0, 2, 4, 6]  # the last window (6..8) is clipped at the edge
  assert list(window_starts(7, 3, 2)) == [0, 2, 4]
  assert list(window_starts(6, 3, 3)) == [0, 3]
  assert list(window_starts(5, 5, 1)) == [0]
  for size, window, stride in itertools.product(range(1, 9), range(1, 9), range(1, 9)):
    if window <= size and (stride <= window or window == size):
      assert list(window_starts(size, window, stride)) == _starts(size, window, stride)
  with pytest.raises(ValueError, match="exceeds the window"):
    window_starts(8, 2, 3)
  with pytest.raises(ValueError, match="exceeds the input size"):
    window_starts(3, 4, 1)


@pytest.mark.parametrize("shape,window,stride,baseline,batch_size", [
    ((2, 7, 8, 2), 3, 2, 0.0, 64),  # overlaps, and 8 is not reached by 3 + 2k: the last window is clipped
    ((2, 7, 8, 2), (2, 3), (1, 3), 0.5, 6),  # per-axis window/stride, several chunks with padding
    ((2, 6, 6, 1), 3, None, 0.0, 4),  # default stride: non-overlapping tiles
    ((2, 5, 4, 6, 2), (2, 3, 4), (1, 2, 3), -1.0, 16),  # 3D, overlaps and clipping on every axis
])
def test_linear_occlusion_matches_the_reference(shape, window, stride, baseline, batch_size):
  model, variables, images, weights = _linear(shape)
  target = jnp.array([2, 0])
  spatial = shape[1:-1]
  window_t = (window,) * len(spatial) if isinstance(window, int) else window
  stride_t = window_t if stride is None else (stride,) * len(spatial) if isinstance(stride, int) else stride
  maps = occlusion(model, variables, images, target, window=window, stride=stride, baseline=baseline,
                   batch_size=batch_size)
  assert maps.shape == shape[:-1] and maps.dtype == jnp.float32
  np.testing.assert_allclose(maps, _reference(weights, images, target, window_t, stride_t, baseline), rtol=1e-4,
                             atol=1e-5)


def test_array_baseline_and_region_target():
  model = SegConv()
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  variables = model.init(jax.random.key(1), images)
  mask = jnp.zeros((2, 8, 8)).at[:, 2:4, 1:3].set(1.0)
  target = RegionTarget(mask, 0)
  maps = occlusion(model, variables, images, target, window=2, stride=1, baseline=images.mean(axis=(1, 2),
                                                                                              keepdims=True))
  assert maps.shape == (2, 8, 8)
  # The 3x3 head reads rows 1..4 and columns 0..3 for the region: every window over row or column >= 6 lies
  # outside them and changes nothing.
  np.testing.assert_allclose(maps[:, 6:, :], 0.0, atol=1e-6)
  np.testing.assert_allclose(maps[:, :, 6:], 0.0, atol=1e-6)
  assert np.abs(np.asarray(maps[:, 2:4, 1:3])).min() > 0


def test_rejects_a_window_per_axis_mismatch():
  model, variables, images, _ = _linear((2, 4, 4, 1))
  with pytest.raises(ValueError, match="one value per spatial axis"):
    occlusion(model, variables, images, jnp.array([0, 1]), window=(2, 2, 2))
