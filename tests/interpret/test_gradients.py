"""Gradient attributions against analytic answers (linear models) and completeness (small CNNs), 2D and 3D."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.interpret import gradients
from medjax.interpret.targets import RegionTarget
from medjax.models import build_model


class Linear(nn.Module):
  """logits = flatten(x) @ W + b: every gradient attribution has a closed form."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1)), {}


class TinyMLP(nn.Module):
  """A small smooth nonlinear classifier: its gradient changes with the input (unlike Linear's)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x.reshape(x.shape[0], -1)))), {}


class SegConv(nn.Module):
  """A linear per-pixel segmentation head (B, *spatial, K), for RegionTarget."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Conv(2, (3,) * (x.ndim - 2))(x), {}


def _linear(shape, seed=0):
  model = Linear()
  images = jax.random.normal(jax.random.key(seed), shape)
  variables = model.init(jax.random.key(seed + 1), images)
  weights = np.asarray(variables["params"]["Dense_0"]["kernel"])  # (prod(spatial) * C, K)
  return model, variables, images, weights


def _row(weights, target, shape):
  """Per-example gradient (B, *spatial, C) of the linear model: the target's column of W."""
  return np.stack([weights[:, t].reshape(shape[1:]) for t in np.asarray(target)])


@pytest.mark.parametrize("shape", [(2, 5, 4, 2), (2, 3, 4, 3, 2)])
def test_linear_saliency_and_gradient_x_input(shape):
  model, variables, images, weights = _linear(shape)
  target = jnp.array([2, 0])
  grad = _row(weights, target, shape)
  np.testing.assert_allclose(gradients.saliency(model, variables, images, target), np.abs(grad).max(-1), rtol=1e-5)
  np.testing.assert_allclose(gradients.saliency(model, variables, images, target, per_channel=True), grad, rtol=1e-5)
  gxi = gradients.gradient_x_input(model, variables, images, target)
  assert gxi.shape == shape[:-1]
  np.testing.assert_allclose(gxi, (grad * np.asarray(images)).sum(-1), rtol=1e-4, atol=1e-6)
  per_channel = gradients.gradient_x_input(model, variables, images, target, per_channel=True)
  np.testing.assert_allclose(per_channel, grad * np.asarray(images), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", gradients.IG_METHODS)
def test_linear_integrated_gradients_is_w_times_x_minus_baseline(method):
  shape = (2, 4, 5, 2)
  model, variables, images, weights = _linear(shape)
  target = jnp.array([1, 2])
  baseline = 0.5 * jnp.ones((1, 1, 1, 2))  # broadcastable, per channel
  expected = _row(weights, target, shape) * (np.asarray(images) - 0.5)
  maps, gap = gradients.integrated_gradients(model, variables, images, target, baseline=baseline, steps=8,
                                             method=method, per_channel=True, return_delta=True)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gap, 0.0, atol=1e-4)
  summed = gradients.integrated_gradients(model, variables, images, target, steps=8, method=method)
  assert summed.shape == shape[:-1]
  np.testing.assert_allclose(summed, (_row(weights, target, shape) * np.asarray(images)).sum(-1), rtol=1e-4,
                             atol=1e-5)


