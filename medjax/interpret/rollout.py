"""Attention rollout for the ViT family, the CNN-ViT hybrid, UNETR and TransUNet: which input patches the
transformer's token mixing routes to the output.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): with `A_l` the
attention weights `(heads, N, N)` of block l, heads are fused (mean, or max / min), the residual connection is
modelled by adding the identity, `M_l = 0.5 A_l + 0.5 I` (rows renormalised), and the layers are composed from
the first to the last, `R = M_L ... M_2 M_1`. Row q of R says how much each input token contributes to output
token q. Optionally the smallest `discard_ratio` fraction of each row of the fused attention is set to 0 before
the identity is added (the "discard" of the vit-explain heuristic, per row here); the class token's column is
never discarded, so the class token's own path is kept.

Gradient-weighted rollout (`gradient_weighted=True`), after Chefer et al. 2021 ("Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", the self-attention rule): per block
`Abar_l = mean_heads ReLU(dS/dA_l * A_l)` with `S = targets.scores(logits, target)`, and
`R = N_L ... N_1` with `N_l = I + Abar_l`. Here each `N_l` also has its rows renormalised (the paper's update
`R <- R + Abar R` is not normalised), so both variants share one scale; this rescales each query's
contribution per layer, and the maps are comparable within a variant, not equal to the paper's raw values.

Relevance of each patch token: the class token's row of R (minus the class token's own column) for a model with
a class token (ViT / ViTHybrid with `classifier="token"`), else the mean over all query rows (`classifier="gap"`,
UNETR, TransUNet: every output token, hence every output voxel, counts). Plain rollout is class-agnostic: the
attention weights do not depend on the target, so `target` is accepted and ignored; the gradient-weighted variant
explains the target (`(B,)` classes or `targets.RegionTarget` for segmentation).

How the weights are found: `medjax.models.vit.SelfAttention` sows them (and lets gradients in through Flax's
"perturbations" collection) when "intermediates" is mutable; the blocks are ordered by call. The token grid is
the output of the last submodule called before the first attention that has the input's rank and
`N - n_extra` positions (the patch embedding: input / patch for ViT and UNETR, CNN stride then patch for
ViTHybrid and TransUNet), so no model is special-cased; leading extra tokens (the class token) are the rest.
Maps are float32 `(B, *spatial)` at the input resolution (`jax.image.resize`, linear by default, as
`gradcam`), or `(B, *grid)` with `upsample=None`; not normalised. 2D and 3D, jitted with the model static.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp

from medjax.interpret import capture
from medjax.interpret import targets as targets_lib

HEAD_FUSIONS = ("mean", "max", "min")
SUPPORTED = ("vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_hybrid", "unetr", "transunet")
_NAME = "attention_weights"
_HIGHEST = jax.lax.Precision.HIGHEST  # the layer product is tiny; TF32 / bf16 passes would blur small weights


def _trace(model, variables, images):
  """Shapes only: ({module path: its first array output's shape or None} in call order, the "intermediates" and
  "perturbations" collections)."""
  calls, _, state = capture.trace(model, variables, images, mutable=("intermediates", "perturbations"))
  outputs = {path: next((shape for shape in shapes if shape is not None), None) for path, shapes in calls.items()}
  return outputs, state.get("intermediates", {}), state.get("perturbations", {})


def _sown(intermediates) -> Dict[str, list]:
  """{module path: [sown attention weights, one per call]} from an "intermediates" tree."""
  found: Dict[str, list] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if _NAME in keys:
      found.setdefault("/".join(str(k) for k in keys[:keys.index(_NAME)]), []).append(leaf)
  return found


def _get(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree[_NAME]


def _has(tree, path: str) -> bool:
  try:
    _get(tree, path)
  except (KeyError, TypeError):
    return False
  return True


class _Layout:
  """What the trace says: attention module paths in call order, tokens N, grid, leading extra tokens."""

  def __init__(self, model, variables, images):
    name = type(model).__name__
    outputs, intermediates, self.perturbations = _trace(model, variables, images)
    sown = _sown(intermediates)
    if not sown:
      raise ValueError(f"{name} records no attention weights, so attention rollout does not apply to it: it needs "
                       f"transformer self-attention built on medjax.models.vit.SelfAttention (models: "
                       f"{', '.join(SUPPORTED)}); for CNNs use grad_cam or the gradient methods.")
    order = list(outputs)
    self.paths = sorted(sown, key=lambda p: order.index(p) if p in order else len(order))
    shared = {p: len(v) for p, v in sown.items() if len(v) != 1}
    if shared:
      raise ValueError(f"{name}: attention modules called more than once per forward pass (shared weights) have "
                       f"no single attention matrix per layer: {shared}")
    # Blocks of one encoder are siblings ("<stack>/block3/attn"); two stacks in parallel (e.g. two encoders
    # whose outputs are fused) have no single chain of layers to multiply.
    stacks = sorted({"/".join(p.split("/")[:-2]) for p in self.paths})
    if len(stacks) > 1:
      raise ValueError(f"{name} has {len(stacks)} attention stacks {stacks}; attention rollout composes one chain "
                       f"of layers and does not know how they combine")
    shapes = {p: tuple(sown[p][0].shape) for p in self.paths}
    b = images.shape[0]
    tokens = {s[-1] for s in shapes.values()}
    if len(tokens) != 1 or any(len(s) != 4 or s[0] != b or s[2] != s[3] for s in shapes.values()):
      raise ValueError(f"{name}: attention weights must be (B, heads, N, N) with one N for all layers, got {shapes}")
    self.tokens = tokens.pop()
    self.grid = self._grid(name, outputs, order, images)
    self.extra = self.tokens - math.prod(self.grid)

  def _grid(self, name, outputs, order, images) -> Tuple[int, ...]:
    first = self.paths[0]
    spatial = tuple(images.shape[1:-1])
    for path in reversed(order[:order.index(first)] if first in order else order):
      shape = outputs[path]
      if (shape is None or first.startswith(path + "/") or len(shape.shape) != images.ndim
              or shape.shape[0] != images.shape[0]):
        continue
      grid = tuple(shape.shape[1:-1])
      if 0 < math.prod(grid) <= self.tokens:
        return grid
    # No token map found (tokens built by hand): the same stride on every axis, as a last resort.
    for stride in range(1, max(spatial) + 1):
      grid = tuple(-(-s // stride) for s in spatial)
      if math.prod(grid) in (self.tokens, self.tokens - 1):
        return grid
    raise ValueError(f"{name}: cannot find the token grid of {self.tokens} tokens for input {spatial}; no "
                     f"submodule before '{first}' outputs a (B, *grid, D) token map")


def _discard(fused: jax.Array, ratio: float, protect_first: bool) -> jax.Array:
  """Zero the `floor(ratio * N)` smallest entries of each row of `(B, N, N)` (column 0 kept if protected)."""
  n = fused.shape[-1]
  k = int(ratio * n)
  if k == 0:
    return fused
  key = fused.at[..., 0].set(jnp.inf) if protect_first else fused
  rank = jnp.argsort(jnp.argsort(key, axis=-1), axis=-1)
  return jnp.where(rank >= k, fused, 0.0)


def _layer_matrix(weights: jax.Array, head_fusion: str, discard_ratio: float, protect_first: bool,
                  gradient_weighted: bool) -> jax.Array:
  """One block's row-stochastic mixing matrix `(B, N, N)` from per-head weights `(B, heads, N, N)`."""
  fused = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion](weights, axis=1)
  fused = _discard(fused, discard_ratio, protect_first)
  eye = jnp.eye(fused.shape[-1], dtype=fused.dtype)
  # Identity for the residual stream: half-half as Abnar & Zuidema; I + Abar for Chefer et al.
  m = eye + fused if gradient_weighted else 0.5 * fused + 0.5 * eye
  return m / m.sum(axis=-1, keepdims=True)


