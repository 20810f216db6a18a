"""Tests for medjax.models.unetr."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import unetr  # noqa: F401  (registers "unetr")
from medjax.models.unetr import UNETR
from tests.models.zoo_testing import KEY, num_params as _num_params, variables_and_outputs as _init_apply

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, feature_size=4)
MONAI_UNETR_96 = 92_802_478  # MONAI 1.6.1 UNETR(1, 14, 96, feature_size=16), sum of p.numel()
# MONAI's TransformerBlock builds a `norm_cross_attn` LayerNorm (weight + bias) even without cross-attention;
# it is never used, and UNETR here does not create it.
MONAI_UNUSED = 12 * 2 * 768


def test_param_count_matches_monai():
  model = models.build_model("unetr", dict(num_classes=14))
  variables, (logits, aux) = _init_apply(model, jnp.zeros((1, 96, 96, 96, 1)))
  params = variables["params"]
  assert set(variables) == {"params"}  # instance norm without affine: no norm parameters at all
  assert _num_params(params) == MONAI_UNETR_96 - MONAI_UNUSED
  assert abs(_num_params(params) - MONAI_UNETR_96) / MONAI_UNETR_96 < 0.01
  # Block by block, MONAI's module counts (encoder1..4 -> enc0..3, decoder5..2 -> dec3..0, vit).
  expected = {"patch_embed": 16 ** 3 * 768 + 768, "encoder": 216 * 768 + 12 * 7_085_568 + 2 * 768,
              "enc0": 7_360, "enc1": 323_584, "enc2": 647_168, "enc3": 786_432, "dec3": 2_146_304,
              "dec2": 405_504, "dec1": 101_376, "dec0": 25_344, "seg_head": 16 * 14 + 14}
  assert {k: _num_params(v) for k, v in params.items()} == expected
  chex.assert_shape(logits, (1, 96, 96, 96, 14))
  chex.assert_shape(aux["bottleneck"], (1, 6, 6, 6, 768))


@pytest.mark.parametrize("size,patch,grid", [
  ((8, 12), 4, (2, 3)),
  ((8, 16, 12), (2, 4, 4), (4, 4, 3)),  # anisotropic: z reaches full resolution one level early
], ids=["2d", "3d"])
def test_unetr_shapes_and_aux(size, patch, grid):
  model = UNETR(num_classes=3, spatial_dims=len(size), image_size=size, patch_size=patch, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((2, *size, 2)))
  chex.assert_shape(logits, (2, *size, 3))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"hidden_states", "bottleneck", "features"}
  chex.assert_shape(aux["hidden_states"], [(2, int(np.prod(grid)), 32)] * 2)
  chex.assert_shape(aux["bottleneck"], (2, *grid, 32))
  chex.assert_shape(aux["features"], (2, *size, 4))
  # patch 4 = 2 levels: one transformer skip (level 1, width 8) and the image skip (level 0, width 4)
  assert set(variables["params"]) == {"patch_embed", "encoder", "enc0", "enc1", "dec1", "dec0", "seg_head"}


def test_unetr_2d_patch16_levels_and_default_skip_layers():
  model = UNETR(num_classes=2, spatial_dims=2, image_size=(32, 48), hidden_size=32, num_layers=12,
                num_heads=2, mlp_dim=64, feature_size=4)
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, 32, 48, 1)))
  chex.assert_shape(logits, (1, 32, 48, 2))
  params = variables["params"]
  # MONAI's encoder2/3/4: 2, 1 and 0 (transposed conv + residual block) pairs after the first up-conv.
  assert set(params["enc1"]) == {"up0", "up1", "res1", "up2", "res2"}
  assert set(params["enc2"]) == {"up0", "up1", "res1"}
  assert set(params["enc3"]) == {"up0"}
  chex.assert_shape(params["enc3"]["up0"]["kernel"], (32, 4 * 32))  # 2x2 offsets x feature_size * 8
  # feature widths 4, 8, 16, 32 on levels 0..3; the decoder's res blocks project 2x width -> width
  chex.assert_shape(params["dec3"]["res"]["conv3"]["kernel"], (1, 1, 64, 32))
  assert "conv3" not in params["enc1"]["res1"]  # same width: identity shortcut


def test_bf16_compute_keeps_float32_params():
  model = UNETR(num_classes=2, image_size=(4, 8, 8), patch_size=4, dtype=jnp.bfloat16, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, 4, 8, 8, 1)))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32
  assert aux["features"].dtype == jnp.bfloat16


def test_unetr_train_step_gives_finite_gradients():
  model = UNETR(num_classes=2, image_size=(4, 8, 8), patch_size=4, dropout=0.1, **TINY)
  x = jax.random.normal(KEY, (2, 4, 8, 8, 1))
  variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)

  def loss(params):
    logits, _ = model.apply({"params": params}, x, train=True,
                            rngs={"dropout": jax.random.key(1, impl="rbg")})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all(), path
  # Gradients reach the transformer through both the skip (block 1) and the bottleneck.
  assert np.abs(grads["patch_embed"]["kernel"]).sum() > 0
  assert np.abs(grads["encoder"]["block0"]["mlp2"]["kernel"]).sum() > 0


def test_unetr_input_errors():
  with pytest.raises(ValueError, match=r"UNETR\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    UNETR(num_classes=2).init(KEY, jnp.ones((1, 96, 96, 1)), train=False)
  with pytest.raises(ValueError, match=r"UNETR: input spatial size \(8, 96, 96\) is too small for the "
                                       r"patch embedding stage: every axis needs at least patch_size "
                                       r"\(16, 16, 16\)"):
    UNETR(num_classes=2).init(KEY, jnp.ones((1, 8, 96, 96, 1)), train=False)
  with pytest.raises(ValueError, match=r"UNETR: input spatial size \(8, 12\) differs from image_size "
                                       r"\(8, 8\)"):
    UNETR(num_classes=2, spatial_dims=2, image_size=8, patch_size=4, **TINY).init(
      KEY, jnp.ones((1, 8, 12, 1)), train=False)
  with pytest.raises(ValueError, match=r"patch_size \(6, 6\) must be powers of two"):
    _init_apply(UNETR(num_classes=2, spatial_dims=2, image_size=12, patch_size=6, **TINY),
                jnp.ones((1, 12, 12, 1)))
  with pytest.raises(ValueError, match=r"skip_layers \(1, 3\) must name 1 transformer blocks in \[1, 2\]"):
    _init_apply(UNETR(num_classes=2, spatial_dims=2, image_size=8, patch_size=4, skip_layers=(1, 3), **TINY),
                jnp.ones((1, 8, 8, 1)))


def test_build_unetr_bad_kwarg_lists_fields():
  with pytest.raises(ValueError, match=r"unknown key 'img_size' for model 'unetr'.*image_size"):
    models.build_model("unetr", dict(num_classes=2, img_size=96))
