"""Tests for medjax.models.efficientnet and the shared blocks in medjax.models.mobile_blocks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import efficientnet, mobile_blocks  # noqa: F401  (registers the models)
from medjax.models.efficientnet import EfficientNetB0, EfficientNetB3
from tests.models.zoo_testing import (KEY, host_variables_for as _numpy_variables, init_shapes as _init_shapes,
                         num_params as _num_params, train_mode_gradients)


@pytest.mark.parametrize("name,expected", [
  ("efficientnet_b0", 5_288_548), ("efficientnet_b1", 7_794_184), ("efficientnet_b2", 9_109_994),
  ("efficientnet_b3", 12_233_232)])
def test_param_count_matches_torchvision(name, expected):
  # Flax's "params" holds what torchvision counts (weights, biases, BN scale / shift); running statistics
  # live in "batch_stats" as torchvision's buffers do.
  model = models.build_model(name, dict(num_classes=1000))
  _, shapes = _init_shapes(model, jnp.zeros((1, 32, 32, 3)))
  assert _num_params(shapes["params"]) == expected
  assert set(shapes) == {"params", "batch_stats"}


@pytest.mark.parametrize("spatial,stage_spatial", [
  ((17, 24), [(9, 12), (5, 6), (3, 3), (2, 2), (1, 1)]),
  ((17, 20, 33), [(9, 10, 17), (5, 5, 9), (3, 3, 5), (2, 2, 3), (1, 1, 2)]),
], ids=["2d", "3d"])
def test_shapes_and_aux(spatial, stage_spatial):
  model = EfficientNetB0(num_classes=5, spatial_dims=len(spatial))
  (logits, aux), _ = _init_shapes(model, jnp.zeros((2, *spatial, 1)))
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "stages"}
  chex.assert_shape(aux["features"], (2, 1280))
  chex.assert_shape(aux["stages"], [(2, *s, c) for s, c in zip(stage_spatial, (16, 24, 40, 112, 320))])


def test_b3_3d_bf16_keeps_float32_params():
  model = EfficientNetB3(num_classes=3, spatial_dims=3, dtype=jnp.bfloat16)
  (logits, aux), variables = _init_shapes(model, jnp.zeros((1, 17, 18, 19, 2)))
  chex.assert_shape(logits, (1, 3))
  chex.assert_shape(aux["features"], (1, 1536))  # 4 * make_divisible(320 * 1.2)
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_group_norm_3d_has_no_batch_stats():
  model = EfficientNetB0(num_classes=2, spatial_dims=3, norm="group", width_mult=0.5)
  (logits, _), variables = _init_shapes(model, jnp.zeros((1, 17, 18, 19, 1)))
  chex.assert_shape(logits, (1, 2))
  assert set(variables) == {"params"}


def test_stochastic_depth_rates_increase_linearly():
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, mobile_blocks.InvertedResidual) and context.method_name == "__call__":
      rates.append(context.module.drop_rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _init_shapes(EfficientNetB0(num_classes=2), jnp.zeros((1, 17, 17, 1)))
  np.testing.assert_allclose(rates, [0.2 * i / 16 for i in range(16)])  # torchvision's schedule


def test_stochastic_depth_drops_whole_samples():
  x = jnp.ones((256, 3, 4, 2))

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return mobile_blocks.stochastic_depth(x, 0.25, train)

  out = Drop().apply({}, x, True, rngs={"dropout": KEY})
  per_sample = np.asarray(out).reshape(256, -1)
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
  assert (per_sample.min(1) == per_sample.max(1)).all()  # one decision per sample
  assert 0.1 < (per_sample[:, 0] == 0).mean() < 0.4
  np.testing.assert_array_equal(Drop().apply({}, x, False), x)  # identity in eval mode


def test_make_divisible_follows_torchvision():
  assert [mobile_blocks.make_divisible(v) for v in (3, 16 * 1.2, 32 * 1.1, 40 * 1.1, 1280)] == [8, 24, 32, 48, 1280]


def test_train_step_gradients_are_finite():
  # Depth 0.5 keeps residual blocks with stochastic depth > 0 but halves the compile time.
  model = EfficientNetB0(num_classes=3, width_mult=0.25, depth_mult=0.5)
  x = jax.random.normal(KEY, (2, 17, 20, 1))
  variables = _numpy_variables(model, x)

  value, logits, state, grads = train_mode_gradients(model, variables, x)
  assert np.isfinite(value) and np.std(logits) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["stem"]["conv"]["kernel"]).sum() > 0
  assert not np.allclose(state["batch_stats"]["stem"]["norm"]["mean"], 0.0)


def test_remat_traces_gradient():
  model = EfficientNetB0(num_classes=2, remat=True, width_mult=0.25)
  x = jnp.zeros((2, 17, 17, 1))
  variables = _init_shapes(model, x)[1]

  def loss(params, state):
    (logits, _), _ = model.apply({**state, "params": params}, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": KEY})
    return jnp.sum(logits)

  grads = jax.eval_shape(jax.grad(loss), variables["params"], {"batch_stats": variables["batch_stats"]})
  chex.assert_trees_all_equal_shapes(grads, variables["params"])


def test_rank_and_too_small_errors():
  with pytest.raises(ValueError, match=r"EfficientNetB0\(spatial_dims=2\) expects input \(B, y, x, C\)"):
    _init_shapes(EfficientNetB0(num_classes=2), jnp.zeros((1, 17, 17, 17, 1)))
  # 16 -> 8 -> 4 -> 2 -> 1: the fifth stride-2 layer (stage 6) would see a 1-voxel axis.
  with pytest.raises(ValueError, match=r"EfficientNetB0: input spatial shape \(16, 40\) is too small: stage "
                                       r"'stage6'.*minimum input size is 17"):
    _init_shapes(EfficientNetB0(num_classes=2), jnp.zeros((1, 16, 40, 1)))
  with pytest.raises(ValueError, match=r"\(1, 32, 32\) is too small: stage 'stem'"):
    _init_shapes(EfficientNetB0(num_classes=2, spatial_dims=3), jnp.zeros((1, 1, 32, 32, 1)))


def test_build_bad_kwarg_lists_fields():
  with pytest.raises(ValueError, match=r"unknown key 'width' for model 'efficientnet_b2'.*width_mult"):
    models.build_model("efficientnet_b2", dict(num_classes=2, width=2))
