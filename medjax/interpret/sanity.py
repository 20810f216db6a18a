"""Sanity checks for attribution maps: rank correlation, parameter randomisation, deletion / insertion curves.

  Model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", NeurIPS): re-initialise
  the layers from the output towards the input, cumulatively ("cascading") or one at a time ("independent"), and
  compare each stage's maps with the trained model's by Spearman rank correlation, of the maps and of their
  absolute values. A method whose maps survive the randomisation of the whole network does not explain the model.
  The paper's data-randomisation test needs a model trained on permuted labels (trained by the experiment);
  `compare_maps` compares its maps with the trained model's.

  Deletion / insertion (Petsiuk et al. 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
  Models", BMVC): replace the most salient pixels first by a baseline (deletion, a good map makes the score fall
  fast: low AUC) or reveal them first on the baseline (insertion, high AUC). RISE deletes to zero and inserts into
  a blurred copy of the image; here both take either baseline. `random_map` gives the uniform random map to compare
  against.

Maps are `(B, *spatial)`, 2D or 3D, as every method of `medjax.interpret` returns them.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medjax.interpret import capture, loops
from medjax.interpret.targets import Target, join_target, scores, split_target

SCORES = ("softmax", "sigmoid", "logit")


# --- rank correlation ------------------------------------------------------------------------------------------------

def _average_ranks(x: jax.Array) -> jax.Array:
  """1-based ranks of each row of `x` `(B, N)`, tied values sharing their average rank (scipy's "average")."""
  s = jnp.sort(x, axis=1)
  # The ties of a value occupy sorted positions lo..hi-1, i.e. ranks lo+1..hi, whose mean is (lo + hi + 1) / 2.
  lo = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side="left"))(s, x)
  hi = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side="right"))(s, x)
  return (lo + hi + 1).astype(jnp.float32) / 2


@functools.partial(jax.jit, static_argnames=("absolute",))
def spearman(maps_a: jax.Array, maps_b: jax.Array, *, absolute: bool = False) -> jax.Array:
  """Per-example Spearman rank correlation `(B,)` float32 of two map batches `(B, *spatial)` (each example's maps
  flattened; ties get average ranks, as `scipy.stats.spearmanr`). `absolute=True` compares `|maps|`, Adebayo et
  al.'s second variant (a sign flip of the whole map does not count as a change). An example whose map is constant
  has no ranking: NaN, as scipy. NaN map values are not supported."""
  if maps_a.shape != maps_b.shape:
    raise ValueError(f"maps_a and maps_b must have one shape, got {maps_a.shape} and {maps_b.shape}")
  a = maps_a.reshape(maps_a.shape[0], -1).astype(jnp.float32)
  b = maps_b.reshape(maps_b.shape[0], -1).astype(jnp.float32)
  if absolute:
    a, b = jnp.abs(a), jnp.abs(b)
  n = a.shape[1]
  # Centred ranks over n keep the sums of products O(n) in float32 even for volumes of millions of voxels.
  ra = (_average_ranks(a) - (n + 1) / 2) / n
  rb = (_average_ranks(b) - (n + 1) / 2) / n
  return (ra * rb).sum(1) / jnp.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))


def _nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row (all maps constant) is NaN, not a warning
    return np.nanmean(x, axis=axis)


def compare_maps(maps_a: jax.Array, maps_b: jax.Array) -> Dict[str, float]:
  """Batch means of `spearman` (`"spearman"`) and of its absolute variant (`"spearman_abs"`), e.g. a trained
  model's maps against those of the same architecture trained on permuted labels (Adebayo et al.'s data
  randomisation test). Examples with a constant map (NaN correlation) are left out of the means."""
  maps_a, maps_b = jnp.asarray(maps_a), jnp.asarray(maps_b)
  return {"spearman": float(_nanmean(np.asarray(spearman(maps_a, maps_b)))),
          "spearman_abs": float(_nanmean(np.asarray(spearman(maps_a, maps_b, absolute=True))))}


def random_map(rng: jax.Array, like: Any) -> jax.Array:
  """A uniform [0, 1) random map of `like`'s shape (float32): the chance-level map of a deletion/insertion test."""
  return jax.random.uniform(rng, jnp.shape(like), jnp.float32)


