"""Tests for medjax.models.resnet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models.resnet import ResNet18, ResNet50
from tests.models.zoo_testing import KEY, num_params as _num_params


@pytest.mark.parametrize("name,expected", [
  ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032), ("resnet101", 44_549_160)])
def test_param_count_matches_torchvision(name, expected):
  # torchvision counts BatchNorm scale + bias as parameters and running stats as buffers, as Flax's
  # "params" / "batch_stats" split does. eval_shape: no real initialisation, no compile.
  model = models.build_model(name, dict(num_classes=1000))
  shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 224, 224, 3)))
  assert _num_params(shapes["params"]) == expected
  assert set(shapes) == {"params", "batch_stats"}


@pytest.mark.parametrize("spatial,small_input,stage_spatial", [
  ((12, 16), True, [(12, 16), (6, 8), (3, 4), (2, 2)]),
  ((8, 12, 16), False, [(2, 3, 4), (1, 2, 2), (1, 1, 1), (1, 1, 1)]),  # 7^3 s2 stem + s2 max-pool
], ids=["2d_small_input", "3d"])
def test_resnet18_shapes_and_aux(spatial, small_input, stage_spatial):
  model = ResNet18(num_classes=5, spatial_dims=len(spatial), width=4, small_input=small_input)
  x = jax.random.normal(KEY, (2, *spatial, 1))
  # eval_shape: shapes and dtypes without compiling (the remat test runs real numbers through ResNet18).
  (logits, aux), variables = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "stages"}
  chex.assert_shape(aux["features"], (2, 32))
  chex.assert_shape(aux["stages"], [(2, *s, 4 * 2 ** i) for i, s in enumerate(stage_spatial)])
  assert "batch_stats" in variables


def test_resnet50_bottleneck_3d_bf16():
  model = ResNet50(num_classes=3, spatial_dims=3, width=2, small_input=True, dtype=jnp.bfloat16)
  x = jnp.ones((1, 8, 12, 16, 2))
  # eval_shape: shapes and dtypes without compiling (the remat test runs real numbers through ResNet18).
  (logits, aux), variables = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)
  chex.assert_shape(logits, (1, 3))
  chex.assert_shape(aux["features"], (1, 2 * 8 * 4))  # expansion 4
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_batch_stats_update_in_train_mode_and_remat_matches():
  kw = dict(num_classes=2, width=4, small_input=True, stage_sizes=(1, 2))  # short: remat is per block
  plain, remat = ResNet18(**kw), ResNet18(**kw, remat=True)
  x = jax.random.normal(KEY, (4, 12, 16, 1)) + 2.0
  variables = jax.jit(lambda x: plain.init(KEY, x, train=False))(x)

  def loss(params, model):
    (logits, _), new_state = model.apply({**variables, "params": params}, x, train=True,
                                         mutable=["batch_stats"])
    return jnp.mean(logits ** 2), (logits, new_state)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (y1, s1)), g1 = grad(variables["params"], plain)
  (_, (y2, s2)), g2 = grad(variables["params"], remat)
  assert np.isfinite(y1).all() and np.std(y1) > 0
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-6)
  # Running mean moved 10% of the way towards the batch mean of the stem output (momentum 0.9).
  old = variables["batch_stats"]["stem_norm"]["mean"]
  assert not np.allclose(s1["batch_stats"]["stem_norm"]["mean"], old)


def test_resnet_rank_error():
  with pytest.raises(ValueError, match=r"ResNet18\(spatial_dims=2\) expects input \(B, y, x, C\)"):
    ResNet18(num_classes=2).init(KEY, jnp.ones((1, 4, 8, 8, 1)), train=False)


def test_build_resnet_bad_kwarg_lists_fields():
  with pytest.raises(ValueError, match=r"unknown key 'depth' for model 'resnet50'.*small_input"):
    models.build_model("resnet50", dict(num_classes=2, depth=50))
  with pytest.raises(KeyError, match="Did you mean 'resnet50'"):
    models.build_model("resnet05", dict(num_classes=2))
