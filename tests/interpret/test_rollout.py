"""Attention rollout (medjax.interpret.rollout) and the attention weights SelfAttention sows, on tiny transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.interpret import rollout
from medjax.interpret.rollout import attention_rollout
from medjax.interpret.targets import RegionTarget
from medjax.models import build_model, vit
from tests.models.zoo_testing import KEY, host_variables_for

TINY = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)


def _vit(nd=2, size=8, patch=2, classifier="token"):
  return build_model("vit_ti16", dict(num_classes=3, spatial_dims=nd, image_size=size, patch_size=patch,
                                      classifier=classifier, **TINY))


def _images(model, nd, size, batch=2):
  x = jax.random.normal(KEY, (batch,) + (size,) * nd + (1,))
  return x, host_variables_for(model, x)


def _sown(model, variables, x):
  """The sown weights `(B, heads, N, N)` as numpy, block order (paths end in ".../block{i}/attn")."""
  _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  found = rollout._sown(state["intermediates"])
  paths = sorted(found, key=lambda p: int(p.split("/")[-2].removeprefix("block").removeprefix("vit_block")))
  return [np.asarray(found[p][0], np.float64) for p in paths]


def _numpy_rollout(layers, fusion, ratio, cls):
  """Abnar & Zuidema's rollout written out: fuse heads, drop the smallest per row, 0.5 A + 0.5 I, product."""
  r = np.eye(layers[0].shape[-1])[None]
  for w in layers:
    a = {"mean": w.mean(1), "max": w.max(1), "min": w.min(1)}[fusion]
    n = a.shape[-1]
    for b in range(a.shape[0]):
      for q in range(n):
        order = [k for k in np.argsort(a[b, q], kind="stable") if not (cls and k == 0)]
        a[b, q, order[:int(ratio * n)]] = 0
    m = 0.5 * a + 0.5 * np.eye(n)
    r = (m / m.sum(-1, keepdims=True)) @ r
  return r[:, 0, 1:] if cls else r.mean(1)