# --- parameter randomisation -----------------------------------------------------------------------------------------

def parameter_groups(model: Any, variables: Any, images: jax.Array) -> list:
  """The top-level parameter groups of `variables["params"]` from the output to the input (the head first).

  The order is the order in which `model` calls its top-level submodules on `images` (traced once with
  `capture.module_outputs`, no FLOPs), reversed. The dict order of `variables["params"]` is not used: Flax keeps
  definition order, but any `jax.tree` map, or a checkpoint restore, rebuilds the dicts with sorted keys ("head"
  before "stem_conv"). Parameters of the model's own body (not in a submodule, e.g. a ViT's class token) are
  not called as modules and come last, next to the input, where such embeddings are used.
  """
  names = list(variables["params"])
  called = [n for n in capture.top_level_names(capture.module_outputs(model, variables, images)) if n in names]
  return called[::-1] + [n for n in names if n not in called]


def _fresh_params(variables: Any, rng: jax.Array, model: Any, images: Optional[jax.Array]) -> Dict[str, Any]:
  """New values of every top-level parameter group: the model's own init (each layer's true initialiser) when
  `model` and `images` are given, otherwise N(0, sigma) per leaf with the leaf's own standard deviation (0.02 for a
  constant leaf such as a zero bias or a unit norm scale, which would otherwise not change)."""
  if model is not None:
    if images is None:
      raise ValueError("images are needed to re-run model.init (or pass model=None for the N(0, sigma) fallback)")
    # Eager init: a jitted init costs as much to compile as the forward pass and runs once here.
    return dict(model.init(rng, jnp.asarray(images), train=False)["params"])
  return dict(_normal_like(dict(variables["params"]), rng))


@jax.jit
def _normal_like(params, rng):
  # One program and one draw for all leaves: eager ops, or a sampler per leaf shape, compile once per shape.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  sizes = [math.prod(leaf.shape) for leaf in leaves]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  new, start = [], 0
  for leaf, size in zip(leaves, sizes):
    std = jnp.std(leaf.astype(jnp.float32))
    std = jnp.where(std > 0, std, 0.02)
    new.append((noise[start:start + size].reshape(leaf.shape) * std).astype(leaf.dtype))
    start += size
  return jax.tree_util.tree_unflatten(treedef, new)


def _replace(variables: Any, fresh: Dict[str, Any], groups: Sequence[str]) -> Dict[str, Any]:
  params = dict(variables["params"])
  unknown = [g for g in groups if g not in params]
  if unknown:
    raise ValueError(f"groups {unknown} are not top-level parameter groups; groups: {list(params)}")
  return {**variables, "params": {**params, **{g: fresh[g] for g in groups}}}


def randomize(variables: Any, groups: Sequence[str], rng: jax.Array, *, model: Any = None,
              images: Optional[jax.Array] = None) -> Dict[str, Any]:
  """`variables` with the params of the top-level modules `groups` re-initialised (`_fresh_params`: the model's own
  initialisers when `model` and `images` are given); every other parameter and collection (batch_stats: the
  randomised layers keep the trained running statistics, as in Adebayo et al.) is the same object."""
  return _replace(variables, _fresh_params(variables, rng, model, images), groups)


class CascadeResult(NamedTuple):
  """What `cascading_randomization` returns; stage 0 is the trained model, stage k randomises `groups[:k]`
  (cascading) or `groups[k - 1]` (independent).

  stages: `("original", *groups)`, S = len(groups) + 1 names; spearman / spearman_abs: `(S,)` batch means (NaN
  examples, with a constant map, left out); per_example / per_example_abs: `(S, B)`; maps: `(S, B, *spatial)` with
  `keep_maps=True`, else None. numpy arrays."""
  stages: Tuple[str, ...]
  spearman: np.ndarray
  spearman_abs: np.ndarray
  per_example: np.ndarray
  per_example_abs: np.ndarray
  maps: Optional[np.ndarray]


