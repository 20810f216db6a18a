"""Sliding-window inference, flip TTA, ensembles and largest-component filtering (medjax.inference)."""

import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import inference
from medjax.inference import sliding_window

Partial = jax.tree_util.Partial


def _pointwise(weights):
  """A 1x1 'network' C -> K: x @ weights (exactly position- and flip-equivariant)."""
  return Partial(lambda w, x: x @ w, jnp.asarray(weights, jnp.float32))


def _image(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


CASES = [  # (image shape (B, *spatial, C), non-cubic roi)
  ((2, 23, 17, 1), (8, 6)),
  ((1, 13, 11, 9, 2), (6, 4, 5)),
]


@pytest.mark.parametrize("shape,roi", CASES, ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_pointwise_model_stitches_to_whole_volume(shape, roi, mode):
  weights = np.arange(1, 1 + 3 * shape[-1], dtype=np.float32).reshape(shape[-1], 3) / 4 - 1
  image = _image(shape)
  out = inference.sliding_window_inference(_pointwise(weights), image, roi_size=roi, overlap=0.5, mode=mode,
                                           window_batch=3)
  assert out.shape == shape[:-1] + (3,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, image @ weights, rtol=1e-5, atol=1e-6)


def _interior_mask(spatial, roi, overlap, margin):
  """Voxels that every covering window sees at least `margin` voxels from any face not on the volume border."""
  good = np.ones(spatial, bool)
  for origin in inference.window_origins(spatial, roi, overlap):
    inner = np.zeros(spatial, bool)
    cover = np.zeros(spatial, bool)
    cover[tuple(slice(o, o + r) for o, r in zip(origin, roi))] = True
    lo = [o if o == 0 else o + margin for o in origin]
    hi = [o + r if o + r == s else o + r - margin for o, r, s in zip(origin, roi, spatial)]
    inner[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    good &= ~cover | inner
  return good


@pytest.mark.parametrize("spatial,roi", [((19, 14), (8, 6)), ((12, 10, 9), (6, 5, 4))], ids=["2d", "3d"])
def test_conv_model_matches_whole_volume_away_from_window_borders(spatial, roi):
  nd = len(spatial)
  model = nn.Conv(2, (3,) * nd, padding="SAME")
  image = _image((1,) + spatial + (1,), seed=1)
  variables = model.init(jax.random.PRNGKey(0), image)
  whole = model.apply(variables, image)
  predict_fn = inference.make_predict_fn(lambda v, x, train: model.apply(v, x), variables, output="logits")
  out = inference.sliding_window_inference(predict_fn, image, roi_size=roi, overlap=0.5, window_batch=4)
  good = _interior_mask(spatial, roi, 0.5, margin=1)
  assert 0.1 < good.mean() < 1.0  # the check covers many voxels, and the window borders really matter
  np.testing.assert_allclose(np.asarray(out[0])[good], np.asarray(whole[0])[good], rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(out[0])[~good], np.asarray(whole[0])[~good], atol=1e-3)


@pytest.mark.parametrize("shape,roi", [((1, 5, 3, 1), (8, 6)), ((2, 3, 9, 4, 1), (6, 4, 5))], ids=["2d", "3d"])
@pytest.mark.parametrize("pad_mode", ["constant", "edge"])
def test_volume_smaller_than_roi_is_padded_and_cropped_back(shape, roi, pad_mode):
  image = _image(shape, seed=2)
  out = inference.sliding_window_inference(_pointwise([[2.0, -1.0]]), image, roi_size=roi, pad_mode=pad_mode)
  assert out.shape == shape[:-1] + (2,)
  np.testing.assert_allclose(out, image @ jnp.asarray([[2.0, -1.0]]), rtol=1e-5, atol=1e-6)


def test_padding_value_reaches_the_network():
  """A model that sees the mean of its window reveals what the padding was: zeros vs edge copies."""
  window_mean = Partial(lambda x: jnp.broadcast_to(jnp.mean(x, axis=(1, 2), keepdims=True), x.shape))
  image = jnp.ones((1, 2, 4, 1))
  zero_padded = inference.sliding_window_inference(window_mean, image, roi_size=(4, 4), pad_mode="constant")
  edge_padded = inference.sliding_window_inference(window_mean, image, roi_size=(4, 4), pad_mode="edge")
  np.testing.assert_allclose(zero_padded, 0.5)
  np.testing.assert_allclose(edge_padded, 1.0)


def test_window_starts_regular_grid_with_last_window_flush():
  assert inference.window_starts(20, 8, 0.5) == (0, 4, 8, 12)
  assert inference.window_starts(21, 8, 0.5) == (0, 4, 8, 12, 13)
  assert inference.window_starts(8, 8, 0.5) == (0,)
  assert inference.window_starts(10, 4, 0.0) == (0, 4, 6)
  assert inference.window_origins((9, 20), (9, 8), 0.75) == [(0, s) for s in (0, 2, 4, 6, 8, 10, 12)]
  with pytest.raises(ValueError, match="shorter than the window"):
    inference.window_starts(5, 8, 0.5)


@pytest.mark.parametrize("roi", [(9, 6), (7, 10, 4)])
def test_gaussian_map_is_symmetric_positive_and_peaked(roi):
  weights = inference.gaussian_importance_map(roi, sigma_scale=0.125)
  assert weights.shape == roi and weights.dtype == np.float32
  assert np.all(weights >= inference.MIN_IMPORTANCE)
  for axis in range(len(roi)):
    np.testing.assert_array_equal(weights, np.flip(weights, axis))
  assert weights.max() == pytest.approx(1.0)
  # Along the first axis (odd size: exact centre voxel), one sigma = roi/8 voxels away falls to exp(-1/2).
  centre = tuple((r - 1) // 2 for r in roi)
  profile = weights[(slice(None),) + centre[1:]] / weights[centre]
  sigma = 0.125 * roi[0]
  offsets = np.arange(roi[0]) - (roi[0] - 1) / 2
  np.testing.assert_allclose(profile, np.maximum(np.exp(-0.5 * (offsets / sigma) ** 2), 1e-6), rtol=1e-5)
  # A narrow Gaussian would underflow in the corners; the floor keeps it positive.
  assert inference.gaussian_importance_map((16, 16, 16), sigma_scale=0.02).min() == np.float32(1e-6)


def test_gaussian_blending_weights_window_centres():
  """A model that outputs each window's index in its batch shows how two overlapping windows are blended."""
  tag = Partial(lambda x: jnp.broadcast_to(jnp.arange(x.shape[0], dtype=jnp.float32)[:, None, None, None],
                                           x.shape))
  # roi 8 along y, overlap 0.5 on 12 voxels: windows start at 0 (tag 0) and 4 (tag 1), in one call.
  out = inference.sliding_window_inference(tag, jnp.zeros((1, 12, 1, 1)), roi_size=(8, 1), overlap=0.5,
                                           window_batch=2)
  g = np.exp(-0.5 * ((np.arange(8) - 3.5) / 1.0) ** 2)  # sigma = 8 / 8 voxels, centre 3.5
  expected = np.zeros(12)
  expected[4:8] = g[0:4] / (g[4:8] + g[0:4])  # voxels 4..7 are 4..7 in window 0 and 0..3 in window 1
  expected[8:] = 1.0
  np.testing.assert_allclose(np.asarray(out)[0, :, 0, 0], expected, rtol=1e-5, atol=1e-6)


def test_flip_tta_is_a_no_op_for_a_pointwise_model():
  image = _image((2, 7, 6, 5, 1), seed=3)
  f = inference.make_predict_fn(lambda v, x, train: x @ v, jnp.asarray([[1.0, -1.0, 0.5]]))
  plain = inference.sliding_window_inference(f, image, roi_size=(4, 4, 4), window_batch=4)
  tta = inference.sliding_window_inference(inference.flip_tta(f), image, roi_size=(4, 4, 4), window_batch=4)
  np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-7)
  assert len(inference.all_flips(3)) == 8 and inference.all_flips(2) == ((), (0,), (1,), (0, 1))


def test_flip_tta_averages_mirrored_predictions_of_a_position_dependent_model():
  ramp = Partial(lambda x: x * jnp.arange(x.shape[2], dtype=jnp.float32)[None, None, :, None])
  image = _image((1, 3, 4, 1), seed=4)
  out = inference.flip_tta(ramp, flips=[(), (1,)])(image)
  r = np.arange(4, dtype=np.float32)[None, None, :, None]
  np.testing.assert_allclose(out, image * (r + r[:, :, ::-1]) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="outside the 2 spatial axes"):
    inference.flip_tta(ramp, flips=[(2,)])(image)


def test_flip_tta_apply_averages_per_image_logits_of_mirrored_inputs():
  """Classification outputs (n, K) are not mirrored back; the mean of the logits over the flips is returned."""
  weights = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4, 1)  # position-dependent: flips change logits

  def apply(variables, x, train=False):
    del train
    score = jnp.sum(x * variables, axis=(1, 2, 3))
    return jnp.stack([score, -2.0 * score], axis=-1), {"aux": score}

  image = _image((2, 3, 4, 1), seed=7)
  out, aux = jax.jit(inference.flip_tta_apply(apply, [(), (1,)]))(weights, image)
  expected = (apply(weights, image)[0] + apply(weights, image[:, :, ::-1])[0]) / 2
  assert out.shape == (2, 2) and aux == {}
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert not np.allclose(out, apply(weights, image)[0])  # the mirror mattered
  with pytest.raises(ValueError, match="distinct axis subsets"):
    inference.flip_tta_apply(apply, [(1,), (1,)])


def test_ensemble_averages_members_and_composes_with_tta_and_windows():
  image = _image((1, 9, 10, 2), seed=5)
  w1, w2 = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32), np.array([[3.0, 1.0], [1.0, -1.0]], np.float32)
  members = inference.ensemble_of_variables(lambda v, x, train: x @ v, [w1, w2], output="softmax")
  out = inference.sliding_window_inference(inference.flip_tta(members), image, roi_size=(4, 6), window_batch=5)
  expected = (jax.nn.softmax(image @ w1, -1) + jax.nn.softmax(image @ w2, -1)) / 2
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_mesh_splits_windows_and_matches_one_device():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  image = _image((1, 14, 11, 1), seed=6)
  f = _pointwise([[1.0, -3.0]])
  kwargs = dict(roi_size=(6, 5), overlap=0.5, window_batch=8)
  sharded = inference.sliding_window_inference(f, image, mesh=mesh, **kwargs)
  np.testing.assert_allclose(sharded, inference.sliding_window_inference(f, image, **kwargs), rtol=1e-6)
  lowered = jax.jit(lambda x: inference.sliding_window_inference(f, x, mesh=mesh, **kwargs)).lower(image)
  assert '{"data"}' in lowered.as_text()  # the window batch carries a data-axis sharding constraint
  with pytest.raises(ValueError, match="not divisible by the mesh's 'data' axis"):
    inference.sliding_window_inference(f, image, mesh=mesh, roi_size=(6, 5), window_batch=6)


def test_compiled_program_is_reused_for_new_weights():
  image = _image((1, 10, 10, 1))
  before = sliding_window._run_jit._cache_size()
  apply = lambda v, x, train: x @ v
  for w in ([[1.0, 2.0]], [[3.0, 4.0]]):
    inference.sliding_window_inference(inference.make_predict_fn(apply, jnp.asarray(w)), image, roi_size=(4, 4))
  assert sliding_window._run_jit._cache_size() == before + 1


def test_errors_name_the_problem():
  f = _pointwise([[1.0]])
  with pytest.raises(ValueError, match="2 or 3 spatial axes"):
    inference.sliding_window_inference(f, jnp.zeros((1, 4, 1)), roi_size=(4,))
  with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
    inference.sliding_window_inference(f, jnp.zeros((1, 4, 4, 1)), roi_size=(4, 4), overlap=1.0)
  with pytest.raises(ValueError, match="roi_size"):
    inference.sliding_window_inference(f, jnp.zeros((1, 4, 4, 1)), roi_size=(4, 4, 4))
  with pytest.raises(ValueError, match="make_predict_fn"):
    inference.sliding_window_inference(Partial(lambda x: (x, {})), jnp.zeros((1, 4, 4, 1)), roi_size=(4, 4))
  with pytest.raises(ValueError, match="num_classes=3 but predict_fn returns 1"):
    inference.sliding_window_inference(f, jnp.zeros((1, 4, 4, 1)), roi_size=(4, 4), num_classes=3)


def test_256_cubed_volume_in_128_cubed_windows():
  image = jnp.linspace(-1.0, 1.0, 256**3, dtype=jnp.float32).reshape(1, 256, 256, 256, 1)
  f = _pointwise([[2.0, -1.0]])
  start = time.perf_counter()
  out = jax.block_until_ready(inference.sliding_window_inference(f, image, roi_size=(128,) * 3, overlap=0.5,
                                                                  window_batch=4))
  elapsed = time.perf_counter() - start
  print(f"256^3 sliding window (27 windows of 128^3, pointwise, compile included): {elapsed:.2f} s")
  assert out.shape == (1, 256, 256, 256, 2)
  for z, y, x in itertools.product((0, 100, 255), (0, 63, 200), (5, 128, 255)):
    v = float(image[0, z, y, x, 0])
    np.testing.assert_allclose(out[0, z, y, x], [2 * v, -v], rtol=1e-5, atol=1e-6)


def test_keep_largest_component_per_class():
  label = np.zeros((6, 9), np.uint8)
  label[0:2, 0:2] = 1     # class 1: 4 voxels
  label[3:6, 4:8] = 1     # class 1: 12 voxels (largest)
  label[0, 6:9] = 2       # class 2: 3 voxels (largest)
  label[5, 0] = 2         # class 2: 1 voxel
  label[2, 2] = 1         # touches the small class-1 blob only diagonally
  out = inference.keep_largest_component(label)
  expected = np.zeros_like(label)
  expected[3:6, 4:8] = 1
  expected[0, 6:9] = 2
  np.testing.assert_array_equal(out, expected)
  only_two = inference.keep_largest_component(label, classes=[2])
  np.testing.assert_array_equal(only_two == 1, label == 1)
  assert only_two[5, 0] == 0
  # With corner connectivity the diagonal voxel joins the small blob (5 voxels), still not the largest.
  diag = label.copy()
  diag[3:6, 4:8] = 0
  diag[4, 8] = 1
  kept = inference.keep_largest_component(diag, classes=[1], connectivity=2)
  assert kept[2, 2] == 1 and kept[4, 8] == 0 and kept[0:2, 0:2].all()
  assert inference.keep_largest_component(diag, classes=[1], connectivity=1)[2, 2] == 0
