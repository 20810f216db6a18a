"""Tests for medjax.models.graph (CNN-GNN and its graph layers)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import graph  # noqa: F401  (registers "cnn_gnn")
from medjax.models.graph import CNNGNN, GCNLayer, GraphNetwork, grid_adjacency, knn_adjacency
from tests.models.zoo_testing import KEY, num_params as _num_params, init_shapes as _init_apply

TINY = dict(features=(4, 8), graph_features=8, num_heads=2)


@pytest.mark.parametrize("spatial,kw,grid", [
  ((12, 16), dict(), (6, 8)),                                                     # feature-map cells
  ((12, 16), dict(adjacency="knn", k=5, graph_layer="gat", pooling="max"), (6, 8)),
  ((8, 12, 16), dict(connectivity=3), (4, 6, 8)),
  ((8, 12, 16), dict(patch_size=(4, 4, 8), adjacency="knn", k=3, graph_layer="gat"), (2, 3, 2)),  # patches
], ids=["2d_grid_gcn", "2d_knn_gat", "3d_grid26_gcn", "3d_patches_knn_gat"])
def test_cnn_gnn_shapes_and_aux(spatial, kw, grid):
  nd, n = len(spatial), int(np.prod(grid))
  model = CNNGNN(num_classes=3, spatial_dims=nd, num_layers=2, **TINY, **kw)
  (logits, aux), variables = _init_apply(model, jnp.ones((2, *spatial, 1)))
  chex.assert_shape(logits, (2, 3))
  assert logits.dtype == jnp.float32
  gat = kw.get("graph_layer") == "gat"
  assert set(aux) == {"features", "node_features", "adjacency", "stages"} | ({"attention"} if gat else set())
  chex.assert_shape([aux["features"], aux["node_features"], aux["adjacency"]], [(2, 8), (2, n, 8), (2, n, n)])
  assert aux["adjacency"].dtype == aux["node_features"].dtype == jnp.float32
  if gat:
    chex.assert_shape(aux["attention"], [(2, 2, n, n)] * 2)
  if "patch_size" in kw:  # every patch encoded separately
    chex.assert_shape(aux["stages"][-1], (2 * n, 2, 2, 4, 8))
  else:
    chex.assert_shape(aux["stages"][-1], (2, *grid, 8))
  assert set(variables) == {"params", "batch_stats"}


def test_cnn_gnn_exact_param_count():
  f, c = 16, 8  # graph width, CNN output width
  ln = 2 * f
  gcn_block = ln + f * f + f
  gat_block = ln + f * f + 2 * f + f  # kernel, att_dst + att_src (heads x head_dim each), bias
  for layer, block in (("gcn", gcn_block), ("gat", gat_block)):
    model = models.build_model("cnn_gnn", dict(num_classes=5, features=(4, c), graph_features=f,
                                               graph_layer=layer, num_layers=3, num_heads=4))
    _, variables = _init_apply(model, jnp.ones((1, 8, 8, 3)))
    p = variables["params"]
    assert _num_params(p["graph"]) == 3 * block + ln  # + the final LayerNorm
    assert _num_params(p["node_proj"]) == c * f + f and _num_params(p["head"]) == f * 5 + 5


def test_cnn_gnn_bf16_keeps_float32_params():
  model = CNNGNN(num_classes=2, dtype=jnp.bfloat16, adjacency="knn", k=3, graph_layer="gat", **TINY)
  (logits, aux), variables = _init_apply(model, jnp.ones((2, 8, 6, 1)))
  assert logits.dtype == aux["features"].dtype == aux["attention"][0].dtype == jnp.float32
  assert aux["stages"][-1].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_grid_adjacency_known_answer_and_degrees():
  # 2 x 3 grid, row-major: 0 1 2 / 3 4 5.
  face = np.asarray(grid_adjacency((2, 3), 1))
  expected = np.zeros((6, 6))
  for i, j in [(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)]:
    expected[i, j] = expected[j, i] = 1
  np.testing.assert_array_equal(face, expected)
  full = np.asarray(grid_adjacency((2, 3), 2))
  for i, j in [(0, 4), (1, 3), (1, 5), (2, 4)]:
    expected[i, j] = expected[j, i] = 1
  np.testing.assert_array_equal(full, expected)
  # 3D: symmetric, empty diagonal, an interior node has 6 / 18 / 26 neighbours; corners 3 / 6 / 7.
  for connectivity, interior, corner in ((1, 6, 3), (2, 18, 6), (3, 26, 7)):
    a = np.asarray(grid_adjacency((3, 4, 3), connectivity))
    np.testing.assert_array_equal(a, a.T)
    assert np.all(np.diag(a) == 0) and a.dtype == np.float32
    degree = a.sum(1).reshape(3, 4, 3)
    assert degree[1, 1, 1] == interior and degree[0, 0, 0] == corner
  with pytest.raises(ValueError, match=r"connectivity=3 must be in \[1, 2\]"):
    grid_adjacency((2, 3), 3)


def test_knn_adjacency_k_neighbours_and_equivariance():
  h = jax.random.normal(KEY, (2, 10, 3))
  a = np.asarray(knn_adjacency(h, 4))
  np.testing.assert_array_equal(a.sum(-1), 4)  # every node has exactly k neighbours
  assert np.all(np.einsum("bii->bi", a) == 0)
  hn = np.asarray(h)
  dist = ((hn[:, :, None] - hn[:, None]) ** 2).sum(-1) + np.where(np.eye(10), np.inf, 0)
  brute = np.zeros_like(a)
  np.put_along_axis(brute, np.argsort(dist, -1)[..., :4], 1.0, -1)
  np.testing.assert_array_equal(a, brute)
  perm = np.random.default_rng(0).permutation(10)
  np.testing.assert_array_equal(np.asarray(knn_adjacency(h[:, perm], 4)), a[:, perm][:, :, perm])


def test_gcn_layer_is_symmetric_normalised_propagation():
  adj = jnp.asarray(grid_adjacency((2, 3), 1))[None]
  h = jax.random.normal(KEY, (1, 6, 3))
  layer = GCNLayer(4)
  params = jax.jit(layer.init)(KEY, h, adj)
  out, _ = jax.jit(layer.apply)(params, h, adj)
  a = np.asarray(adj[0]) + np.eye(6)
  d = a.sum(1) ** -0.5
  w, b = params["params"]["linear"]["kernel"], params["params"]["bias"]
  np.testing.assert_allclose(out[0], (d[:, None] * a * d[None]) @ (np.asarray(h[0]) @ w) + b, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("layer", ["gcn", "gat"])
def test_graph_layers_are_permutation_equivariant(layer):
  net = GraphNetwork(layer, num_layers=2, num_heads=2)
  h = jax.random.normal(KEY, (2, 7, 8))
  adj = knn_adjacency(jax.random.normal(jax.random.key(1, impl="rbg"), (2, 7, 2)), 3)  # directed graph
  variables = jax.jit(net.init, static_argnums=3)(KEY, h, adj, False)
  perm = np.random.default_rng(1).permutation(7)

  @jax.jit
  def both(h, adj):
    return net.apply(variables, h, adj, False), net.apply(variables, h[:, perm], adj[:, perm][:, :, perm], False)

  (out, att), (out_p, att_p) = both(h, adj)
  np.testing.assert_allclose(out_p, out[:, perm], rtol=1e-5, atol=1e-5)
  if layer == "gat":
    for a, a_p in zip(att, att_p):
      np.testing.assert_allclose(a_p, a[:, :, perm][:, :, :, perm], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)  # softmax over neighbours + self
      allowed = (np.asarray(adj) + np.eye(7))[:, None] > 0
      assert np.all(np.asarray(a)[~np.broadcast_to(allowed, a.shape)] == 0)
  else:
    assert att == []


def test_cnn_gnn_train_step_gradients_are_finite():
  model = CNNGNN(num_classes=3, adjacency="knn", k=3, graph_layer="gat", dropout=0.1, **TINY)
  x = jax.random.normal(KEY, (2, 8, 6, 1))
  variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)

  def loss(params):
    (logits, _), state = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": KEY})
    return jnp.mean(logits ** 2), state

  (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for name in ("encoder", "node_proj", "graph", "head"):
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads[name])), name
  assert set(state) == {"batch_stats"}


def test_cnn_gnn_errors():
  with pytest.raises(ValueError, match=r"CNNGNN\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    CNNGNN(num_classes=2, spatial_dims=3).init(KEY, jnp.ones((1, 8, 8, 1)), train=False)
  # 2 stages: stride 2, so a 4 x 4 input gives 2 x 2 = 4 nodes; k=8 needs 9 nodes, a 3 x 3 grid: 5 x 5 input.
  with pytest.raises(ValueError, match=r"knn adjacency with k=8 needs at least 9 nodes \(stage 'graph'\), but "
                                       r"input \(4, 4\) gives a \(2, 2\) node grid \(4 nodes\); a cubic input "
                                       r"needs at least \(5, 5\)"):
    _init_apply(CNNGNN(num_classes=2, adjacency="knn", **TINY), jnp.ones((1, 4, 4, 1)))
  with pytest.raises(ValueError, match=r"needs at least \(12, 12, 12\)"):  # 2^3 > 3 nodes: 2 patches per axis
    _init_apply(CNNGNN(num_classes=2, spatial_dims=3, patch_size=6, adjacency="knn", k=3, **TINY),
                jnp.ones((1, 6, 6, 12, 1)))
  with pytest.raises(ValueError, match=r"input spatial size \(12, 10\) does not split into patches of "
                                       r"patch_size=\(4, 4\) \(stage 'patches'\)"):
    _init_apply(CNNGNN(num_classes=2, patch_size=4, **TINY), jnp.ones((1, 12, 10, 1)))
  with pytest.raises(ValueError, match=r"connectivity=3 must be in \[1, 2\]"):
    _init_apply(CNNGNN(num_classes=2, connectivity=3, **TINY), jnp.ones((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="graph_features=8 must be divisible by num_heads=3"):
    _init_apply(CNNGNN(num_classes=2, graph_layer="gat", **{**TINY, "num_heads": 3}), jnp.ones((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="graph_layer='gin' must be 'gcn' or 'gat'"):
    _init_apply(CNNGNN(num_classes=2, graph_layer="gin", **TINY), jnp.ones((1, 8, 8, 1)))
