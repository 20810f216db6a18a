"""Tests for medjax.models.transunet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.base import build_model
from medjax.models.transunet import TransUNet
from tests.models.zoo_testing import KEY, num_params as _num_params, variables_and_outputs as _init_apply, host_variables as _fill

TINY = dict(width=4, stage_sizes=(1, 1, 1), hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
            head_features=16, decoder_features=(16, 8, 8, 4))


def test_defaults_are_r50_vit_b16():
  # The paper's R50-ViT-B/16 at 224^2 with 9 classes (Synapse): 105.28M parameters reported; this layout
  # (ResNet-50 stages 3-4-9 with GroupNorm, ViT-B on the 14^2 grid, decoder 256..16) counts 105,277,081.
  model = build_model("transunet", dict(num_classes=9))
  variables, (logits, aux) = _init_apply(model, jnp.zeros((1, 224, 224, 3)))
  assert _num_params(variables["params"]) == 105_277_081
  assert set(variables) == {"params", "batch_stats"}  # BatchNorm in the decoder
  chex.assert_shape(aux["bottleneck"], (1, 14, 14, 768))
  chex.assert_shape(variables["params"]["pos_embed"], (1, 14, 14, 768))


@pytest.mark.parametrize("spatial", [(32, 48), (16, 32, 48), (33, 40)], ids=["2d", "3d", "2d_odd"])
def test_shapes_and_aux(spatial):
  nd = len(spatial)
  model = TransUNet(num_classes=3, spatial_dims=nd, **TINY)
  _, (logits, aux) = _init_apply(model, jnp.ones((2, *spatial, 2)))
  chex.assert_shape(logits, (2, *spatial, 3))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"stages", "bottleneck", "features"}
  ceil = lambda s, f: tuple(-(-n // f) for n in s)  # stride-2 convs with k // 2 padding round up
  chex.assert_shape(aux["stages"], [(2, *ceil(spatial, f), 16 * 2 ** i) for i, f in enumerate((4, 8, 16))])
  chex.assert_shape(aux["bottleneck"], (2, *ceil(spatial, 16), 16))
  chex.assert_shape(aux["features"], (2, *spatial, 4))


def test_bf16_compute_keeps_fp32_params():
  model = TransUNet(num_classes=2, spatial_dims=3, dtype=jnp.bfloat16, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, 16, 16, 32, 1)))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32
  assert aux["features"].dtype == jnp.bfloat16 and aux["bottleneck"].dtype == jnp.bfloat16


def test_forward_and_grad_2d_train_mode():
  model = TransUNet(num_classes=2, **TINY)
  x = jax.random.normal(KEY, (2, 32, 48, 1))
  variables = _fill(jax.eval_shape(lambda x: model.init(KEY, x, train=False), x))

  def loss(params):
    (logits, _), state = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(1, impl="rbg")})
    return jnp.mean(logits ** 2), (logits, state)

  (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  chex.assert_shape(logits, (2, 32, 48, 2))
  assert np.isfinite(value) and np.std(logits) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for name in ("pos_embed", "stem_conv", "vit_block0", "head"):
    assert sum(np.abs(g).sum() for g in jax.tree.leaves(grads[name])) > 0, name
  assert not np.allclose(state["batch_stats"]["conv_more"]["norm"]["mean"],
                         variables["batch_stats"]["conv_more"]["norm"]["mean"])


def test_other_input_size_resizes_position_embeddings_and_remat_traces():
  model = TransUNet(num_classes=2, remat=True, **TINY)
  variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.ones((1, 32, 48, 1)))
  logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                               jnp.ones((1, 64, 32, 1)))
  chex.assert_shape(logits, (1, 64, 32, 2))
  chex.assert_shape(aux["bottleneck"], (1, 4, 2, 16))

  def loss(variables):
    (logits, _), _ = model.apply(variables, jnp.ones((1, 32, 48, 1)), train=True, mutable=["batch_stats"],
                                 rngs={"dropout": KEY})
    return jnp.mean(logits)

  grads = jax.eval_shape(jax.grad(loss), variables)["params"]
  chex.assert_trees_all_equal_shapes(grads, variables["params"])


def test_errors():
  with pytest.raises(ValueError, match=r"TransUNet\(spatial_dims=2\) expects input \(B, y, x, C\)"):
    TransUNet(num_classes=2, **TINY).init(KEY, jnp.ones((1, 16, 16, 16, 1)), train=False)
  with pytest.raises(ValueError, match=r"TransUNet: input spatial shape \(8, 32, 32\) is too small: CNN "
                                       r"stage 3 reaches 1/16 resolution, so every spatial size must be at "
                                       r"least 16"):
    TransUNet(num_classes=2, spatial_dims=3, **TINY).init(KEY, jnp.ones((1, 8, 32, 32, 1)), train=False)
  with pytest.raises(ValueError, match=r"decoder_features \(16, 8\) needs len\(stage_sizes\) \+ 1 = 4"):
    TransUNet(num_classes=2, **{**TINY, "decoder_features": (16, 8)}).init(KEY, jnp.ones((1, 32, 32, 1)),
                                                                         train=False)
  with pytest.raises(ValueError, match=r"unknown key 'patch_size' for model 'transunet'"):
    build_model("transunet", dict(num_classes=2, patch_size=16))