def cascading_randomization(method: Callable, model: Any, variables: Any, images: jax.Array, target: Target, *,
                            rng: jax.Array, groups: Optional[Sequence[str]] = None, independent: bool = False,
                            keep_maps: bool = False, model_init: bool = True, **method_options) -> CascadeResult:
  """Adebayo et al.'s model-parameter randomisation test of `method` (any `(model, variables, images, target,
  **method_options) -> (B, *spatial)` of `medjax.interpret`).

  groups: top-level parameter groups, output first; default `parameter_groups` (all of them).
  independent: randomise one group at a time instead of cumulatively from the output.
  model_init: re-initialise with the model's own init at `rng` (one init; every stage takes its groups from it);
    False draws N(0, sigma) per leaf (`randomize`), which does not compile an init.
  """
  images = jnp.asarray(images)
  groups = tuple(parameter_groups(model, variables, images) if groups is None else groups)
  fresh = _fresh_params(variables, rng, model if model_init else None, images)
  original = method(model, variables, images, target, **method_options)
  maps, plain, absolute = [original], [], []
  for k in range(len(groups) + 1):
    if k:
      randomised = _replace(variables, fresh, groups[k - 1:k] if independent else groups[:k])
      maps.append(method(model, randomised, images, target, **method_options))
    plain.append(np.asarray(spearman(original, maps[-1])))
    absolute.append(np.asarray(spearman(original, maps[-1], absolute=True)))
    if not keep_maps:
      maps = maps[:1]
  plain, absolute = np.stack(plain), np.stack(absolute)
  return CascadeResult(("original",) + groups, _nanmean(plain), _nanmean(absolute), plain, absolute,
                       np.stack([np.asarray(m) for m in maps]) if keep_maps else None)


# --- deletion / insertion --------------------------------------------------------------------------------------------

def _blur_matrix(n: int, sigma: float) -> np.ndarray:
  """`(n, n)` row-stochastic Gaussian smoothing along one axis; near the edges the kernel is renormalised over the
  positions inside the image instead of padding it with invented values."""
  d = np.arange(n)[:, None] - np.arange(n)[None, :]
  k = np.exp(-0.5 * (d / sigma) ** 2) if sigma > 0 else (d == 0).astype(np.float64)
  return (k / k.sum(1, keepdims=True)).astype(np.float32)


def gaussian_blur(images: jax.Array, sigma: Union[float, Sequence[float]] = 5.0) -> jax.Array:
  """Images `(B, *spatial, C)` smoothed by a separable Gaussian of standard deviation `sigma` pixels (one value, or
  one per spatial axis; 0 leaves an axis alone), edges renormalised (`_blur_matrix`); untruncated (RISE blurs
  with an 11-pixel kernel of sigma 5, i.e. truncated at 1 sigma)."""
  images = jnp.asarray(images, jnp.float32)
  spatial = images.shape[1:-1]
  sigmas = (float(sigma),) * len(spatial) if np.ndim(sigma) == 0 else tuple(float(s) for s in sigma)
  if len(sigmas) != len(spatial) or min(sigmas) < 0:
    raise ValueError(f"blur_sigma needs one non-negative value per spatial axis {spatial}, got {sigma}")
  for axis, (n, s) in enumerate(zip(spatial, sigmas), start=1):
    moved = jnp.tensordot(jnp.asarray(_blur_matrix(n, s)), images, axes=([1], [axis]))
    images = jnp.moveaxis(moved, 0, axis)
  return images


