"""Per-example gradient norms (`medjax.privacy.ghost_norms`) against the direct `vmap(grad)` reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.models import build_model
from medjax.privacy.ghost_norms import UnsupportedModel, grad_norms, supported

RTOL = 1e-4


def _logits(model, params, x, kwargs):
  out = model.apply(params, x, **kwargs)
  return out[0] if isinstance(out, tuple) else out


def _per_example_loss(model, x, y, **kwargs):
  def loss(params):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(model, params, x, kwargs).astype(jnp.float32), y)
  return loss


def _reference(model, params, x, y, **kwargs):
  """||d loss_i / d params|| from per-example gradients of the whole model (vmap of grad)."""
  def one(p, xi, yi):
    logits = _logits(model, p, xi[None], kwargs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]
  grads = jax.vmap(jax.grad(one), (None, 0, 0))(params, x, y)
  return jnp.sqrt(sum(jnp.sum(jnp.square(v.reshape(v.shape[0], -1).astype(jnp.float32)), axis=1)
                      for v in jax.tree.leaves(grads)))


def _init(model, x, **kwargs):
  """Random parameters of the model's shapes, drawn in numpy: a Flax init of a ResNet compiles for seconds
  under jit and dispatches for seconds without it. Kernels ~ N(0, 1 / fan_in); scales ~ 1, biases ~ 0.1."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
    return jnp.asarray(rng.normal(size=leaf.shape) * scale + (name == "scale"), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: model.init(jax.random.key(1), x, **kwargs)))


def _check(model, x, num_classes=3, ghosts=(None,), rtol=RTOL, **kwargs):
  """grad_norms (under jit, once per kernel-norm strategy in `ghosts`) against the vmap(grad) reference."""
  y = jnp.arange(x.shape[0]) % num_classes
  params = _init(model, x, **kwargs)
  loss = _per_example_loss(model, x, y, **kwargs)
  # Under jit: an eager vmap(grad) of a ResNet takes seconds of op-by-op dispatch.
  expected = jax.jit(lambda p: _reference(model, p, x, y, **kwargs))(params)
  for ghost in ghosts:
    norms, losses = jax.jit(lambda p: grad_norms(loss, p, ghost=ghost))(params)
    assert norms.shape == (x.shape[0],) and norms.dtype == jnp.float32 and losses.dtype == jnp.float32
    np.testing.assert_allclose(norms, expected, rtol=rtol, err_msg=f"ghost={ghost}")
  np.testing.assert_allclose(losses, jax.jit(loss)(params), rtol=rtol)
  assert supported(loss, params) == (True, "")
  return params


def _input(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    # A token-wise Dense (T = 5 positions per example) and a plain one (T = 1).
    x = nn.relu(nn.Dense(6)(x))
    x = nn.Dense(7, use_bias=False)(x.mean(axis=1))
    return nn.Dense(3)(nn.tanh(x))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(5, (3, 2), strides=2, padding="VALID", use_bias=False)(x))
    x = nn.relu(nn.Conv(6, (3, 3), kernel_dilation=2, padding=((2, 1), (1, 2)))(x))
    x = nn.relu(nn.Conv(3, (2, 2), padding="CIRCULAR")(x))
    x = nn.Conv(3, (2, 2), padding=((1, 1), (0, 1)), input_dilation=(1, 2))(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class CNN3D(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (1, 3, 3), strides=(1, 2, 2), padding="SAME")(x))
    x = nn.relu(nn.Conv(4, (3, 3, 3), padding=1, use_bias=False)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2, 3)))


class Grouped(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), padding="SAME")(x)
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, feature_group_count=6, padding="SAME")(x))  # depthwise
    x = nn.relu(nn.Conv(12, (3, 3), feature_group_count=6, padding="SAME")(x))  # depthwise, multiplier 2
    x = nn.relu(nn.Conv(4, (1, 1), feature_group_count=2)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class Norms(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding="SAME")(x)
    x = nn.relu(nn.GroupNorm(num_groups=4)(x))
    x = nn.GroupNorm(num_groups=None, group_size=1, use_bias=False)(x)  # instance norm, scale only
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1, x.shape[-1]))  # per token
    x = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=-1, use_scale=False)(x)
    return nn.Dense(3)(x.mean(axis=1))


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(x.shape[-1])
    norm = nn.LayerNorm()
    x = nn.tanh(norm(dense(x)))
    x = nn.tanh(norm(dense(x)))  # same kernel, bias, scale: per-example gradients add across the two calls
    return nn.Dense(3)(x)


