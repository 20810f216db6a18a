"""Tests for medjax.models.vgg: VGG and the shared adaptive pooling / minimum-size helpers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import base
from medjax.models.layers import adaptive_avg_pool, check_min_size, pool_out_size
from medjax.models.vgg import VGG11, VGG16
from tests.models.zoo_testing import KEY, num_params as _num_params, variables_and_outputs as _init_apply

TINY = dict(width=4, head_features=(8, 8), pool_size=1)


@pytest.mark.parametrize("name,expected", [
  ("vgg11", 132_863_336), ("vgg11_bn", 132_868_840), ("vgg16", 138_357_544), ("vgg16_bn", 138_365_992)])
def test_param_count_matches_torchvision(name, expected):
  model = base.build_model(name, dict(num_classes=1000))
  variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 224, 224, 3)))
  assert _num_params(variables["params"]) == expected
  assert ("batch_stats" in variables) == name.endswith("_bn")


@pytest.mark.parametrize("spatial,pool_size,flat", [
  ((32, 40), 7, 7 * 7 * 32),  # adaptive pool upsamples a (1, 1) map to (7, 7) as PyTorch does
  ((32, 36, 44), (1, 1, 2), 2 * 32),
], ids=["2d", "3d"])
def test_vgg16_bn_shapes_and_aux(spatial, pool_size, flat):
  nd = len(spatial)
  model = base.build_model("vgg16_bn", dict(num_classes=5, spatial_dims=nd, width=4, head_features=(8, 8),
                                            pool_size=pool_size))
  variables, (logits, aux) = _init_apply(model, jnp.ones((2, *spatial, 1)))
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "stages"}
  chex.assert_shape(aux["features"], (2, 32))
  assert aux["features"].dtype == jnp.float32
  expected = [(2, *(s // 2 ** i for s in spatial), 4 * min(2 ** i, 8)) for i in range(5)]
  chex.assert_shape(aux["stages"], expected)
  chex.assert_shape(variables["params"]["fc1"]["kernel"], (flat, 8))
  chex.assert_shape(variables["params"]["stage1"]["conv2"]["kernel"], (*(3,) * nd, 4, 4))


def test_vgg_bf16_compute_keeps_fp32_params():
  model = VGG16(num_classes=3, batch_norm=True, dtype=jnp.bfloat16, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, 32, 32, 3)))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16


def test_vgg11_train_step_finite_grads_and_dropout():
  model = VGG11(num_classes=3, dropout=0.5, **TINY)
  x = jax.random.normal(KEY, (2, 32, 36, 1))
  params = jax.jit(lambda x: model.init(KEY, x, train=False))(x)["params"]

  @jax.jit
  def step(params, rng):
    def loss(params):
      logits, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
      return jnp.mean(logits ** 2), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, y1), grads = step(params, jax.random.key(1, impl="rbg"))
  (_, y2), _ = step(params, jax.random.key(2, impl="rbg"))
  assert np.isfinite(y1).all()
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["stage1"]["conv1"]["kernel"]).sum() > 0
  assert not np.allclose(y1, y2)  # dropout draws from the "dropout" stream


def test_vgg_errors():
  with pytest.raises(ValueError, match=r"VGG16\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    VGG16(num_classes=2, spatial_dims=3, **TINY).init(KEY, jnp.ones((1, 32, 32, 1)), train=False)
  with pytest.raises(ValueError, match=r"VGG16: input spatial size \(31, 64\) is too small: stage 5 max-pool "
                                       r"would shrink spatial axis 0 \(length 31\) below 1 voxel; VGG16 needs "
                                       r"at least 32 voxels per spatial axis"):
    VGG16(num_classes=2, **TINY).init(KEY, jnp.ones((1, 31, 64, 1)), train=False)
  with pytest.raises(ValueError, match=r"unknown key 'batchnorm' for model 'vgg16'.*batch_norm"):
    base.build_model("vgg16", dict(num_classes=2, batchnorm=True))


def _adaptive_reference(x, out):
  """Direct loops over PyTorch's start = floor(i n / m), end = ceil((i + 1) n / m) boxes."""
  spatial = x.shape[1:-1]
  y = np.zeros((x.shape[0], *out, x.shape[-1]), np.float64)
  for idx in np.ndindex(*out):
    box = tuple(slice((i * n) // m, -(-((i + 1) * n) // m)) for i, n, m in zip(idx, spatial, out))
    y[(slice(None), *idx)] = x[(slice(None), *box)].mean(axis=tuple(range(1, len(spatial) + 1)))
  return y


@pytest.mark.parametrize("spatial,out", [
  ((6, 8), (3, 4)),          # divides: reshape-mean
  ((5, 7), (3, 7)),          # overlapping windows, identity axis
  ((2, 10, 3), (3, 4, 1)),   # more outputs than inputs, overlap, global
])
def test_adaptive_avg_pool_matches_pytorch_rule(spatial, out):
  x = np.random.default_rng(0).normal(size=(2, *spatial, 3)).astype(np.float32)
  y = adaptive_avg_pool(jnp.asarray(x), out)
  np.testing.assert_allclose(y, _adaptive_reference(x, out), rtol=1e-5, atol=1e-6)
  assert adaptive_avg_pool(jnp.asarray(x, jnp.bfloat16), out).dtype == jnp.bfloat16


def test_pool_out_size_ceil_mode_and_min_size():
  # PyTorch: 112 -> 56 (ceil 54.5 + 1), 14 -> 7 (2x2), and a ceil window may not start in the padding.
  assert [pool_out_size(n, 3, 2, ceil_mode=True) for n in (112, 56, 2, 1)] == [56, 28, 1, 0]
  assert pool_out_size(14, 2, 2, ceil_mode=True) == 7 and pool_out_size(5, 2, 2, 0, ceil_mode=True) == 3
  assert pool_out_size(5, 2, 2, pad=1, ceil_mode=True) == 3  # 4 without the padding-only-window rule
  check_min_size((1, 4, 1), [("pool", lambda n: n // 2)], "M")
  with pytest.raises(ValueError, match="M needs at least 4 voxels"):
    check_min_size((1, 8, 3, 1), [("a", lambda n: n // 2), ("b", lambda n: n // 2)], "M")
