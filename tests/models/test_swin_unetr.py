"""Tests for medjax.models.swin_unetr."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import layers
from medjax.models.base import build_model
from medjax.models.swin_unetr import (SwinUNETR, WindowAttention, space_to_depth, window_merge,
                                      window_partition)
from tests.models.zoo_testing import KEY, num_params as _num_params, variables_and_outputs as _init_apply, host_variables as _fill

TINY = dict(feature_size=12, depths=(2, 1, 1, 1), window_size=4)  # stage 1 alternates plain / shifted


def test_param_count_matches_monai_3d():
  # MONAI SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_v2=False): 62,187,296.
  model = build_model("swin_unetr", dict(num_classes=14))
  variables, _ = _init_apply(model, jnp.zeros((1, 96, 96, 96, 1)))
  assert _num_params(variables["params"]) == 62_187_296
  assert set(variables) == {"params"}  # instance norm without affine, no running statistics


def _expected_count_2d(fs, in_ch, classes, heads):
  """The same layout counted by hand for 2D: 3x3 convs, 13^2-entry bias tables, 4-voxel merging."""
  total = 4 * in_ch * fs + fs  # patch embedding
  for i, h in enumerate(heads):
    c = fs * 2 ** i
    total += 2 * (12 * c * c + 13 * c + 13 ** 2 * h)  # two blocks: norms, qkv, proj, mlp, bias table
    total += 8 * c + 8 * c * c  # merging: LayerNorm(4C), Dense(4C -> 2C)

  def res(i, o):
    return 9 * i * o + 9 * o * o + (i * o if i != o else 0)

  total += res(in_ch, fs) + res(fs, fs) + res(2 * fs, 2 * fs) + res(4 * fs, 4 * fs) + res(16 * fs, 16 * fs)
  for i, o in [(16 * fs, 8 * fs), (8 * fs, 4 * fs), (4 * fs, 2 * fs), (2 * fs, fs), (fs, fs)]:
    total += 4 * i * o + res(2 * o, o)
  return total + fs * classes + classes


def test_param_count_2d():
  model = SwinUNETR(num_classes=3, spatial_dims=2, feature_size=24)
  variables, _ = _init_apply(model, jnp.zeros((1, 64, 96, 2)))
  assert _num_params(variables["params"]) == _expected_count_2d(24, 2, 3, (3, 6, 12, 24))


@pytest.mark.parametrize("spatial", [(64, 96), (32, 64, 96)], ids=["2d", "3d"])
def test_shapes_and_aux(spatial):
  nd = len(spatial)
  model = SwinUNETR(num_classes=3, spatial_dims=nd, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((2, *spatial, 2)))
  chex.assert_shape(logits, (2, *spatial, 3))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"hidden_states", "bottleneck", "features"}
  chex.assert_shape(aux["hidden_states"],
                    [(2, *(s // 2 ** (i + 1) for s in spatial), 12 * 2 ** i) for i in range(5)])
  chex.assert_shape(aux["bottleneck"], (2, *(s // 32 for s in spatial), 192))
  chex.assert_shape(aux["features"], (2, *spatial, 12))
  # Bias tables follow the configured window (4 -> 7 offsets per axis) whatever the map size.
  table = variables["params"]["stage4_block0"]["attn"]["relative_position_bias_table"]
  chex.assert_shape(table, (7 ** nd, 24))


def test_bf16_compute_keeps_fp32_params():
  model = SwinUNETR(num_classes=2, spatial_dims=2, dtype=jnp.bfloat16, norm_affine=True, **TINY)
  variables, (logits, aux) = _init_apply(model, jnp.ones((1, 32, 64, 1)))
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32
  assert aux["features"].dtype == jnp.bfloat16 and aux["hidden_states"][2].dtype == jnp.bfloat16


def test_forward_and_grad_3d_train_mode():
  # Two stages at 16^3, window 4 (the smallest 3D case that compiles in seconds here): stage 1 (8^3) runs a
  # plain and a shifted block, the latter with the attention mask; stage 2 (4^3) fits one window, no shift.
  model = SwinUNETR(num_classes=2, feature_size=12, depths=(2, 1), num_heads=(3, 6), window_size=4,
                    dropout=0.1, drop_path=0.1)
  x = jax.random.normal(KEY, (2, 16, 16, 16, 1))
  params = _fill(jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)["params"])

  def loss(params):
    logits, aux = model.apply({"params": params}, x, train=True,
                              rngs={"dropout": jax.random.key(1, impl="rbg")})
    return jnp.mean(logits ** 2) + jnp.mean(aux["bottleneck"] ** 2), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  chex.assert_shape(logits, (2, 16, 16, 16, 2))
  assert np.isfinite(value) and np.std(logits) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for table in (grads["stage1_block1"]["attn"]["relative_position_bias_table"],  # shifted, masked
                grads["stage2_block0"]["attn"]["relative_position_bias_table"]):
    assert np.abs(table).sum() > 0
  assert np.abs(grads["head"]["kernel"]).sum() > 0


def test_remat_traces_same_gradient_structure():
  model = SwinUNETR(num_classes=2, remat=True, dropout=0.1, drop_path=0.1, **TINY)
  x = jnp.ones((1, 32, 32, 32, 1))
  params = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)["params"]
  grads = jax.eval_shape(jax.grad(lambda p: jnp.mean(model.apply(
    {"params": p}, x, train=True, rngs={"dropout": KEY})[0])), params)
  chex.assert_trees_all_equal_shapes(grads, params)


def _reference_window_attention(x, p, heads, window, shifted):
  """Window attention written per token pair, from coordinates instead of reshapes: token q attends to k
  iff both fall in the same window of the cyclically shifted, zero-padded map; pairs from different
  regions of a shifted window get -100; the bias is looked up by the in-window offset."""
  b, *dims, c = x.shape
  ws = [min(n, w) for n, w in zip(dims, window)]
  ss = [0 if (n <= w or not shifted) else w // 2 for n, w in zip(dims, window)]
  padded = [-(-n // w) * w for n, w in zip(dims, ws)]
  xp = np.zeros((b, *padded, c), np.float64)
  xp[(slice(None),) + tuple(slice(0, n) for n in dims)] = x
  coords = np.array(list(itertools.product(*(range(n) for n in padded))))  # (T, nd), row-major
  tokens = xp.reshape(b, -1, c)
  r = (coords - np.array(ss)) % np.array(padded)  # position in the shifted map
  window_id = [tuple(v) for v in r // np.array(ws)]
  inner = r % np.array(ws)
  far = np.array(padded)  # regions along each axis of the shifted map: [0, P-w), [P-w, P-s), [P-s, P)
  region = np.where(np.array(ss) == 0, 0, (r >= far - np.array(ws)).astype(int) + (r >= far - np.array(ss)))
  qkv = tokens @ np.asarray(p["qkv"]["kernel"], np.float64) + np.asarray(p["qkv"]["bias"])
  qkv = qkv.reshape(b, -1, 3, heads, c // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  table = np.asarray(p["relative_position_bias_table"], np.float64)
  extent = [2 * w - 1 for w in window]
  out = np.zeros((b, len(coords), heads, c // heads))
  for t in range(len(coords)):
    keys = [u for u in range(len(coords)) if window_id[u] == window_id[t]]
    rel = inner[t] - inner[keys] + np.array(window) - 1
    idx = np.ravel_multi_index(rel.T, extent)
    logits = np.einsum("bhd,kbhd->bhk", q[:, t] * (c // heads) ** -0.5, k[:, keys].transpose(1, 0, 2, 3))
    logits = logits + table[idx].T[None] + np.where((region[keys] != region[t]).any(-1), -100.0, 0.0)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out[:, t] = np.einsum("bhk,kbhd->bhd", attn, v[:, keys].transpose(1, 0, 2, 3))
  y = out.reshape(b, -1, c) @ np.asarray(p["proj"]["kernel"], np.float64) + np.asarray(p["proj"]["bias"])
  y = y.reshape(b, *padded, c)
  return y[(slice(None),) + tuple(slice(0, n) for n in dims)]


@pytest.mark.parametrize("dims,window,shifted", [
  ((6, 7), (4, 4), True),          # padded to 8x8, shifted by 2: masked regions on both axes
  ((4, 6, 5), (4, 4, 4), True),    # axis 0 fits one window (no shift there); axes 1, 2 padded and shifted
  ((3, 6), (4, 4), False),         # axis 0 shrinks to a 3-wide window
], ids=["2d_shift_pad", "3d_shift_mixed", "2d_shrink"])
def test_window_attention_matches_pairwise_reference(dims, window, shifted):
  heads, c = 2, 8
  module = WindowAttention(heads, window, shifted)
  x = jax.random.normal(KEY, (2, *dims, c))
  variables = module.init(KEY, x, train=False)
  # Random bias tables, so a wrong bias index shows.
  p = jax.tree.map(np.asarray, variables["params"])
  table_shape = p["relative_position_bias_table"].shape
  p["relative_position_bias_table"] = np.asarray(jax.random.normal(KEY, table_shape))
  y = module.apply({"params": p}, x, train=False)
  np.testing.assert_allclose(y, _reference_window_attention(np.asarray(x), p, heads, window, shifted),
                             rtol=1e-4, atol=1e-4)


def test_window_partition_and_space_to_depth_round_trips():
  x = np.arange(2 * 4 * 6 * 8 * 3).reshape(2, 4, 6, 8, 3)
  np.testing.assert_array_equal(window_merge(window_partition(x, (2, 3, 4)), (2, 3, 4), (4, 6, 8)), x)
  np.testing.assert_array_equal(layers.depth_to_space(space_to_depth(x, (2, 2, 2)), (2, 2, 2)), x)
  assert window_partition(x, (2, 3, 4)).shape == (2, 2 * 2 * 2, 24, 3)


def test_errors():
  with pytest.raises(ValueError, match=r"SwinUNETR\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    SwinUNETR(num_classes=2, **TINY).init(KEY, jnp.ones((1, 32, 32, 1)), train=False)
  with pytest.raises(ValueError, match=r"SwinUNETR needs every spatial size to be a multiple of 32.*"
                                       r"\(32, 48, 32\)"):
    SwinUNETR(num_classes=2, **TINY).init(KEY, jnp.ones((1, 32, 48, 32, 1)), train=False)
  with pytest.raises(ValueError, match=r"multiple of 16.*\(8, 16\)"):
    SwinUNETR(num_classes=2, spatial_dims=2, feature_size=12, depths=(1, 1, 1), num_heads=(3, 6, 12)
              ).init(KEY, jnp.ones((1, 8, 16, 1)), train=False)
  with pytest.raises(ValueError, match=r"stage 1 width 20 .* not divisible by its 3 heads"):
    SwinUNETR(num_classes=2, spatial_dims=2, feature_size=20).init(KEY, jnp.ones((1, 32, 32, 1)),
                                                                    train=False)
  with pytest.raises(ValueError, match=r"unknown key 'img_size' for model 'swin_unetr'"):
    build_model("swin_unetr", dict(num_classes=2, img_size=96))