class Tokens(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(11, 4)
    return nn.Dense(3)(embed(ids).mean(axis=1))


def test_mlp():
  _check(MLP(), _input((4, 5, 3)), ghosts=(None, True, False))


def test_batch_traced_by_the_callers_jit():
  # The DP step closes per_example_loss over a batch that is itself a tracer of the step's jit.
  model, x, y = CNN3D(), _input((2, 3, 4, 5, 1)), jnp.array([0, 2])
  params = _init(model, x)
  step = jax.jit(lambda p, x, y: grad_norms(_per_example_loss(model, x, y), p))
  np.testing.assert_allclose(step(params, x, y)[0], jax.jit(_reference, static_argnums=0)(model, params, x, y),
                             rtol=RTOL)


def test_cnn_2d_padding_strides_dilation():
  _check(CNN(), _input((3, 9, 7, 2)), ghosts=(True, False))


def test_cnn_3d():
  _check(CNN3D(), _input((2, 3, 6, 5, 2)))


def test_grouped_and_depthwise_conv():
  _check(Grouped(), _input((3, 6, 5, 2)), ghosts=(True, False))


def test_group_and_layer_norm():
  _check(Norms(), _input((3, 5, 4, 2)))


def test_shared_module_pools_calls():
  _check(Shared(), _input((4, 5)))


def test_embed_with_repeated_tokens():
  ids = jnp.array([[1, 1, 3, 10], [0, 2, 2, 2], [5, 6, 7, 8]])
  _check(Tokens(), ids)


class HalfCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), dtype=jnp.bfloat16)(x)
    x = nn.relu(nn.GroupNorm(num_groups=2, dtype=jnp.bfloat16)(x))
    return nn.Dense(3, dtype=jnp.bfloat16)(x.mean(axis=(1, 2)))


def test_bfloat16_compute_dtype():
  # The reference's per-example gradients are bfloat16 too; grad_norms reduces in float32.
  _check(HalfCNN(), _input((3, 6, 5, 2)), rtol=3e-2)


def test_resnet18_group_norm():
  model = build_model("resnet18", dict(num_classes=3, norm="group", small_input=True, width=8))
  _check(model, _input((4, 16, 16, 1)), train=True)


def test_vit_position_embedding_is_named():
  model = build_model("vit_s16", dict(num_classes=3, image_size=8, patch_size=4, hidden_size=8, num_layers=1,
                                      num_heads=2, mlp_dim=8))
  x = _input((2, 8, 8, 1))
  params = _init(model, x, train=False)
  loss = _per_example_loss(model, x, jnp.array([0, 1]), train=False)
  ok, reason = supported(loss, params)
  assert not ok
  for leaf in ("transformer/encoder/pos_embedding", "transformer/cls_token", "patch_embed/kernel"):
    assert leaf in reason
  with pytest.raises(UnsupportedModel, match="pos_embedding"):
    grad_norms(loss, params)


class FreeParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    shift = self.param("shift", nn.initializers.zeros, (x.shape[-1],))
    return nn.Dense(2)(x + shift)


class DenseThenScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    gain = self.param("gain", nn.initializers.ones, ())
    return jax.jit(jnp.multiply)(nn.Dense(2)(x), gain)  # the use hides inside a nested jaxpr


class TrainBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)(x)
    return nn.Dense(2)(x)


class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.remat(nn.Dense)(3, name="inner")(x))


@pytest.mark.parametrize("model, match", [
  (FreeParam(), "input of layer 'Dense_0': shift"),
  (Remat(), r"layers \['inner'\] run inside a lifted transform"),
  (DenseThenScale(), "used outside a supported layer.*: gain"),
  (TrainBatchNorm(), "BatchNorm 'BatchNorm_0' in training mode"),
])
def test_unsupported_models_are_named(model, match):
  x = _input((3, 4))
  variables = model.init(jax.random.key(0), x)

  def loss_fn(p):
    logits = model.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(3, int))
  with pytest.raises(UnsupportedModel, match=match):
    grad_norms(loss_fn, variables["params"])
  assert not supported(loss_fn, variables["params"])[0]


def test_frozen_layer_outside_params_is_excluded():
  model = MLP()
  x, y = _input((3, 5, 3)), jnp.array([0, 1, 2])
  params = model.init(jax.random.key(0), x)["params"]
  frozen = {k: v for k, v in params.items() if k == "Dense_0"}
  trained = {k: v for k, v in params.items() if k != "Dense_0"}

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": {**frozen, **p}}, x), y)

  def one(p, xi, yi):
    logits = model.apply({"params": {**frozen, **p}}, xi[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]
  grads = jax.jit(jax.vmap(jax.grad(one), (None, 0, 0)))(trained, x, y)
  expected = jnp.sqrt(sum(jnp.sum(jnp.square(v.reshape(3, -1)), axis=1) for v in jax.tree.leaves(grads)))
  np.testing.assert_allclose(jax.jit(lambda p: grad_norms(loss, p)[0])(trained), expected, rtol=RTOL)


def test_loss_must_be_per_example():
  model = MLP()
  x = _input((2, 5, 3))
  params = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"shape \(B,\), got \(\)"):
    grad_norms(lambda p: model.apply(p, x).sum(), params)
