"""CNN-GNN: CNN features of image regions as the nodes of a graph, a few graph layers, then pooling.

Nodes are either the cells of the CNN's last feature map (`patch_size=None`) or non-overlapping patches of
the input, each encoded by the same CNN and pooled to one vector (`patch_size` set). Edges are the spatial
grid neighbours of the cells/patches ("grid", face- to fully-connected) or each node's k nearest neighbours
in CNN feature space ("knn", recomputed per input with `top_k`). Graph layers are GCN (Kipf & Welling 2017,
symmetric-normalised adjacency with self loops) or GAT (Velickovic et al. 2018, multi-head attention
restricted to the neighbours and the node itself), each a pre-norm residual block. Rank-generic: the same
code serves 2D and 3D images.

The adjacency is dense `(B, N, N)`: memory grows with N^2, so keep the node count to a few thousand (a
larger `patch_size` or more CNN stages give fewer nodes).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models import layers
from medjax.models.base import MODELS
from medjax.models.sequence import build_encoder, encode, freeze_kwargs

Dtype = Any
_NEG = -1e30  # masked attention logit: exp underflows to exactly 0, unlike -inf it never makes NaN


def grid_adjacency(grid_shape: Sequence[int], connectivity: int = 1):
  """`(N, N)` float32 adjacency of the cells of a `grid_shape` grid, numbered in row-major order.

  Cells i != j are neighbours when every coordinate differs by at most 1 and at most `connectivity`
  coordinates differ (scipy.ndimage / skimage convention): 1 -> 4 neighbours in 2D, 6 in 3D;
  `len(grid_shape)` -> 8 in 2D, 26 in 3D. Built from iotas on device, so no N^2 constant enters the program.
  Symmetric, zero diagonal.
  """
  nd = len(grid_shape)
  if not 1 <= connectivity <= nd:
    raise ValueError(f"connectivity={connectivity} must be in [1, {nd}] for a {nd}D grid.")
  n = math.prod(grid_shape)
  coords = jnp.unravel_index(jnp.arange(n), tuple(grid_shape))
  near = jnp.ones((n, n), bool)
  differing = jnp.zeros((n, n), jnp.int32)
  for c in coords:
    d = jnp.abs(c[:, None] - c[None, :])
    near &= d <= 1
    differing += (d > 0).astype(jnp.int32)
  return (near & (differing >= 1) & (differing <= connectivity)).astype(jnp.float32)


def knn_adjacency(h, k: int):
  """`(B, N, D)` node features -> `(B, N, N)` float32, row i marking the k nearest other nodes of node i in
  Euclidean distance (directed: every row sums to exactly k, columns need not). Not differentiated: the
  graph is a discrete choice, gradients flow through the node features the layers read."""
  h = jax.lax.stop_gradient(h.astype(jnp.float32))
  sq = jnp.sum(h * h, axis=-1)
  dist = sq[:, :, None] + sq[:, None, :] - 2.0 * jnp.einsum("bnd,bmd->bnm", h, h)
  n = h.shape[1]
  dist = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, dist)  # a node is not its own neighbour
  _, idx = jax.lax.top_k(-dist, k)  # (B, N, k), distinct indices per row
  return jnp.sum(jax.nn.one_hot(idx, n, dtype=jnp.float32), axis=-2)


def _with_self_loops(adj):
  return jnp.maximum(adj, jnp.eye(adj.shape[-1], dtype=adj.dtype))


class GCNLayer(nn.Module):
  """Graph convolution `D^-1/2 (A + I) D^-1/2 h W + b`, D the row sums of A + I (for a directed kNN graph
  every row has k + 1 entries, so it is the mean over the node and its neighbours).
  `(h (B, N, F_in), adj (B, N, N)) -> ((B, N, features), None)`."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, adj):
    a = _with_self_loops(adj.astype(jnp.float32))
    inv_sqrt = jax.lax.rsqrt(jnp.sum(a, axis=-1))
    a = a * inv_sqrt[..., :, None] * inv_sqrt[..., None, :]
    h = nn.Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(h)
    h = jnp.einsum("bnm,bmf->bnf", a.astype(self.dtype), h)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return h + bias.astype(self.dtype), None