def test_self_attention_sows_weights_equal_to_the_fast_path():
  x = jax.random.normal(KEY, (2, 5, 8))
  layer = vit.SelfAttention(num_heads=2)
  variables = layer.init(KEY, x, train=False)
  assert set(variables) == {"params"} and set(variables["params"]) == {"qkv", "out"}  # init tree unchanged
  fast = layer.apply(variables, x, train=False)
  assert not isinstance(fast, tuple)
  y, state = layer.apply(variables, x, train=False, mutable=["intermediates"])
  np.testing.assert_allclose(y, fast, rtol=1e-5, atol=1e-5)
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, 2, 5, 5) and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("fusion,ratio", [("mean", 0.0), ("min", 0.5)])
def test_rollout_matches_a_numpy_rollout_of_the_sown_weights(fusion, ratio):
  model = _vit()
  x, variables = _images(model, 2, 8)
  got = attention_rollout(model, variables, x, head_fusion=fusion, discard_ratio=ratio, upsample=None)
  assert got.shape == (2, 4, 4) and got.dtype == jnp.float32
  want = _numpy_rollout(_sown(model, variables, x), fusion, ratio, cls=True).reshape(2, 4, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _attend_to_one_patch(model, x, patch_index):
  """Variables that make every query of every block attend to token `1 + patch_index` and leave the tokens
  unchanged: zero patch embedding and class token, so token i is its position embedding; the chosen token's
  embedding is e0 - e1, the others e2 - e3, so after LayerNorm only the chosen one has a large channel 0, which
  the key projection turns into a large key; a constant query then picks it. Zero output projections keep the
  residual stream, hence every block, the same."""
  variables = jax.tree.map(np.array, host_variables_for(model, x))
  p = variables["params"]
  p["patch_embed"]["kernel"][:] = 0
  t = p["transformer"]
  t["cls_token"][:] = 0
  pos = t["encoder"]["pos_embedding"]
  pos[:] = 0
  pos[0, :, 2], pos[0, :, 3] = 1, -1
  pos[0, 1 + patch_index] = 0
  pos[0, 1 + patch_index, 0], pos[0, 1 + patch_index, 1] = 1, -1
  d = pos.shape[-1]
  for i in range(model.num_layers):
    block = t["encoder"][f"block{i}"]
    block["attn"]["qkv"]["kernel"][:] = 0
    block["attn"]["qkv"]["kernel"][0, d:2 * d] = 1  # keys: channel 0 of the normed token
    block["attn"]["qkv"]["bias"][:] = 0
    block["attn"]["qkv"]["bias"][:d] = 2.0  # queries: constant
    block["attn"]["out"]["kernel"][:] = 0
    block["mlp2"]["kernel"][:] = 0
  return jax.tree.map(jnp.asarray, variables)


@pytest.mark.parametrize("nd,size,patch", [(2, 8, 4), (3, 4, 2)], ids=["2d", "3d"])
def test_attention_concentrated_on_one_patch_makes_it_the_maximum(nd, size, patch):
  model = _vit(nd, size, patch)
  x = jax.random.normal(KEY, (1,) + (size,) * nd + (1,))
  chosen = 2 ** nd - 1  # the last patch of the 2 x 2 (x 2) grid
  variables = _attend_to_one_patch(model, x, chosen)
  sown = _sown(model, variables, x)
  np.testing.assert_allclose(sown[0][..., 1 + chosen], 1.0, atol=1e-5)
  maps = attention_rollout(model, variables, x)
  assert maps.shape == (1,) + (size,) * nd
  # Two blocks of 0.5 A + 0.5 I with A -> the chosen token: class row 0.25 (itself) + 0.75 (chosen patch).
  grid = np.zeros((1,) + (2,) * nd, np.float32)
  grid.reshape(-1)[chosen] = 0.75
  small = jax.image.resize(jnp.asarray(grid), maps.shape, "linear")
  np.testing.assert_allclose(maps, small, atol=1e-5)
  corner = (0,) + (size - 1,) * nd
  assert float(maps[corner]) == pytest.approx(float(maps.max())) and float(maps.max()) > 0.7


def test_gradient_weighted_depends_on_the_class():
  model = _vit()
  x, variables = _images(model, 2, 8)
  m0, m1 = (attention_rollout(model, variables, x, jnp.array([c, c]), gradient_weighted=True) for c in (0, 1))
  for m in (m0, m1):
    assert m.shape == (2, 8, 8) and np.isfinite(m).all() and (m >= 0).all()
  assert not np.allclose(m0, m1, atol=1e-4)
  plain = attention_rollout(model, variables, x, jnp.array([0, 0]))
  np.testing.assert_array_equal(plain, attention_rollout(model, variables, x, jnp.array([1, 1])))


def test_3d_gap_vit_uses_the_mean_over_rows():
  model = _vit(3, 4, 2, classifier="gap")
  x, variables = _images(model, 3, 4)
  got = attention_rollout(model, variables, x, upsample=None)
  want = _numpy_rollout(_sown(model, variables, x), "mean", 0.0, cls=False).reshape(2, 2, 2, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unetr_rollout_and_region_target():
  model = build_model("unetr", dict(num_classes=2, spatial_dims=2, image_size=8, patch_size=4, feature_size=4,
                                    **TINY))
  x, variables = _images(model, 2, 8, batch=1)
  want = _numpy_rollout(_sown(model, variables, x), "mean", 0.0, cls=False).reshape(1, 2, 2)
  np.testing.assert_allclose(attention_rollout(model, variables, x, upsample=None), want, rtol=1e-5, atol=1e-6)
  mask = np.zeros((1, 8, 8), np.float32)
  mask[:, :4, :4] = 1
  maps = attention_rollout(model, variables, x, RegionTarget(mask, 1), gradient_weighted=True)
  assert maps.shape == (1, 8, 8) and np.isfinite(maps).all() and (maps >= 0).all()


@pytest.mark.parametrize("name,kwargs,size,grid,extra", [
  ("vit_hybrid", dict(image_size=16, width=4, stage_sizes=(1, 1), small_input=True), 16, (8, 8), 1),
  ("vit_hybrid", dict(image_size=(32, 64), width=4, stage_sizes=(1, 2), patch_size=2, classifier="gap"), (32, 64),
   (2, 4), 0),
  ("transunet", dict(width=4, stage_sizes=(1, 1, 1), head_features=8, decoder_features=(8, 8, 8, 4)), 32, (2, 2), 0),
  ("unetr", dict(spatial_dims=3, image_size=(8, 16, 8), patch_size=(4, 8, 4), feature_size=4), (8, 16, 8),
   (2, 2, 2), 0),
])
def test_token_layout_is_found_for_every_supported_family(name, kwargs, size, grid, extra):
  # Shapes only (no compile): the blocks in call order, the token grid and the class token.
  model = build_model(name, dict(num_classes=2, **{**TINY, **kwargs}))
  spatial = size if isinstance(size, tuple) else (size,) * model.spatial_dims
  x = jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
  layout = rollout._Layout(model, variables, x)
  assert layout.grid == grid and layout.extra == extra and len(layout.paths) == 2
  assert layout.paths[0].split("/")[-2] in ("block0", "vit_block0")


def test_full_hybrid_rollout_shape():
  model = build_model("vit_hybrid", dict(num_classes=2, image_size=16, width=4, stage_sizes=(1, 1),
                                         small_input=True, **TINY))
  x, variables = _images(model, 2, 16, batch=1)
  maps = attention_rollout(model, variables, x, head_fusion="max", discard_ratio=0.5)
  assert maps.shape == (1, 16, 16) and np.isfinite(maps).all() and (maps > 0).all()


def test_errors():
  cnn = build_model("resnet18", {"num_classes": 3, "width": 4, "stage_sizes": (1, 1, 1, 1), "small_input": True})
  x = jnp.ones((1, 8, 8, 1))
  with pytest.raises(ValueError, match=r"ResNet18 records no attention weights.*vit_hybrid"):
    attention_rollout(cnn, host_variables_for(cnn, x), x)
  model = _vit()
  with pytest.raises(ValueError, match="head_fusion"):
    attention_rollout(model, {}, x, head_fusion="sum")
  with pytest.raises(ValueError, match="discard_ratio"):
    attention_rollout(model, {}, x, discard_ratio=1.0)
  with pytest.raises(ValueError, match="explains a target"):
    attention_rollout(model, {}, x, gradient_weighted=True)
