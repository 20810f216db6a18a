"""Tests for medjax.models.shufflenet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import shufflenet  # noqa: F401  (registers the models)
from medjax.models.shufflenet import ShuffleNetV2x05, ShuffleNetV2x10, ShuffleNetV2x20, channel_shuffle
from tests.models.zoo_testing import KEY, num_params as _num_params, init_shapes as _init_shapes, host_variables_for as _numpy_variables


@pytest.mark.parametrize("name,expected", [
  ("shufflenet_v2_x0_5", 1_366_792), ("shufflenet_v2_x1_0", 2_278_604), ("shufflenet_v2_x1_5", 3_503_624),
  ("shufflenet_v2_x2_0", 7_393_996)])
def test_param_count_matches_torchvision(name, expected):
  # Flax's "params" holds what torchvision counts (weights, BN scale / shift, classifier bias); running
  # statistics live in "batch_stats" as torchvision's buffers do.
  model = models.build_model(name, dict(num_classes=1000))
  _, shapes = _init_shapes(model, jnp.zeros((1, 32, 32, 3)))
  assert _num_params(shapes["params"]) == expected
  assert set(shapes) == {"params", "batch_stats"}


@pytest.mark.parametrize("spatial,stage_spatial", [
  ((17, 24), [(3, 3), (2, 2), (1, 1)]),             # stem 9x12, max-pool 5x6
  ((17, 20, 33), [(3, 3, 5), (2, 2, 3), (1, 1, 2)]),  # stem 9x10x17, max-pool 5x5x9
], ids=["2d", "3d"])
def test_shapes_and_aux(spatial, stage_spatial):
  model = ShuffleNetV2x10(num_classes=5, spatial_dims=len(spatial))
  (logits, aux), variables = _init_shapes(model, jnp.zeros((2, *spatial, 1)))
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "stages"}
  chex.assert_shape(aux["features"], (2, 1024))
  chex.assert_shape(aux["stages"], [(2, *s, c) for s, c in zip(stage_spatial, (116, 232, 464))])
  # Stride-1 units keep half the channels untouched, so only stride-2 units have a left branch.
  params = variables["params"]
  assert "left_depthwise" in params["stage2_block0"] and "left_depthwise" not in params["stage2_block1"]


def test_x2_0_3d_bf16_keeps_float32_params():
  model = ShuffleNetV2x20(num_classes=3, spatial_dims=3, dtype=jnp.bfloat16)
  (logits, aux), variables = _init_shapes(model, jnp.zeros((1, 17, 18, 19, 2)))
  chex.assert_shape(logits, (1, 3))
  chex.assert_shape(aux["features"], (1, 2048))
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_channel_shuffle_interleaves_groups():
  x = jnp.arange(12).reshape(1, 2, 6)  # (B, x, C): any rank, channels last
  np.testing.assert_array_equal(channel_shuffle(x, 2)[0, 1], [6, 9, 7, 10, 8, 11])
  np.testing.assert_array_equal(channel_shuffle(x, 3)[0, 0], [0, 2, 4, 1, 3, 5])


def test_train_step_gradients_are_finite_and_remat_matches():
  kw = dict(num_classes=3, stage_blocks=(1, 2, 1))  # both unit kinds, a short compile
  plain, remat = ShuffleNetV2x05(**kw), ShuffleNetV2x05(**kw, remat=True)
  x = jax.random.normal(KEY, (2, 17, 20, 1))
  variables = _numpy_variables(plain, x)

  def loss(params, model):
    (logits, _), new_state = model.apply({**variables, "params": params}, x, train=True,
                                         mutable=["batch_stats"])
    return jnp.mean(logits ** 2), (logits, new_state)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (v1, (y1, s1)), g1 = grad(variables["params"], plain)
  (_, (y2, s2)), g2 = grad(variables["params"], remat)
  assert np.isfinite(v1) and np.std(y1) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(g1))
  assert np.abs(g1["stem"]["conv"]["kernel"]).sum() > 0
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match=r"ShuffleNetV2x10\(spatial_dims=2\) expects input \(B, y, x, C\)"):
    _init_shapes(ShuffleNetV2x10(num_classes=2), jnp.zeros((1, 17, 17, 17, 1)))
  # 16 -> 8 (stem) -> 4 (max-pool) -> 2 (stage 2) -> 1 (stage 3): stage 4 would see a 1-voxel axis.
  with pytest.raises(ValueError, match=r"ShuffleNetV2x10: input spatial shape \(24, 16, 16\) is too small: "
                                       r"stage 'stage4'.*minimum input size is 17"):
    _init_shapes(ShuffleNetV2x10(num_classes=2, spatial_dims=3), jnp.zeros((1, 24, 16, 16, 1)))
  with pytest.raises(ValueError, match=r"stage_channels=\(24, 48, 1024\) needs 5 entries"):
    _init_shapes(ShuffleNetV2x05(num_classes=2, stage_channels=(24, 48, 1024)), jnp.zeros((1, 17, 17, 1)))
  with pytest.raises(ValueError, match=r"unknown key 'width' for model 'shufflenet_v2_x1_5'"):
    models.build_model("shufflenet_v2_x1_5", dict(num_classes=2, width=2))
