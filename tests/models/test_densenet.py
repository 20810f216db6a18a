"""Tests for medjax.models.densenet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import base
from medjax.models.densenet import DenseNet121
from tests.models.zoo_testing import KEY, num_params as _num_params, variables_and_outputs as _init_apply

TINY = dict(growth_rate=4, init_features=8, bn_size=2)


def test_param_count_matches_torchvision():
  model = base.build_model("densenet121", dict(num_classes=1000))
  variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 224, 224, 3)))
  assert _num_params(variables["params"]) == 7_978_856
  assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("spatial,small_input,stage_spatial", [
  ((32, 40), False, [(8, 10), (4, 5), (2, 2), (1, 1)]),  # 7^2 s2 stem + s2 max-pool, then /2 per transition
  ((29, 32, 40), False, [(8, 8, 10), (4, 4, 5), (2, 2, 2), (1, 1, 1)]),  # 29 is the smallest valid length
  ((8, 12), True, [(8, 12), (4, 6), (2, 3), (1, 1)]),
], ids=["2d", "3d", "2d_small_input"])
def test_densenet121_shapes_and_aux(spatial, small_input, stage_spatial):
  model = DenseNet121(num_classes=5, spatial_dims=len(spatial), small_input=small_input, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((2, *spatial, 1)))
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "stages"}
  # Channels: 8 + 6*4 = 32 -> 16 + 12*4 = 64 -> 32 + 24*4 = 128 -> 64 + 16*4 = 128.
  chex.assert_shape(aux["stages"], [(2, *s, c) for s, c in zip(stage_spatial, (32, 64, 128, 128))])
  chex.assert_shape(aux["features"], (2, 128))
  assert aux["features"].dtype == jnp.float32
  chex.assert_shape(variables["params"]["transition1"]["conv"]["kernel"], (*(1,) * len(spatial), 32, 16))


def test_densenet_bf16_compute_keeps_fp32_params():
  model = DenseNet121(num_classes=3, small_input=True, dtype=jnp.bfloat16, block_config=(2, 2), **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, 4, 6, 2)))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][0].dtype == jnp.bfloat16


def test_densenet_train_step_finite_grads_and_remat_matches():
  kw = dict(num_classes=2, small_input=True, block_config=(2, 2), **TINY)
  plain, remat = DenseNet121(**kw), DenseNet121(**kw, remat=True)
  x = jax.random.normal(KEY, (3, 4, 6, 1)) + 1.0
  variables = jax.jit(lambda x: plain.init(KEY, x, train=False))(x)

  def loss(params, model):
    (logits, _), new_state = model.apply({**variables, "params": params}, x, train=True,
                                         mutable=["batch_stats"])
    return jnp.mean(logits ** 2), (logits, new_state)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (y1, s1)), g1 = grad(variables["params"], plain)
  (_, (y2, s2)), g2 = grad(variables["params"], remat)
  assert np.isfinite(y1).all() and np.std(y1) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(g1))
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-5)
  assert not np.allclose(s1["batch_stats"]["stem_norm"]["mean"], variables["batch_stats"]["stem_norm"]["mean"])


def test_densenet_errors():
  with pytest.raises(ValueError, match=r"DenseNet121\(spatial_dims=2\) expects input \(B, y, x, C\)"):
    DenseNet121(num_classes=2, **TINY).init(KEY, jnp.ones((1, 4, 32, 32, 1)), train=False)
  with pytest.raises(ValueError, match=r"DenseNet121: input spatial size \(32, 32, 28\) is too small: "
                                       r"transition 3 would shrink spatial axis 2 \(length 28\) below 1 voxel; "
                                       r"DenseNet121 needs at least 29 voxels per spatial axis"):
    DenseNet121(num_classes=2, spatial_dims=3, **TINY).init(KEY, jnp.ones((1, 32, 32, 28, 1)), train=False)
  with pytest.raises(ValueError, match=r"needs at least 8 voxels"):
    DenseNet121(num_classes=2, small_input=True, **TINY).init(KEY, jnp.ones((1, 7, 8, 1)), train=False)