def _target_scores(logits, target_array, class_index, score):
  """`(B,)`: the target class's softmax / sigmoid probability or logit; for a region, the mask-weighted mean over
  the region of the per-voxel value (a mean, unlike `targets.scores`' sum, so a probability stays in [0, 1])."""
  logits = logits.astype(jnp.float32)
  values = {"softmax": lambda z: jax.nn.softmax(z, axis=-1), "sigmoid": jax.nn.sigmoid, "logit": lambda z: z}[score]
  s = scores(values(logits), join_target(target_array, class_index))
  if class_index is None:
    return s
  mass = target_array.reshape(target_array.shape[0], -1).sum(1)
  return jnp.where(mass > 0, s / jnp.where(mass > 0, mass, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("model", "class_index", "mode", "score"))
def _curves(model, variables, images, maps, baseline, target_array, counts, *, class_index, mode, score):
  """counts `(P, chunk)`: how many positions are deleted / inserted at each step (padded steps repeat the last).
  Returns the scores `(P * chunk, B)`."""
  batch, chunk = images.shape[0], counts.shape[1]
  flat = maps.reshape(batch, -1).astype(jnp.float32)
  # Most salient first; the stable sort breaks ties by flat index, so equal maps always delete the same positions.
  order = jnp.argsort(-flat, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1).reshape(maps.shape)  # position of each pixel in that order
  baseline = jnp.broadcast_to(baseline, images.shape)
  tiled = jnp.tile(target_array, (chunk,) + (1,) * (target_array.ndim - 1))

  def body(_, counts_chunk):
    changed = (rank[None] < counts_chunk.reshape((chunk,) + (1,) * rank.ndim))[..., None]  # all channels alike
    if mode == "deletion":
      x = jnp.where(changed, baseline[None], images[None])
    else:
      x = jnp.where(changed, images[None], baseline[None])
    logits, _ = model.apply(variables, x.reshape((chunk * batch,) + images.shape[1:]), train=False)
    return None, _target_scores(logits, tiled, class_index, score).reshape(chunk, batch)

  _, out = loops.sweep(body, None, counts)
  return out.reshape(-1, batch)


def deletion_insertion(model: Any, variables: Any, images: jax.Array, target: Target, maps: jax.Array, *,
                       steps: int = 32, baseline: Union[str, float, jax.Array] = "blur", mode: str = "deletion",
                       blur_sigma: Union[float, Sequence[float]] = 5.0, score: str = "softmax",
                       batch_size: int = 64) -> Tuple[jax.Array, jax.Array]:
  """Deletion or insertion curves of `maps` (Petsiuk et al. 2018): `(curves (B, steps + 1), auc (B,))` float32.

  Step k = 0..steps changes the `floor(k * N / steps)` most salient of the N positions of each example (ranked by
  its map, ties by flat index), in all channels at once: deletion sets them to the baseline starting from the image,
  insertion sets them to the image starting from the baseline. So the curve runs from the score of the image to
  that of the baseline (deletion) or back (insertion); the AUC is the trapezoid rule over the fractions k / steps.

  images: `(B, *spatial, C)`, 2D or 3D; maps: `(B, *spatial)`.
  target: `(B,)` class indices, or a `RegionTarget` (the score is then the mask-weighted mean over the region).
  baseline: "blur" (`gaussian_blur(images, blur_sigma)`, RISE's insertion baseline), "zero", a scalar, or an array
    broadcastable to `images`.
  score: the target's "softmax" probability (RISE's), "sigmoid" probability (multi-label, binary segmentation), or
    "logit".
  batch_size: images per forward pass (steps per pass = max(1, batch_size // B)), swept under `loops.sweep`.
  """
  images = jnp.asarray(images, jnp.float32)
  maps = jnp.asarray(maps)
  if images.ndim < 3:
    raise ValueError(f"images must be (B, *spatial, C), got shape {images.shape}")
  if maps.shape != images.shape[:-1]:
    raise ValueError(f"maps must have the images' shape without channels {images.shape[:-1]}, got {maps.shape}")
  if int(steps) < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if mode not in ("deletion", "insertion"):
    raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")
  if isinstance(baseline, str):
    if baseline not in ("blur", "zero"):
      raise ValueError(f"baseline must be 'blur', 'zero', a number or an array, got {baseline!r}")
    baseline = gaussian_blur(images, blur_sigma) if baseline == "blur" else jnp.zeros((), jnp.float32)
  baseline = jnp.asarray(baseline, jnp.float32)
  try:
    jnp.broadcast_shapes(baseline.shape, images.shape)
  except ValueError:
    raise ValueError(f"baseline of shape {baseline.shape} does not broadcast to the images {images.shape}") from None
  steps, batch = int(steps), images.shape[0]
  n = math.prod(maps.shape[1:])
  counts = np.arange(steps + 1, dtype=np.int64) * n // steps
  chunk = max(1, min(int(batch_size) // batch, steps + 1))
  counts = np.concatenate([counts, np.full(-len(counts) % chunk, counts[-1])]).astype(np.int32)
  array, class_index = split_target(target)
  out = _curves(model, variables, images, maps, baseline, array, jnp.asarray(counts.reshape(-1, chunk)),
                class_index=class_index, mode=mode, score=score)
  curves = out[:steps + 1].T
  auc = (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * steps)
  return curves, auc