def rollout_matrix(layers: List[jax.Array], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   protect_first: bool = False, gradient_weighted: bool = False) -> jax.Array:
  """`M_L ... M_1` `(B, N, N)` from per-block weights `(B, heads, N, N)`, first block first (module docstring)."""
  r = None
  for w in layers:
    m = _layer_matrix(w.astype(jnp.float32), head_fusion, discard_ratio, protect_first, gradient_weighted)
    r = m if r is None else jnp.einsum("bqk,bkm->bqm", m, r, precision=_HIGHEST)
  return r


@functools.partial(jax.jit, static_argnames=("model", "region_class", "head_fusion", "discard_ratio",
                                             "gradient_weighted", "upsample"))
def _rollout(variables, images, target, *, model, region_class, head_fusion, discard_ratio, gradient_weighted,
             upsample):
  # The layout (which modules, grid, class token) is resolved at trace time from shapes, once per compile.
  layout = _Layout(model, variables, images)

  def forward(perturbations):
    v = variables if perturbations is None else {**variables, "perturbations": perturbations}
    (logits, _), state = model.apply(v, images, train=False, mutable=["intermediates"])
    return logits, [_get(state["intermediates"], p)[0] for p in layout.paths]

  if gradient_weighted:
    missing = [p for p in layout.paths if not _has(layout.perturbations, p)]
    if missing:
      raise ValueError(f"{type(model).__name__}: attention modules {missing} record weights but no "
                       f"'perturbations' entry, so gradients w.r.t. them are unavailable")
    target = targets_lib.join_target(target, region_class)

    def score(perturbations):
      logits, weights = forward(perturbations)
      return targets_lib.scores(logits, target).sum(), weights

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layout.perturbations)
    grads, weights = jax.grad(score, has_aux=True)(zeros)
    # ReLU(dS/dA * A): the positive, gradient-weighted attention of every head (Chefer et al. 2021).
    weights = [jax.nn.relu(_get(grads, p).astype(jnp.float32) * w) for p, w in zip(layout.paths, weights)]
  else:
    _, weights = forward(None)
  r = rollout_matrix(weights, head_fusion=head_fusion, discard_ratio=discard_ratio,
                     protect_first=layout.extra > 0, gradient_weighted=gradient_weighted)
  # Class token: its row; otherwise every output token counts equally.
  relevance = r[:, 0, layout.extra:] if layout.extra else r.mean(axis=1)
  maps = relevance.reshape(relevance.shape[0], *layout.grid)
  if upsample is not None:
    maps = jax.image.resize(maps, maps.shape[:1] + images.shape[1:-1], method=upsample)
  return maps.astype(jnp.float32)


