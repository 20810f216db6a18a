"""Whole cases on canvases: the planned sliding window equals the per-shape one, with one program per canvas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import inference
from medjax.inference import cases


def _context_model(windows):
  """A nonlinear per-voxel prediction that also depends on the whole window (its mean), so the result depends
  on where the windows lie and what they read."""
  context = jnp.mean(windows, axis=tuple(range(1, windows.ndim)), keepdims=True)
  return jnp.concatenate([jnp.tanh(2.0 * windows + context), jax.nn.sigmoid(windows * context - 0.3)], axis=-1)


def _planned(image, roi, overlap, window_batch, pad_mode="constant", mode="gaussian"):
  placed = cases.place_case({"image": image}, roi_size=roi, overlap=overlap, window_batch=window_batch,
                            pad_mode=pad_mode)
  fn = jax.jit(functools.partial(cases.sliding_window_planned, jax.tree_util.Partial(_context_model), roi_size=roi,
                                 mode=mode))
  out = fn(placed["image"][None], placed["window_origins"], placed["window_valid"], placed["window_steps"])
  return np.asarray(out[0]), placed


@pytest.mark.parametrize("shape,roi,pad_mode", [
    ((13, 9), (6, 4), "constant"),            # several windows per axis, the last flush with the border
    ((5, 11), (8, 4), "edge"),                # an axis shorter than the window: padded, centred
    ((7, 10, 5), (4, 6, 6), "reflect"),
    ((9, 4, 12), (5, 4, 5), "constant"),
])
def test_planned_equals_sliding_window(shape, roi, pad_mode):
  rng = np.random.default_rng(len(shape))
  image = rng.normal(size=shape + (1,)).astype(np.float32)
  expected = inference.sliding_window_inference(jax.tree_util.Partial(_context_model), image[None], roi_size=roi,
                                                overlap=0.5, window_batch=3, pad_mode=pad_mode)[0]
  out, placed = _planned(image, roi, 0.5, 3, pad_mode)
  assert out.shape == cases.canvas_shape(shape, roi, 0.5) + (2,)
  np.testing.assert_allclose(cases.crop_to_case(out, placed["mask"]), expected, rtol=1e-5, atol=1e-6)
  assert placed["mask"].sum() == np.prod(shape)
  beyond = np.ones(out.shape[:-1], bool)  # canvas voxels beyond the (window-padded) case: no window reads them
  beyond[tuple(slice(0, max(s, r)) for s, r in zip(shape, roi))] = False
  assert not out[beyond].any()


def test_one_program_per_canvas():
  roi = (4, 6)  # window steps of 2 and 3 at overlap 0.5
  fn = jax.jit(functools.partial(cases.sliding_window_planned, jax.tree_util.Partial(_context_model), roi_size=roi))
  canvases = set()
  for shape in [(7, 10), (8, 12), (7, 11), (8, 10)]:  # all on the (8, 12) canvas
    placed = cases.place_case({"image": np.ones(shape + (1,), np.float32)}, roi_size=roi, overlap=0.5,
                              window_batch=2)
    canvases.add(placed["image"].shape)
    fn(placed["image"][None], placed["window_origins"], placed["window_valid"], placed["window_steps"])
  assert canvases == {(8, 12, 1)} and fn._cache_size() == 1


def test_labels_and_mask_follow_the_case():
  image = np.arange(3 * 5, dtype=np.float32).reshape(3, 5, 1)
  label = (image[..., 0] % 3).astype(np.int32)
  placed = cases.place_case({"image": image, "label": label, "id": np.int64(7)}, roi_size=(4, 4), overlap=0.25,
                            window_batch=4)
  # The 3-voxel axis is padded to the 4-voxel window as (0, 1); the canvas is (4, 4 + 1 step of 3 = 7).
  assert placed["image"].shape == (4, 7, 1) and placed["label"].shape == (4, 7) and placed["id"] == 7
  np.testing.assert_array_equal(cases.crop_to_case(placed["label"], placed["mask"]), label)
  np.testing.assert_array_equal(cases.crop_to_case(placed["image"], placed["mask"]), image)
  assert placed["label"][~placed["mask"]].sum() == 0
  assert int(placed["window_steps"]) == 1 and placed["window_valid"].sum() == 2  # starts 0 and 1 along x
