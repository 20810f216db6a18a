"""Tests for medjax.models.mobilenet (MobileNetV2, MobileNetV3 Small / Large)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import layers, mobilenet
from medjax.models.mobilenet import MobileNetV2, MobileNetV3Large, MobileNetV3Small
from tests.models.zoo_testing import (KEY, host_variables_for as _numpy_variables, init_shapes as _init_shapes,
                         num_params as _num_params, train_mode_gradients)


@pytest.mark.parametrize("name,expected", [
  ("mobilenet_v2", 3_504_872), ("mobilenet_v3_large", 5_483_032), ("mobilenet_v3_small", 2_542_856)])
def test_param_count_matches_torchvision(name, expected):
  # Flax's "params" holds what torchvision counts (weights, biases, BN scale / shift); running statistics
  # live in "batch_stats" as torchvision's buffers do.
  model = models.build_model(name, dict(num_classes=1000))
  _, shapes = _init_shapes(model, jnp.zeros((1, 32, 32, 3)))
  assert _num_params(shapes["params"]) == expected
  assert set(shapes) == {"params", "batch_stats"}


SPATIAL = {2: ((17, 24), [(9, 12), (5, 6), (3, 3), (2, 2), (1, 1)]),
           3: ((17, 20, 33), [(9, 10, 17), (5, 5, 9), (3, 3, 5), (2, 2, 3), (1, 1, 2)])}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls,widths,num_features", [
  (MobileNetV2, (16, 24, 32, 96, 320), 1280),
  (MobileNetV3Large, (16, 24, 40, 112, 160), 960),
  (MobileNetV3Small, (16, 16, 24, 48, 96), 576),
], ids=["v2", "v3_large", "v3_small"])
def test_shapes_and_aux(cls, widths, num_features, spatial_dims):
  spatial, stage_spatial = SPATIAL[spatial_dims]
  model = cls(num_classes=5, spatial_dims=spatial_dims)
  (logits, aux), variables = _init_shapes(model, jnp.zeros((2, *spatial, 1)))
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "stages"}
  chex.assert_shape(aux["features"], (2, num_features))
  chex.assert_shape(aux["stages"], [(2, *s, c) for s, c in zip(stage_spatial, widths)])
  assert "batch_stats" in variables


def test_v3_squeeze_widths_and_bf16_params():
  model = MobileNetV3Large(num_classes=3, spatial_dims=3, dtype=jnp.bfloat16)
  (logits, aux), variables = _init_shapes(model, jnp.zeros((1, 17, 18, 19, 2)))
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  # torchvision's squeeze width make_divisible(expanded // 4): 72 -> 24 (not 18), 120 -> 32, 672 -> 168.
  params = variables["params"]
  assert [params[f"block{i}"]["se"]["fc1"]["kernel"].shape for i in (3, 4, 11)] == [(72, 24), (120, 32),
                                                                                     (672, 168)]
  assert "se" not in params["block6"] and "expand" not in params["block0"]


def test_hard_activations_match_pytorch_definitions():
  x = jnp.linspace(-5.0, 5.0, 41)
  relu6 = jnp.clip(x + 3.0, 0.0, 6.0)
  np.testing.assert_allclose(layers.activation("hard_sigmoid")(x), relu6 / 6.0, atol=1e-6)
  np.testing.assert_allclose(layers.activation("hard_swish")(x), x * relu6 / 6.0, atol=1e-6)


def test_train_step_gradients_are_finite():
  model = MobileNetV3Small(num_classes=3, width_mult=0.5)
  x = jax.random.normal(KEY, (2, 20, 17, 1))
  variables = _numpy_variables(model, x)

  value, logits, state, grads = train_mode_gradients(model, variables, x)
  assert np.isfinite(value) and np.std(logits) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["stem"]["conv"]["kernel"]).sum() > 0
  assert not np.allclose(state["batch_stats"]["stem"]["norm"]["mean"], 0.0)


def test_remat_traces_gradient():
  model = MobileNetV2(num_classes=2, remat=True, width_mult=0.5, spatial_dims=3)
  x = jnp.zeros((1, 17, 17, 18, 1))
  variables = _init_shapes(model, x)[1]

  def loss(params, state):
    (logits, _), _ = model.apply({**state, "params": params}, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": KEY})
    return jnp.sum(logits)

  grads = jax.eval_shape(jax.grad(loss), variables["params"], {"batch_stats": variables["batch_stats"]})
  chex.assert_trees_all_equal_shapes(grads, variables["params"])


@pytest.mark.parametrize("cls,stage", [(MobileNetV2, "stage6"), (MobileNetV3Large, "block12"),
                                       (MobileNetV3Small, "block8")])
def test_too_small_input_names_stage(cls, stage):
  name = cls.__name__
  with pytest.raises(ValueError, match=rf"{name}: input spatial shape \(40, 16\) is too small: stage "
                                       rf"'{stage}'.*minimum input size is 17"):
    _init_shapes(cls(num_classes=2), jnp.zeros((1, 40, 16, 1)))


def test_rank_and_arch_errors():
  with pytest.raises(ValueError, match=r"MobileNetV3Small\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    _init_shapes(MobileNetV3Small(num_classes=2, spatial_dims=3), jnp.zeros((1, 17, 17, 1)))
  with pytest.raises(ValueError, match=r"arch='medium' must be one of 'large', 'small'"):
    _init_shapes(mobilenet.MobileNetV3(num_classes=2, arch="medium"), jnp.zeros((1, 17, 17, 1)))
  with pytest.raises(ValueError, match=r"unknown key 'width' for model 'mobilenet_v2'.*width_mult"):
    models.build_model("mobilenet_v2", dict(num_classes=2, width=2))