def attention_rollout(model: Any, variables: Any, images: jax.Array, target: Optional[targets_lib.Target] = None,
                      *, head_fusion: str = "mean", discard_ratio: float = 0.0, gradient_weighted: bool = False,
                      upsample: Optional[str] = "linear") -> jax.Array:
  """Attention rollout maps `(B, *spatial)` float32 (module docstring for the method).

  Args:
    model / variables: a Linen module whose `apply(variables, x, train=False)` returns `(logits, aux)` and whose
      attention is `medjax.models.vit.SelfAttention` (vit_*, vit_hybrid, unetr, transunet), one encoder stack.
    images: `(B, *spatial, C)`, 2D or 3D.
    target: only with `gradient_weighted=True`: `(B,)` class indices, or `RegionTarget(mask, class_index)` for
      segmentation logits. Plain rollout ignores it (the attention weights do not depend on the class).
    head_fusion: "mean" (the paper's), "max" or "min" over heads, per block; for the gradient-weighted variant
      it fuses ReLU(grad * A) ("mean" is Chefer et al.'s).
    discard_ratio: in [0, 1): per row of the fused attention, the smallest `floor(discard_ratio * N)` entries
      are set to 0 before the identity is added (never the class token's column).
    gradient_weighted: Chefer et al. 2021's gradient-weighted attention instead of the raw weights.
    upsample: a `jax.image.resize` method ("linear", "nearest", "cubic") to the input's spatial size, or None
      for the token-grid map `(B, *grid)`.

  Raises:
    ValueError: a model without recorded attention weights (e.g. a CNN) or with several attention stacks, an
      unknown head fusion, a discard ratio outside [0, 1), or gradient weighting without a target.
  """
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f"unknown head_fusion {head_fusion!r}; one of {HEAD_FUSIONS}")
  if not 0.0 <= float(discard_ratio) < 1.0:
    raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
  images = jnp.asarray(images)
  if gradient_weighted:
    if target is None:
      raise ValueError("gradient_weighted=True explains a target: pass (B,) class indices or a RegionTarget")
    target_array, region_class = targets_lib.split_target(target)
  else:
    target_array, region_class = None, None  # class-agnostic: no recompiles for new targets
  return _rollout(variables, images, target_array, model=model, region_class=region_class, head_fusion=head_fusion,
                  discard_ratio=float(discard_ratio), gradient_weighted=bool(gradient_weighted), upsample=upsample)
