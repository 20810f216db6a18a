"""Tests for medjax.models.vit: the ViT variants and the CNN-ViT hybrid."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import layers, vit
from medjax.models.vit import PatchEmbed, ViT, ViTHybrid
from tests.models.zoo_testing import KEY, num_params as _num_params, variables_and_outputs as _init_apply

TINY = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
# 2D and 3D, non-square, with per-axis patches; (image_size, patch_size, token grid)
CASES = [((8, 12), 4, (2, 3)), ((4, 8, 12), (2, 4, 4), (2, 2, 3))]


@pytest.mark.parametrize("name,expected", [
  ("vit_ti16", 5_717_416), ("vit_s16", 22_050_664), ("vit_b16", 86_567_656), ("vit_l16", 304_326_632)])
def test_param_count_matches_reference(name, expected):
  # vit_b16 / vit_l16: torchvision vit_b_16 / vit_l_16; Ti / S: the same layout at DeiT sizes (timm's
  # vit_tiny / vit_small_patch16_224). 224^2, 3 channels, 1000 classes.
  model = models.build_model(name, dict(num_classes=1000))
  variables, _ = _init_apply(model, jnp.zeros((1, 224, 224, 3)))
  assert set(variables) == {"params"}
  assert _num_params(variables["params"]) == expected


@pytest.mark.parametrize("classifier", ["token", "gap"])
@pytest.mark.parametrize("size,patch,grid", CASES, ids=["2d", "3d"])
def test_vit_shapes_and_aux(size, patch, grid, classifier):
  model = ViT(num_classes=5, spatial_dims=len(size), image_size=size, patch_size=patch,
              classifier=classifier, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((2, *size, 3)))
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"features", "tokens", "hidden_states"}
  chex.assert_shape(aux["features"], (2, 16))
  assert aux["features"].dtype == jnp.float32
  num_tokens = int(np.prod(grid)) + (classifier == "token")
  chex.assert_shape(aux["tokens"], (2, num_tokens, 16))
  chex.assert_shape(aux["hidden_states"], [(2, num_tokens, 16)] * 2)
  params = variables["params"]
  chex.assert_shape(params["patch_embed"]["kernel"], (*layers.to_tuple(patch, len(size)), 3, 16))
  chex.assert_shape(params["transformer"]["encoder"]["pos_embedding"], (1, num_tokens, 16))
  assert ("cls_token" in params["transformer"]) == (classifier == "token")


@pytest.mark.parametrize("size,patch", [((32, 48), 1), ((16, 32, 64), (1, 2, 2))], ids=["2d", "3d"])
def test_hybrid_shapes_and_aux(size, patch):
  nd = len(size)
  model = ViTHybrid(num_classes=4, spatial_dims=nd, image_size=size, width=4, stage_sizes=(1, 1, 1),
                    patch_size=patch, **TINY)
  _, (logits, aux) = _init_apply(model, jnp.ones((2, *size, 1)))
  chex.assert_shape(logits, (2, 4))
  assert set(aux) == {"features", "tokens", "hidden_states", "stages"}
  # stride 4 (stem + max-pool), then 2 per later stage: 16
  stage_sizes = [tuple(s // (4 * 2 ** i) for s in size) for i in range(3)]
  chex.assert_shape(aux["stages"], [(2, *s, 4 * 2 ** i) for i, s in enumerate(stage_sizes)])
  grid = [g // p for g, p in zip(stage_sizes[-1], layers.to_tuple(patch, nd))]
  chex.assert_shape(aux["tokens"], (2, int(np.prod(grid)) + 1, 16))


def test_hybrid_default_param_count_is_small():
  model = models.build_model("vit_hybrid", dict(num_classes=1000))
  variables, (_, aux) = _init_apply(model, jnp.zeros((1, 224, 224, 3)))
  assert _num_params(variables["params"]) == 3_624_520
  chex.assert_shape(aux["tokens"], (1, 14 * 14 + 1, 192))


@pytest.mark.parametrize("model", [
  ViT(num_classes=3, spatial_dims=3, image_size=(4, 8, 12), patch_size=(2, 4, 4), dtype=jnp.bfloat16, **TINY),
  ViTHybrid(num_classes=3, spatial_dims=3, image_size=(8, 16, 16), width=4, stage_sizes=(1,),
            dtype=jnp.bfloat16, **TINY)], ids=["vit", "hybrid"])
def test_bf16_compute_keeps_float32_params(model):
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, *model.image_size, 2)))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and aux["features"].dtype == jnp.float32
  assert aux["tokens"].dtype == jnp.bfloat16


def test_patch_embed_is_a_kernel_equals_stride_convolution():
  x = jax.random.normal(KEY, (2, 4, 6, 9, 3))
  layer = PatchEmbed(5, (2, 3, 3))
  variables = layer.init(KEY, x)
  y = layer.apply(variables, x)
  p = variables["params"]
  ref = jax.lax.conv_general_dilated(x, p["kernel"], (2, 3, 3), "VALID",
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + p["bias"]
  chex.assert_shape(y, (2, 2, 2, 3, 5))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_self_attention_matches_reference():
  x = jax.random.normal(KEY, (2, 5, 8))
  layer = vit.SelfAttention(num_heads=2)
  p = layer.init(KEY, x, train=False)["params"]
  y = layer.apply({"params": p}, x, train=False)
  # Fused QKV channels are (3, heads, head_dim), as torchvision's in_proj and MONAI's qkv.
  qkv = (np.asarray(x) @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])).reshape(2, 5, 3, 2, 4)
  q, k, v = (np.moveaxis(qkv[:, :, i], 2, 1) for i in range(3))  # (B, heads, N, 4)
  logits = q @ np.swapaxes(k, -1, -2) / 2.0
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.moveaxis(weights @ v, 1, 2).reshape(2, 5, 8)
  ref = heads @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def _finite_grads(model, x):
  variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)

  def loss(params):
    logits, aux = model.apply({**variables, "params": params}, x, train=True,
                              rngs={"dropout": jax.random.key(1, impl="rbg")}, mutable=False)
    # The zero-initialised head passes no gradient down; the features term reaches every parameter.
    return jnp.mean(logits ** 2) + jnp.mean(aux["features"] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all(), path
  return grads


def test_vit_train_step_with_dropout_and_remat_gives_finite_gradients():
  model = ViT(num_classes=2, image_size=(8, 12), patch_size=4, dropout=0.1, attention_dropout=0.1,
              remat=True, **TINY)
  grads = _finite_grads(model, jax.random.normal(KEY, (2, 8, 12, 1)))
  assert np.abs(grads["patch_embed"]["kernel"]).sum() > 0
  assert np.abs(grads["transformer"]["encoder"]["block0"]["attn"]["qkv"]["kernel"]).sum() > 0


def test_hybrid_3d_gives_finite_gradients():
  model = ViTHybrid(num_classes=2, spatial_dims=3, image_size=(4, 8, 8), width=2, stage_sizes=(1, 1),
                    small_input=True, **TINY)
  grads = _finite_grads(model, jax.random.normal(KEY, (2, 4, 8, 8, 1)))
  assert np.abs(grads["stem_conv"]["kernel"]).sum() > 0


def test_vit_input_errors():
  model = ViT(num_classes=2, image_size=(8, 12), patch_size=4, **TINY)
  with pytest.raises(ValueError, match=r"ViT\(spatial_dims=2\) expects input \(B, y, x, C\)"):
    model.init(KEY, jnp.ones((1, 8, 8, 12, 1)), train=False)
  with pytest.raises(ValueError, match=r"ViTB16: input spatial size \(8, 12\) is too small for the patch "
                                       r"embedding stage: every axis needs at least patch_size \(16, 16\)"):
    models.build_model("vit_b16", dict(num_classes=2)).init(KEY, jnp.ones((1, 8, 12, 3)), train=False)
  with pytest.raises(ValueError, match=r"ViT: input spatial size \(8, 16\) differs from image_size "
                                       r"\(8, 12\)"):
    model.init(KEY, jnp.ones((1, 8, 16, 1)), train=False)
  with pytest.raises(ValueError, match=r"image_size \(8, 10\) must be divisible by patch_size \(4, 4\)"):
    ViT(num_classes=2, image_size=(8, 10), patch_size=4, **TINY).init(KEY, jnp.ones((1, 8, 10, 1)),
                                                                       train=False)
  with pytest.raises(ValueError, match=r"classifier must be one of \('token', 'gap'\), got 'cls'"):
    ViT(num_classes=2, image_size=8, patch_size=4, classifier="cls", **TINY).init(
      KEY, jnp.ones((1, 8, 8, 1)), train=False)


def test_hybrid_input_errors():
  with pytest.raises(ValueError, match=r"ViTHybrid\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    ViTHybrid(num_classes=2, spatial_dims=3).init(KEY, jnp.ones((1, 8, 8, 1)), train=False)
  small = ViTHybrid(num_classes=2, image_size=(8, 32), width=2, stage_sizes=(1, 1), patch_size=2, **TINY)
  with pytest.raises(ValueError, match=r"ViTHybrid: input spatial size \(8, 32\) is too small for the "
                                       r"tokeniser stage.*at least \(16, 16\) voxels"):
    _init_apply(small, jnp.ones((1, 8, 32, 1)))  # eval_shape: the error comes before any compile


def test_build_vit_bad_kwarg_lists_fields():
  with pytest.raises(ValueError, match=r"unknown key 'depth' for model 'vit_s16'.*num_layers"):
    models.build_model("vit_s16", dict(num_classes=2, depth=12))
