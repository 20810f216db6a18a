"""Grad-CAM / Grad-CAM++ (medjax.interpret.gradcam) and layer capture (medjax.interpret.capture), on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.interpret import capture, gradcam
from medjax.interpret.targets import RegionTarget
from medjax.models import build_model


class _GatedFeatures(nn.Module):
  """Conv + ReLU gated by a fixed spatial mask: the features live in the mask's region only."""
  mask: tuple  # nested tuples of 0/1, the layer's spatial shape
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    y = nn.relu(nn.Conv(4, (3,) * nd, strides=(self.stride,) * nd, name="conv")(x))
    return y * jnp.asarray(self.mask, y.dtype)[None, ..., None]


class RegionModel(nn.Module):
  """A classifier whose logits depend on one spatial region only: gated features -> mean pool -> Dense."""
  mask: tuple
  stride: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    f = _GatedFeatures(self.mask, self.stride, name="features")(x)
    pooled = f.mean(axis=tuple(range(1, f.ndim - 1)))
    return nn.Dense(2, name="head")(pooled), {}


class SplitModel(nn.Module):
  """conv "features" -> ReLU -> mean pool -> Dense "head"; the test recomputes it in two halves by hand."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    a = nn.Conv(3, (3, 3), name="features")(x)
    return nn.Dense(2, name="head")(nn.relu(a).mean(axis=(1, 2))), {}


def _quadrant_mask(shape):
  """1 on the first half of every spatial axis."""
  mask = np.zeros(shape, np.float32)
  mask[tuple(slice(0, n // 2) for n in shape)] = 1
  return mask


def _nested_tuple(a):
  return tuple(_nested_tuple(x) for x in a) if isinstance(a, np.ndarray) and a.ndim else float(a)


def _region_setup(nd, stride, size=8):
  layer_shape = (size // stride,) * nd
  mask = _quadrant_mask(layer_shape)
  # Nested tuples: module fields are hashed, as the model is a static argument of the jitted map.
  model = RegionModel(_nested_tuple(mask), stride)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2,) + (size,) * nd + (1,))
  variables = model.init(jax.random.PRNGKey(1), images, train=False)
  # Positive weights and inputs: the class-0 evidence is positive where the features are, so the map is not all 0.
  variables = jax.tree.map(jnp.abs, variables)
  return model, variables, images, _quadrant_mask((size,) * nd)


def _tiny_resnet(nd):
  return build_model("resnet18", {"num_classes": 3, "spatial_dims": nd, "width": 4, "stage_sizes": (1, 1, 1, 1),
                                  "small_input": True})


@pytest.mark.parametrize("method", [gradcam.grad_cam, gradcam.grad_cam_plus_plus])
@pytest.mark.parametrize("nd,stride,size", [(2, 1, 8), (2, 2, 16), (3, 1, 8)])
def test_map_mass_is_in_the_region_the_logit_depends_on(method, nd, stride, size):
  model, variables, images, region = _region_setup(nd, stride, size)
  cam = np.asarray(method(model, variables, images, jnp.zeros(2, jnp.int32), layer="features"))
  assert cam.shape == images.shape[:-1]
  assert (cam >= 0).all()
  inside = (cam * region).reshape(2, -1).sum(1)
  total = cam.reshape(2, -1).sum(1)
  assert (total > 0).all()
  # Linear upsampling of a stride-2 layer moves a quarter of one pixel per axis across the region's border
  # (about 94% stays inside an 8^2 region), hence not 100%.
  assert (inside / total > 0.9).all(), inside / total


def test_default_layer_is_found_on_the_region_model():
  model, variables, images, _ = _region_setup(2, 1)
  assert capture.default_layer(model, variables, images) == "features"
  np.testing.assert_allclose(gradcam.grad_cam(model, variables, images, jnp.zeros(2, jnp.int32)),
                             gradcam.grad_cam(model, variables, images, jnp.zeros(2, jnp.int32), layer="features"))


def _split_by_hand():
  model = SplitModel()
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 1))
  variables = model.init(jax.random.PRNGKey(3), images, train=False)
  params = variables["params"]
  target = jnp.array([0, 1])
  acts = nn.Conv(3, (3, 3)).apply({"params": params["features"]}, images)

  def score(a):
    logits = nn.Dense(2).apply({"params": params["head"]}, nn.relu(a).mean(axis=(1, 2)))
    return jnp.take_along_axis(logits, target[:, None], axis=1).sum()

  grads = jax.grad(score)(acts)
  return model, variables, images, target, np.asarray(acts, np.float64), np.asarray(grads, np.float64)


def test_grad_cam_equals_the_formula_on_a_split_model():
  model, variables, images, target, a, g = _split_by_hand()
  cap = capture.capture(model, variables, images, target, "features")
  np.testing.assert_allclose(cap.activations, a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cap.gradients, g, rtol=1e-5, atol=1e-7)
  w = g.mean(axis=(1, 2))  # (B, C)
  expected = np.maximum((a * w[:, None, None, :]).sum(-1), 0)
  cam = gradcam.grad_cam(model, variables, images, target, layer="features", upsample=None)
  assert cam.shape == (2, 6, 6)
  np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-6)
  signed = gradcam.grad_cam(model, variables, images, target, layer="features", upsample=None, relu=False)
  np.testing.assert_allclose(signed, (a * w[:, None, None, :]).sum(-1), rtol=1e-4, atol=1e-6)


def test_grad_cam_plus_plus_equals_the_formula_on_a_split_model():
  model, variables, images, target, a, g = _split_by_hand()
  b, h, w_, c = a.shape
  weights = np.zeros((b, c))
  for i in range(b):
    for k in range(c):
      total = a[i, :, :, k].sum()
      for y in range(h):
        for x in range(w_):
          gg = g[i, y, x, k]
          denom = 2 * gg ** 2 + total * gg ** 3
          alpha = gg ** 2 / denom if denom != 0 else 0.0
          weights[i, k] += alpha * max(gg, 0.0)
  expected = np.maximum(np.einsum("byxc,bc->byx", a, weights), 0)
  cam = gradcam.grad_cam_plus_plus(model, variables, images, target, layer="features", upsample=None)
  np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_plus_plus_weights_on_numbers():
  # One example, one channel, two positions: A = (1, 3), g = (1, -2): sum A = 4.
  # alpha = g^2 / (2 g^2 + 4 g^3) = 1 / (2 + 4) and 4 / (8 - 32); weight = alpha_1 * relu(1) + alpha_2 * 0 = 1/6.
  a = jnp.array([[[1.0], [3.0]]])
  g = jnp.array([[[1.0], [-2.0]]])
  np.testing.assert_allclose(gradcam.grad_cam_plus_plus_weights(a, g), [[1 / 6]], rtol=1e-6)
  # Zero gradients give alpha 0, not NaN.
  np.testing.assert_array_equal(gradcam.grad_cam_plus_plus_weights(a, jnp.zeros_like(g)), [[0.0]])


@pytest.mark.parametrize("nd", [2, 3])
def test_resnet_shapes_default_layer_and_named_layer(nd):
  model = _tiny_resnet(nd)
  images = jax.random.normal(jax.random.PRNGKey(4), (2,) + (16,) * nd + (1,))
  variables = model.init(jax.random.PRNGKey(5), images, train=False)
  target = jnp.array([0, 2])
  assert capture.default_layer(model, variables, images) == "stage4_block0"
  # Each method / layer compiles once; 3D runs the cheaper half to keep the CPU test short.
  methods = (gradcam.grad_cam, gradcam.grad_cam_plus_plus) if nd == 2 else (gradcam.grad_cam,)
  for method in methods:
    cam = np.asarray(method(model, variables, images, target))
    assert cam.shape == images.shape[:-1]
    assert np.isfinite(cam).all() and (cam >= 0).all() and cam.max() > 0
  low = gradcam.grad_cam(model, variables, images, target, layer="stage3_block0", upsample=None)
  assert low.shape == (2,) + (4,) * nd
  if nd == 2:
    nested = gradcam.grad_cam(model, variables, images, target, layer="stage3_block0/conv2", upsample=None)
    assert nested.shape == (2,) + (4,) * nd


def test_resnet_default_layer_skips_a_1x1_stage():
  model = _tiny_resnet(2)
  images = jnp.zeros((1, 8, 8, 1))  # stage4 is 1x1 here
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  assert capture.default_layer(model, variables, images) == "stage3_block0"


def test_unknown_layer_lists_the_top_level_modules():
  model = _tiny_resnet(2)
  images = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  with pytest.raises(ValueError, match="stage4_block0.*head|stem_conv.*stage1_block0") as info:
    gradcam.grad_cam(model, variables, images, jnp.zeros(1, jnp.int32), layer="stage9_block0")
  assert "stage9_block0" in str(info.value)


def test_repeated_calls_do_not_retrace():
  model, variables, images, _ = _region_setup(2, 1)
  target = jnp.zeros(2, jnp.int32)
  gradcam.grad_cam(model, variables, images, target, layer="features")
  size = gradcam._cam._cache_size()
  gradcam.grad_cam(model, variables, images + 1, jnp.ones(2, jnp.int32), layer="features")
  assert gradcam._cam._cache_size() == size


def test_unet_region_target():
  model = build_model("unet", {"spatial_dims": 2, "num_classes": 2, "features": (4, 8)})
  images = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 16, 1))
  variables = model.init(jax.random.PRNGKey(7), images, train=False)
  target = RegionTarget(_quadrant_mask((16, 16))[None].repeat(2, 0), 1)
  # The segmentation head has the logits' shape and is skipped; the last decoder stage is explained.
  assert capture.default_layer(model, variables, images) == "dec0"
  for method in (gradcam.grad_cam, gradcam.grad_cam_plus_plus):
    cam = np.asarray(method(model, variables, images, target))
    assert cam.shape == (2, 16, 16)
    assert np.isfinite(cam).all() and (cam >= 0).all()
  bottom = gradcam.grad_cam(model, variables, images, target, layer="enc1", upsample=None)
  assert bottom.shape == (2, 8, 8)
