"""Tests for medjax.augment: alignment of image and label, identity, determinism, jit, errors, 2D and 3D."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.ndimage import map_coordinates

from medjax.augment import _sample, make_augment

SHAPES = {2: (20, 20), 3: (12, 12, 12)}  # rot90 needs a square plane; non-square shapes below elsewhere
THRESHOLD = 0.5


def _blobs(shape, batch=2, seed=0):
  """Smooth image (B, *S, 1) in [0, 1] (a sum of Gaussian blobs) and its thresholded label (B, *S)."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
  images = []
  for _ in range(batch):
    img = np.zeros(shape, np.float32)
    for _ in range(3):
      centre = rng.uniform(0.25, 0.75, len(shape)) * np.array(shape)
      img += np.exp(-np.sum((grid - centre) ** 2, -1) / (2 * (min(shape) / 5) ** 2))
    images.append(img / img.max())
  image = jnp.asarray(np.stack(images))[..., None]
  return dict(image=image, label=(image[..., 0] > THRESHOLD).astype(jnp.int32))


FULL = dict(flip=dict(p=0.5), rot90=dict(p=0.5), affine=dict(p=1.0, rotate_deg=20, scale=(0.8, 1.2), shear=0.1,
            translate=2), elastic=dict(p=1.0, sigma=6, magnitude=(0.5, 1.5)), bias_field=dict(p=1.0),
            blur=dict(p=1.0), low_res=dict(p=1.0), brightness=dict(p=1.0), contrast=dict(p=1.0),
            gamma=dict(p=1.0), noise=dict(p=1.0), cutout=dict(p=1.0), cutmix=dict(p=1.0))


def test_sample_matches_map_coordinates():
  volume = jax.random.normal(jax.random.key(0), (7, 9, 8, 2))
  coords = jax.random.uniform(jax.random.key(1), (3, 4, 5, 6), minval=-2.0, maxval=11.0)
  for order in (0, 1):
    for pad, mode in (("constant", "constant"), ("edge", "nearest")):
      ours = _sample(volume, coords, order=order, pad=pad)
      ref = jnp.stack([map_coordinates(volume[..., c], list(coords), order=order, mode=mode) for c in (0, 1)], -1)
      np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["flip", "rot90"])
def test_exact_spatial_keeps_label_aligned(ndim, name):
  batch = _blobs(SHAPES[ndim], batch=4)
  aug = jax.jit(make_augment({name: dict(p=1.0)}))
  for seed in range(3):
    out = aug(jax.random.key(seed), batch)
    np.testing.assert_array_equal(out["label"], (out["image"][..., 0] > THRESHOLD).astype(jnp.int32))
    # A permutation of voxels: the same values, and with p=1 something moved.
    np.testing.assert_array_equal(np.sort(np.ravel(out["image"])), np.sort(np.ravel(batch["image"])))
    assert not np.array_equal(out["image"], batch["image"])


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("spatial,label_mode", [
    (dict(affine=dict(p=1.0, rotate_deg=25, scale=(0.8, 1.2), shear=0.1, translate=2)), "onehot"),
    (dict(elastic=dict(p=1.0, sigma=5, magnitude=(1.0, 2.0))), "onehot"),
    (dict(flip=dict(p=0.5), rot90=dict(p=0.5), affine=dict(p=1.0, rotate_deg=25), elastic=dict(p=1.0, sigma=5)),
     "nearest")])
def test_interpolating_spatial_keeps_label_aligned(ndim, spatial, label_mode):
  batch = _blobs(SHAPES[ndim], batch=4)
  aug = jax.jit(make_augment(dict(spatial, label_mode=label_mode, num_classes=2)))
  out = aug(jax.random.key(1), batch)
  agree = np.mean(np.asarray(out["label"]) == np.asarray(out["image"][..., 0] > THRESHOLD))
  assert agree > (0.95 if label_mode == "onehot" else 0.9), agree
  assert not np.array_equal(out["image"], batch["image"])


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_parameters_return_input_exactly(ndim):
  shape = (9, 14) if ndim == 2 else (6, 9, 7)
  batch = _blobs(shape)
  batch["image"] = batch["image"] * 3.0 - 1.0
  zero_p = {name: dict(p=0.0) for name in FULL}
  zero_magnitude = dict(affine=dict(p=1.0, rotate_deg=0, scale=(1.0, 1.0), shear=0.0, translate=0),
                        elastic=dict(p=1.0, magnitude=(0.0, 0.0)), gamma=dict(p=1.0, range=(1.0, 1.0)),
                        noise=dict(p=1.0, std=(0.0, 0.0)), brightness=dict(p=1.0, range=(1.0, 1.0)),
                        contrast=dict(p=1.0, range=(1.0, 1.0)), blur=dict(p=1.0, sigma=(0.0, 0.0)),
                        low_res=dict(p=1.0, factor=(1.0, 1.0)), bias_field=dict(p=1.0, coefficient=0.0),
                        cutout=dict(p=1.0, size=(0.0, 0.0)))
  for config in ({}, zero_p, zero_magnitude, dict(flip=dict(p=0.0), gamma=dict(p=0.0), label_mode="onehot",
                                                  num_classes=2, affine=dict(p=1.0, rotate_deg=0, scale=1.0))):
    out = jax.jit(make_augment(config))(jax.random.key(3), batch)
    for key in batch:
      np.testing.assert_array_equal(out[key], batch[key], err_msg=str(config))
      assert out[key].dtype == batch[key].dtype


