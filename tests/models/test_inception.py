"""Tests for medjax.models.inception (GoogLeNet)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import base
from medjax.models.inception import GoogLeNet
from medjax.models.layers import max_pool_ceil
from tests.models.zoo_testing import KEY, num_params as _num_params, host_variables as _host_init


@pytest.mark.parametrize("aux_heads,expected", [(False, 6_624_904), (True, 13_004_888)])
def test_param_count_matches_torchvision(aux_heads, expected):
  model = base.build_model("googlenet", dict(num_classes=1000, aux_heads=aux_heads))
  variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 224, 224, 3)))
  assert _num_params(variables["params"]) == expected
  assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("spatial,stage_spatial", [
  ((15, 33), [(4, 8), (2, 4), (1, 2), (1, 1)]),  # ceil-mode pools: 15 is the smallest valid length
  ((16, 20, 35), [(4, 5, 9), (2, 2, 4), (1, 1, 2), (1, 1, 1)]),
], ids=["2d", "3d"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_googlenet_shapes_and_aux(spatial, stage_spatial, train):
  model = GoogLeNet(num_classes=5, spatial_dims=len(spatial), aux_heads=True)
  x = jnp.ones((2, *spatial, 1))
  variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
  (logits, aux), _ = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"], rngs={"dropout": KEY}), variables, x)
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == ({"features", "stages", "aux_logits"} if train else {"features", "stages"})
  chex.assert_shape(aux["stages"], [(2, *s, c) for s, c in zip(stage_spatial, (192, 480, 832, 1024))])
  chex.assert_shape(aux["features"], (2, 1024))
  assert aux["features"].dtype == jnp.float32
  if train:
    chex.assert_shape(aux["aux_logits"], [(2, 5), (2, 5)])
    assert all(a.dtype == jnp.float32 for a in aux["aux_logits"])
  # The aux heads flatten a 4-per-axis pooled map of 128 channels.
  chex.assert_shape(variables["params"]["aux1"]["fc1"]["kernel"], (128 * 4 ** len(spatial), 1024))


def test_googlenet_bf16_compute_keeps_fp32_params():
  model = GoogLeNet(num_classes=3, dtype=jnp.bfloat16)
  (logits, aux), variables = jax.eval_shape(
    lambda x: model.init_with_output(KEY, x, train=False), jnp.ones((1, 15, 15, 3)))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16


def test_googlenet_train_step_finite_grads_with_aux_heads():
  model = GoogLeNet(num_classes=2, aux_heads=True)
  x = jax.random.normal(KEY, (2, 15, 15, 1))
  variables = _host_init(jax.eval_shape(lambda x: model.init(KEY, x, train=False), x))

  @jax.jit
  def step(params):
    def loss(params):
      (logits, aux), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(1, impl="rbg")})
      return jnp.mean(logits ** 2) + 0.3 * sum(jnp.mean(a ** 2) for a in aux["aux_logits"]), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, logits), grads = step(variables["params"])
  assert np.isfinite(value) and np.isfinite(logits).all()
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["aux2"]["fc2"]["kernel"]).sum() > 0  # the aux losses reach their heads


def test_max_pool_ceil_matches_pytorch_ceil_mode():
  x = jnp.arange(2 * 5 * 4, dtype=jnp.float32).reshape(1, 5, 4, 2) * jnp.array([1.0, -1.0])
  y = max_pool_ceil(x, 3, 2)
  chex.assert_shape(y, (1, 2, 2, 2))  # 5 -> 2, 4 -> 2 (the last window is partial)
  ref = np.stack([[x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(0, 1)) for j in range(2)]
                  for i in range(2)])
  np.testing.assert_array_equal(y[0], ref)


def test_googlenet_errors():
  with pytest.raises(ValueError, match=r"GoogLeNet\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    GoogLeNet(num_classes=2, spatial_dims=3).init(KEY, jnp.ones((1, 32, 32, 1)), train=False)
  with pytest.raises(ValueError, match=r"GoogLeNet: input spatial size \(64, 14\) is too small: max-pool 3 "
                                       r"would shrink spatial axis 1 \(length 14\) below 1 voxel; GoogLeNet "
                                       r"needs at least 15 voxels per spatial axis"):
    GoogLeNet(num_classes=2).init(KEY, jnp.ones((1, 64, 14, 1)), train=False)