class GATLayer(nn.Module):
  """Graph attention: per head, `e_ij = LeakyReLU_0.2(a_dst . W h_i + a_src . W h_j)`, softmax over j in
  the neighbours of i and i itself, output `sum_j alpha_ij W h_j`; heads concatenated. Logits and softmax in
  float32. `(h (B, N, F_in), adj (B, N, N)) -> ((B, N, features), attention (B, heads, N, N) float32)`."""
  features: int
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, adj):
    if self.features % self.num_heads:
      raise ValueError(f"GATLayer: features={self.features} must be divisible by num_heads={self.num_heads}.")
    head_dim = self.features // self.num_heads
    wh = nn.DenseGeneral((self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="linear")(h)  # (B, N, heads, F_h)
    init = nn.initializers.lecun_normal()
    a_dst = self.param("att_dst", init, (self.num_heads, head_dim), self.param_dtype)
    a_src = self.param("att_src", init, (self.num_heads, head_dim), self.param_dtype)
    wh32 = wh.astype(jnp.float32)
    dst = jnp.einsum("bnhf,hf->bhn", wh32, a_dst.astype(jnp.float32))
    src = jnp.einsum("bnhf,hf->bhn", wh32, a_src.astype(jnp.float32))
    logits = nn.leaky_relu(dst[..., :, None] + src[..., None, :], negative_slope=0.2)  # (B, heads, N, N)
    allowed = _with_self_loops(adj)[:, None] > 0  # the self loop keeps every row non-empty
    attention = jax.nn.softmax(jnp.where(allowed, logits, _NEG), axis=-1)
    out = jnp.einsum("bhnm,bmhf->bnhf", attention.astype(self.dtype), wh)
    out = out.reshape(*out.shape[:2], self.features)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return out + bias.astype(self.dtype), attention


class GraphBlock(nn.Module):
  """Pre-norm residual graph layer: `h + Dropout(act(Layer(LayerNorm(h), adj)))`.
  `(B, N, F) -> ((B, N, F), attention or None)`."""
  layer: str = "gcn"
  num_heads: int = 4
  act: str = "relu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, adj, train: bool):
    f = h.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(h)
    if self.layer == "gcn":
      y, attention = GCNLayer(f, self.dtype, self.param_dtype, name="gcn")(y, adj)
    else:
      y, attention = GATLayer(f, self.num_heads, self.dtype, self.param_dtype, name="gat")(y, adj)
    y = nn.Dropout(self.dropout, deterministic=not train)(layers.activation(self.act)(y))
    return h + y, attention


class GraphNetwork(nn.Module):
  """`num_layers` GraphBlocks and a final LayerNorm on a fixed graph. Permutation-equivariant: permuting
  the nodes (rows of h, rows and columns of adj) permutes the outputs the same way.
  `(h (B, N, F), adj (B, N, N)) -> ((B, N, F), [per-layer attention (B, heads, N, N)] or [])`."""
  layer: str = "gcn"
  num_layers: int = 2
  num_heads: int = 4
  act: str = "relu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, h, adj, train: bool):
    if self.layer not in ("gcn", "gat"):
      raise ValueError(f"GraphNetwork: layer={self.layer!r} must be 'gcn' or 'gat'.")
    block = nn.remat(GraphBlock, static_argnums=(3,)) if self.remat else GraphBlock
    attentions = []
    for i in range(self.num_layers):
      h, attention = block(self.layer, self.num_heads, self.act, self.dropout, self.dtype, self.param_dtype,
                           name=f"block{i}")(h, adj, train)
      if attention is not None:
        attentions.append(attention)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(h), attentions


@MODELS.register("cnn_gnn")
class CNNGNN(nn.Module):
  """CNN-GNN classifier: `(B, *spatial, C)` -> `(logits (B, num_classes) float32, aux)`.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3 (input rank is checked).
    encoder: "conv" (`sequence.ConvStack` with `features`, `norm`, `act`) or a registered classifier whose
      `aux["stages"][-1]` is the feature map (`aux["features"]` per patch when `patch_size` is set).
    encoder_kwargs: extra fields of a registered encoder, e.g. `dict(small_input=True)`.
    features / norm / act: the "conv" encoder's stage widths (stride 2 between stages), norm and activation
      (`act` also in the graph blocks).
    patch_size: None -> nodes are the cells of the last feature map; an int or per-axis tuple -> nodes are
      the non-overlapping input patches of that size (the input must be a multiple of it per axis), each
      encoded separately and pooled to one vector.
    adjacency: "grid" (spatial neighbours; `connectivity` 1 = face neighbours, 4 in 2D / 6 in 3D, up to
      `spatial_dims` = all 8 / 26) or "knn" (the `k` nearest other nodes in CNN feature space, per input).
    graph_layer: "gcn" or "gat" (`num_heads` heads); num_layers graph blocks of width `graph_features`
      (a Dense maps the CNN features to it first).
    pooling: "mean" or "max" over nodes.
    dropout: rate in the graph blocks and before the head ("dropout" rng stream).
    dtype / param_dtype: compute / parameter dtypes; remat: rematerialise conv and graph blocks.

  aux: "features" `(B, graph_features)` float32 pooled node features, "node_features" `(B, N, F)` float32
  graph outputs before pooling (nodes in row-major order of the node grid: `stages[-1].shape[1:-1]`, or
  input size // patch_size, so `node_features.reshape(B, *grid, F)` gives a map), "adjacency" `(B, N, N)`
  float32 (no self loops), "stages" the encoder's stage outputs (of all B * N patches in patch mode), and
  for graph_layer="gat" "attention": one `(B, num_heads, N, N)` float32 array per layer (row i: node i's
  weights over its neighbours and itself).
  """
  num_classes: int
  spatial_dims: int = 2
  encoder: str = "conv"
  encoder_kwargs: Optional[Mapping[str, Any]] = None
  features: Sequence[int] = (32, 64, 128)
  norm: str = "batch"
  act: str = "relu"
  patch_size: Any = None
  adjacency: str = "grid"
  connectivity: int = 1
  k: int = 8
  graph_layer: str = "gcn"
  num_layers: int = 2
  num_heads: int = 4
  graph_features: int = 128
  pooling: str = "mean"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "encoder_kwargs", freeze_kwargs(self.encoder_kwargs))
    super().__post_init__()

  def _check(self, x) -> None:
    name = type(self).__name__
    layers.check_rank(x, self.spatial_dims, name)
    if self.adjacency not in ("grid", "knn"):
      raise ValueError(f"{name}: adjacency={self.adjacency!r} must be 'grid' or 'knn'.")
    if self.graph_layer not in ("gcn", "gat"):
      raise ValueError(f"{name}: graph_layer={self.graph_layer!r} must be 'gcn' or 'gat'.")
    if self.pooling not in ("mean", "max"):
      raise ValueError(f"{name}: pooling={self.pooling!r} must be 'mean' or 'max'.")
    if self.graph_layer == "gat" and self.graph_features % self.num_heads:
      raise ValueError(f"{name}: graph_features={self.graph_features} must be divisible by "
                       f"num_heads={self.num_heads}.")
    if self.adjacency == "grid" and not 1 <= self.connectivity <= self.spatial_dims:
      raise ValueError(f"{name}: connectivity={self.connectivity} must be in [1, {self.spatial_dims}] "
                       f"(1: face neighbours, {self.spatial_dims}: all {3 ** self.spatial_dims - 1}).")
    if self.patch_size is not None:
      patch = layers.to_tuple(self.patch_size, self.spatial_dims, "patch_size")
      spatial = x.shape[1:-1]
      if any(n < p or n % p for n, p in zip(spatial, patch)):
        raise ValueError(f"{name}: input spatial size {tuple(spatial)} does not split into patches of "
                         f"patch_size={patch} (stage 'patches'); each axis must be a positive multiple of "
                         f"the patch size, at least {patch}.")

  def _knn_size_hint(self) -> str:
    """The smallest cubic input giving more than k nodes, where the node grid is known from the fields."""
    nd = self.spatial_dims
    g = 1
    while g ** nd <= self.k:  # nodes per axis of the smallest cubic grid with k + 1 nodes
      g += 1
    if self.patch_size is not None:
      size = tuple(g * p for p in layers.to_tuple(self.patch_size, nd))
    elif self.encoder == "conv":  # ceil(n / stride) cells per axis
      size = ((g - 1) * 2 ** (len(self.features) - 1) + 1,) * nd
    else:
      return ""
    return f"; a cubic input needs at least {size}"

  @nn.compact
  def __call__(self, x, *, train: bool):
    self._check(x)
    nd, b = self.spatial_dims, x.shape[0]
    x = x.astype(self.dtype)
    encoder = build_encoder(self, nd)
    if self.patch_size is not None:
      patch = layers.to_tuple(self.patch_size, nd, "patch_size")
      grid = tuple(n // p for n, p in zip(x.shape[1:-1], patch))
      # (B, g1 p1, g2 p2, .., C) -> (B, g1, g2, .., p1, p2, .., C) -> (B * N, *patch, C), row-major nodes.
      y = x.reshape(b, *[a for g, p in zip(grid, patch) for a in (g, p)], x.shape[-1])
      y = y.transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
      pooled, stages = encode(encoder, y.reshape(b * math.prod(grid), *patch, x.shape[-1]), train)
      nodes = pooled.reshape(b, math.prod(grid), -1)
    else:
      _, stages = encode(encoder, x, train)
      if not stages:
        raise ValueError(f"{type(self).__name__}: encoder {self.encoder!r} returns no aux['stages'] feature "
                         f"map; set patch_size to use its pooled features per patch.")
      fmap = stages[-1]
      grid = tuple(fmap.shape[1:-1])
      nodes = fmap.reshape(b, math.prod(grid), fmap.shape[-1]).astype(jnp.float32)
    n = math.prod(grid)

    if self.adjacency == "grid":
      adj = jnp.broadcast_to(grid_adjacency(grid, self.connectivity), (b, n, n))
    else:
      if n <= self.k:
        raise ValueError(f"{type(self).__name__}: knn adjacency with k={self.k} needs at least {self.k + 1} "
                         f"nodes (stage 'graph'), but input {tuple(x.shape[1:-1])} gives a {grid} node grid "
                         f"({n} nodes){self._knn_size_hint()}.")
      adj = knn_adjacency(nodes, self.k)

    h = nn.Dense(self.graph_features, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="node_proj")(nodes.astype(self.dtype))
    h, attentions = GraphNetwork(self.graph_layer, self.num_layers, self.num_heads, self.act, self.dropout,
                                 self.dtype, self.param_dtype, self.remat, name="graph")(h, adj, train)
    node_features = h.astype(jnp.float32)
    features = jnp.mean(node_features, 1) if self.pooling == "mean" else jnp.max(node_features, 1)
    y = nn.Dropout(self.dropout, deterministic=not train)(features.astype(self.dtype))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(y)
    aux = {"features": features, "node_features": node_features, "adjacency": adj, "stages": stages}
    if self.graph_layer == "gat":
      aux["attention"] = attentions
    return logits.astype(jnp.float32), aux