@pytest.mark.parametrize("ndim", [2, 3])
def test_same_key_same_result_different_key_different(ndim):
  shape = (16, 12) if ndim == 2 else (8, 12, 10)
  config = dict(affine=FULL["affine"], noise=FULL["noise"], cutmix=FULL["cutmix"])
  aug = jax.jit(make_augment(config))
  batch = _blobs(shape)
  a, b, c = aug(jax.random.key(0), batch), aug(jax.random.key(0), batch), aug(jax.random.key(1), batch)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("ndim,dtype", [(2, jnp.float32), (3, jnp.bfloat16)])
def test_intensity_changes_values_keeps_shape_and_dtype(ndim, dtype):
  shape = (16, 12) if ndim == 2 else (8, 12, 10)
  batch = _blobs(shape)
  batch["image"] = batch["image"].astype(dtype)
  params = dict(low_res=dict(p=1.0, factor=(2.0, 3.0)), gamma=dict(p=1.0, range=(1.5, 2.0)))
  for name in ["gamma", "noise", "blur", "low_res", "bias_field", "brightness", "contrast"]:
    out = jax.jit(make_augment({name: params.get(name, dict(p=1.0))}))(jax.random.key(0), batch)
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == dtype
    assert not np.array_equal(np.asarray(out["image"], np.float32), np.asarray(batch["image"], np.float32)), name
    np.testing.assert_array_equal(out["label"], batch["label"])


def test_gamma_keeps_range():
  batch = _blobs((16, 12))
  batch["image"] = batch["image"] * 200.0 - 50.0
  out = make_augment(dict(gamma=dict(p=1.0, range=(0.5, 2.0))))(jax.random.key(0), batch)
  for i in range(2):
    np.testing.assert_allclose(out["image"][i].min(), batch["image"][i].min(), atol=1e-3)
    np.testing.assert_allclose(out["image"][i].max(), batch["image"][i].max(), rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_classification_mixing_gives_soft_labels_summing_to_one(ndim, name):
  shape = (16, 12) if ndim == 2 else (8, 12, 10)
  image = jax.random.normal(jax.random.key(0), (6,) + shape + (1,))
  batch = dict(image=image, label=jnp.arange(6) % 4)
  out = jax.jit(make_augment({name: dict(p=1.0), "num_classes": 4}))(jax.random.key(0), batch)
  assert out["label"].shape == (6, 4) and out["label"].dtype == jnp.float32
  np.testing.assert_allclose(np.sum(out["label"], -1), 1.0, atol=1e-6)
  assert np.any(np.max(out["label"], -1) < 1.0)  # something was mixed
  assert out["image"].shape == image.shape


@pytest.mark.parametrize("ndim", [2, 3])
def test_segmentation_cutmix_pastes_label_with_image(ndim):
  batch = _blobs((16, 12) if ndim == 2 else (8, 12, 10), batch=4)
  out = make_augment(dict(cutmix=dict(p=1.0)))(jax.random.key(2), batch)
  np.testing.assert_array_equal(out["label"], (out["image"][..., 0] > THRESHOLD).astype(jnp.int32))
  with pytest.raises(ValueError, match="classification only"):
    make_augment(dict(mixup=dict(p=1.0)))(jax.random.key(0), batch)


def test_cutout_zeroes_a_box_and_keeps_label():
  batch = _blobs((16, 12))
  batch["image"] = batch["image"] + 1.0
  out = make_augment(dict(cutout=dict(p=1.0, size=(0.25, 0.5))))(jax.random.key(0), batch)
  zeroed = np.asarray(out["image"]) == 0.0
  assert zeroed.any() and not zeroed.all()
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_config_errors():
  with pytest.raises(ValueError, match="unknown key 'gama'.*Did you mean 'gamma'"):
    make_augment(dict(gama=dict(p=0.5)))
  with pytest.raises(ValueError, match="unknown key 'rotate' in augment.affine.*Did you mean 'rotate_deg'"):
    make_augment(dict(affine=dict(rotate=10)))
  with pytest.raises(ValueError, match="p must be in"):
    make_augment(dict(noise=dict(p=2.0)))
  with pytest.raises(ValueError, match="lo > hi"):
    make_augment(dict(gamma=dict(range=(1.5, 0.7))))
  with pytest.raises(ValueError, match="num_classes"):
    make_augment(dict(label_mode="onehot"))
  with pytest.raises(ValueError, match="rot90"):
    make_augment(dict(rot90=dict(p=1.0)))(jax.random.key(0), _blobs((8, 12)))


def test_full_chain_128_cubed_compiles_and_runs():
  """2 x 128^3 through every transform, one-hot labels. Its compile time is a benchmark (benchmarks.md), not a test
  bound: CI machines differ by 2x in CPU speed."""
  aug = jax.jit(make_augment(dict(FULL, elastic=dict(p=1.0, sigma=16, magnitude=(0.0, 4.0)), label_mode="onehot",
                                  num_classes=3)))
  batch = dict(image=jnp.zeros((2, 128, 128, 128, 1)), label=jnp.zeros((2, 128, 128, 128), jnp.int32))
  start = time.process_time()
  compiled = aug.lower(jax.random.key(0), batch).compile()
  compile_s = time.process_time() - start
  out = jax.block_until_ready(compiled(jax.random.key(0), batch))
  print(f"2 x 128^3 full chain: compile {compile_s:.2f} s process CPU time")
  assert out["image"].shape == (2, 128, 128, 128, 1)
  assert out["label"].shape == (2, 128, 128, 128)
  # An all-background label stays all background through the one-hot warps (argmax back to integer classes).
  assert not np.asarray(out["label"]).any()
  assert np.all(np.isfinite(np.asarray(out["image"])))