def test_quadrature_points_and_weights():
  for method in gradients.IG_METHODS:
    alphas, weights = gradients.ig_points_and_weights(method, 10)
    assert alphas.shape == weights.shape == (10,)
    assert abs(weights.sum() - 1.0) < 1e-12 and alphas.min() >= 0 and alphas.max() <= 1
  # Captum's points: right ends at 1, left starts at 0, middle at 1/(2n); the trapezoid includes both ends.
  np.testing.assert_allclose(gradients.ig_points_and_weights("riemann_right", 4)[0], [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(gradients.ig_points_and_weights("riemann_left", 4)[0], [0.0, 0.25, 0.5, 0.75])
  np.testing.assert_allclose(gradients.ig_points_and_weights("riemann_middle", 4)[0], [0.125, 0.375, 0.625, 0.875])
  np.testing.assert_allclose(gradients.ig_points_and_weights("riemann_trapezoid", 3)[1], [0.25, 0.5, 0.25])
  # The quadratic x^2 on [0, 1]: Gauss-Legendre with 2 nodes is exact.
  alphas, weights = gradients.ig_points_and_weights("gausslegendre", 2)
  assert abs((weights * alphas ** 2).sum() - 1 / 3) < 1e-12
  with pytest.raises(ValueError, match="Unknown integration method"):
    gradients.ig_points_and_weights("simpson", 4)


def _small_resnet(spatial, seed=0, bias_scale=0.0):
  model = build_model("resnet18", {"num_classes": 3, "width": 4, "stage_sizes": (1, 1, 1, 1), "small_input": True,
                                   "norm": "none", "spatial_dims": len(spatial)})
  images = jax.random.uniform(jax.random.key(seed), (2,) + spatial + (1,))
  variables = model.init(jax.random.key(seed + 1), images, train=False)
  # bias_scale > 0: nonzero biases. With the zero-initialised ones the network is positively homogeneous, so f is
  # linear along the path from the zero baseline (no ReLU changes state) except at alpha = 0 itself, where every ReLU
  # sits at its kink (gradient 0), which the trapezoid rule's end point sees: a gap of 1/(2(n-1)), 0.8 % at n = 64.
  # With biases, ReLUs switch along the path and the error falls only as the steps grow.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
  variables = jax.tree_util.tree_unflatten(treedef, [
      leaf + bias_scale * jax.random.normal(key, leaf.shape) if "bias" in jax.tree_util.keystr(path) else leaf
      for (path, leaf), key in zip(leaves, keys)])
  logits, _ = model.apply(variables, images, train=False)
  return model, variables, images, jnp.argmax(logits, axis=1)


@pytest.mark.parametrize("spatial,method,check_chunks", [((8, 8), "riemann_trapezoid", False),
                                                          ((8, 8), "gausslegendre", True),
                                                          ((4, 4, 4), "gausslegendre", False)])
def test_integrated_gradients_completeness_on_a_cnn(spatial, method, check_chunks):
  model, variables, images, target = _small_resnet(spatial)
  maps, gap = gradients.integrated_gradients(model, variables, images, target, steps=64, method=method,
                                             return_delta=True)
  assert maps.shape == (2,) + spatial
  logits, _ = model.apply(variables, images, train=False)
  zero_logits, _ = model.apply(variables, jnp.zeros_like(images), train=False)
  rows = jnp.arange(2)
  difference = logits[rows, target] - zero_logits[rows, target]
  np.testing.assert_allclose(maps.reshape(2, -1).sum(1), difference, rtol=0.01, atol=1e-4)
  np.testing.assert_allclose(gap, maps.reshape(2, -1).sum(1) - difference, atol=1e-5)
  if not check_chunks:  # each compile of the CNN costs seconds on CI; one case covers chunking
    return
  # Chunked path points (steps not a multiple of the chunk) give the same attributions.
  chunked = gradients.integrated_gradients(model, variables, images, target, steps=64, method=method, batch_steps=10)
  np.testing.assert_allclose(chunked, maps, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_converges_through_relu_switches():
  # Nonzero biases: ReLUs switch along the path, 64 steps miss completeness by a few per cent, 256 are within 1 %.
  model, variables, images, target = _small_resnet((8, 8), bias_scale=0.02)
  logits, _ = model.apply(variables, images, train=False)
  zero_logits, _ = model.apply(variables, jnp.zeros_like(images), train=False)
  difference = np.asarray(logits[jnp.arange(2), target] - zero_logits[jnp.arange(2), target])
  _, gap = gradients.integrated_gradients(model, variables, images, target, steps=256, batch_steps=64,
                                          method="riemann_trapezoid", return_delta=True)
  assert np.all(np.abs(np.asarray(gap)) < 0.01 * np.abs(difference)), (gap, difference)


def test_smoothgrad_without_noise_is_saliency_and_chunking_is_invariant():
  model = TinyMLP()
  images = jax.random.normal(jax.random.key(0), (2, 5, 4, 2))
  variables = model.init(jax.random.key(1), images)
  target = jnp.array([0, 2])
  rng = jax.random.key(3)
  plain = gradients.saliency(model, variables, images, target)
  np.testing.assert_allclose(gradients.smoothgrad(model, variables, images, target, rng=rng, noise_level=0.0,
                                                  num_samples=4), plain, rtol=1e-5, atol=1e-7)
  noisy = gradients.smoothgrad(model, variables, images, target, rng=rng, num_samples=5, per_channel=True)
  assert noisy.shape == images.shape
  chunked = gradients.smoothgrad(model, variables, images, target, rng=rng, num_samples=5, per_channel=True,
                                 batch_samples=2)
  np.testing.assert_allclose(chunked, noisy, rtol=1e-4, atol=1e-6)
  assert not np.allclose(noisy, gradients.saliency(model, variables, images, target, per_channel=True))


def test_region_target_on_a_segmentation_head_2d_and_3d():
  for spatial in [(6, 5), (4, 3, 5)]:
    model = SegConv()
    images = jax.random.normal(jax.random.key(0), (2,) + spatial + (2,))
    variables = model.init(jax.random.key(1), images)
    mask = (jax.random.uniform(jax.random.key(2), (2,) + spatial) > 0.5).astype(jnp.float32)
    target = RegionTarget(mask, 1)
    assert gradients.saliency(model, variables, images, target).shape == (2,) + spatial
    assert gradients.gradient_x_input(model, variables, images, target, per_channel=True).shape == images.shape
    maps, gap = gradients.integrated_gradients(model, variables, images, target, steps=4, return_delta=True)
    assert maps.shape == (2,) + spatial
    # The head is linear except its bias: IG equals gradient x input and completes exactly.
    np.testing.assert_allclose(maps, gradients.gradient_x_input(model, variables, images, target), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(gap, 0.0, atol=1e-4)


def test_second_call_does_not_retrace():
  model, variables, images, weights = _linear((2, 4, 4, 1))
  target = jnp.array([0, 1])
  gradients.saliency(model, variables, images, target)
  gradients.integrated_gradients(model, variables, images, target, steps=4)
  sizes = (gradients._gradient_maps._cache_size(), gradients._integrated_gradients._cache_size())
  gradients.saliency(model, variables, images + 1.0, jnp.array([2, 2]))
  gradients.integrated_gradients(model, variables, images * 2.0, target, steps=4)
  assert (gradients._gradient_maps._cache_size(), gradients._integrated_gradients._cache_size()) == sizes


def test_bad_baseline_is_rejected():
  model, variables, images, _ = _linear((2, 4, 4, 1))
  with pytest.raises(ValueError, match="does not broadcast"):
    gradients.integrated_gradients(model, variables, images, jnp.array([0, 1]), baseline=jnp.zeros((3, 4, 4, 1)))
