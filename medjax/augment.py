"""On-device data augmentation: pure, jittable JAX, one implementation for 2D and 3D.

`make_augment(config)` validates a plain dict once and returns `augment(rng, batch) -> batch`, a pure
function meant to run inside the jitted train step. Per-sample transforms run under `jax.vmap`; every sample
draws its own numbers from `rng`, and each transform draws from a key folded with the transform's name, so
adding or removing one transform does not change the numbers the others draw.

Batch: "image" (B, *S, C) float with S = (z, y, x) or (y, x); optional "label" (B, *S) int (segmentation),
(B,) int or (B, K) float (classification); optional "mask" (B, *S) (voxels to count; warped like the label,
0 outside the volume). Other keys pass through. The image keeps its dtype (computed in float32).

Order of the chain (fixed): one spatial warp (flip, rot90, affine, elastic composed into a single sampling
grid, so the image is interpolated once) -> bias_field -> blur -> low_res -> brightness -> contrast -> gamma
-> noise -> batch level: cutout -> mixup -> cutmix.

Config: a dict of transform name -> dict of options (True = defaults, False/None = off), plus the
top-level options below. A transform with p == 0 is not built at all, and an empty config is the identity.

  flip:       p, axes           each listed spatial axis flipped independently with probability p
  rot90:      p, plane          k * 90 degrees, k uniform in {1, 2, 3}; the plane's two sizes must be equal
  affine:     p, rotate_deg, scale, shear, translate, isotropic_scale
              rotate_deg: max |angle| (uniform in +-), one value, or one per plane (1 in 2D: (y, x);
              3 in 3D: (y, x), (z, x), (z, y)); scale: (lo, hi), > 1 zooms in; shear: max |off-diagonal|;
              translate: max |shift| in voxels (one value or one per axis). All about the volume centre.
  elastic:    p, sigma, magnitude
              a random displacement on a coarse grid with control points every `sigma` voxels, cubically
              upsampled to full resolution; `magnitude` (lo, hi): std of the displacement in voxels.
  bias_field: p, order, coefficient   multiply by exp(polynomial of total degree <= order in coordinates
              scaled to [-1, 1]), coefficients uniform in +-coefficient.
  blur:       p, sigma              Gaussian, sigma (lo, hi) in voxels, separable, edge padding.
  low_res:    p, factor, axes, upsample   point-sample every `factor` voxels (factor (lo, hi) >= 1) and
              interpolate back ("linear" or "nearest").
  brightness: p, range              multiply by a factor in range.
  contrast:   p, range, preserve_range    (x - mean) * c + mean, clipped to the original range if asked.
  gamma:      p, range              min-max normalise per channel, power gamma (log-uniform in range), restore.
  noise:      p, std                add N(0, s^2), s uniform in std (intensity units).
  cutout:     p, size, holes, value  zero `holes` boxes with sides a fraction `size` (lo, hi) of each axis;
              labels are left as they are.
  mixup:      p, alpha              classification only: image and one-hot label mixed with a partner
              (a random permutation of the batch) with weight lam ~ Beta(alpha, alpha). A segmentation label
              raises ValueError (a mixed label map has no meaning for a voxel-wise hard label).
  cutmix:     p, alpha              a box of a partner pasted in, box volume fraction 1 - lam,
              lam ~ Beta(alpha, alpha). Classification: label = lam * own + (1 - lam) * partner (one-hot);
              segmentation: the label map (and mask) are pasted with the same box, so they stay consistent.
  label_mode: "nearest" (default) or "onehot" (one-hot, linear, argmax: smoother borders, needs num_classes)
  image_pad:  "constant" (0, default) or "edge" outside the volume; labels and masks are 0 there.
  num_classes: K, needed by label_mode="onehot" and by mixup/cutmix on (B,) int labels.

Classification labels come out as float (B, K) soft targets whenever mixup or cutmix is configured.
"""

from __future__ import annotations

import difflib
import itertools
import math
from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp

from medjax.typing import Array, Batch

_ALL = None  # marker: "all spatial axes" for flip / low_res

_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "flip": dict(p=0.5, axes=_ALL),
    "rot90": dict(p=0.5, plane=(-2, -1)),
    "affine": dict(p=0.2, rotate_deg=15.0, scale=(0.85, 1.25), shear=0.0, translate=0.0, isotropic_scale=True),
    "elastic": dict(p=0.2, sigma=16.0, magnitude=(0.0, 4.0)),
    "bias_field": dict(p=0.1, order=3, coefficient=0.3),
    "blur": dict(p=0.2, sigma=(0.5, 1.0)),
    "low_res": dict(p=0.25, factor=(1.0, 2.0), axes=_ALL, upsample="linear"),
    "brightness": dict(p=0.15, range=(0.75, 1.25)),
    "contrast": dict(p=0.15, range=(0.75, 1.25), preserve_range=True),
    "gamma": dict(p=0.3, range=(0.7, 1.5)),
    "noise": dict(p=0.1, std=(0.0, 0.1)),
    "cutout": dict(p=0.5, size=(0.1, 0.3), holes=1, value=0.0),
    "mixup": dict(p=1.0, alpha=0.2),
    "cutmix": dict(p=0.5, alpha=1.0),
}
_OPTIONS = dict(label_mode="nearest", image_pad="constant", num_classes=None)
_SPATIAL = ("flip", "rot90", "affine", "elastic")
_INTENSITY = ("bias_field", "blur", "low_res", "brightness", "contrast", "gamma", "noise")
_STREAM = {name: i for i, name in enumerate(_DEFAULTS)}  # fixed per-transform key streams
# Every scalar a sample needs comes from ONE uniform draw of _BLOCK numbers per transform: each
# `jax.random` call inlines a threefry hash, and 40 separate calls added ~2 s to the compile.
_BLOCK = 20


def _draw(sampler: Callable[..., Array], key: Array, shape, **kwargs) -> Array:
  """`sampler(key, shape)` drawn flat and reshaped: the same numbers (threefry counts in row-major order),
  but XLA on CPU compiles a multi-dimensional draw far slower (normal (2, 3, 9, 9, 9): 1.75 s, flat: 0.31 s)."""
  return sampler(key, (math.prod(shape),), **kwargs).reshape(shape)


def _u(u: Array, name: str, start: int, n: int = 1) -> Array:
  """n uniforms in [0, 1) reserved for transform `name` (slots start..start+n of its block)."""
  base = _STREAM[name] * _BLOCK + start
  return u[..., base:base + n] if n > 1 else u[..., base]


def _between(u: Array, lo, hi) -> Array:
  """Map uniforms to [lo, hi); exact lo when lo == hi (0 * u == 0)."""
  return lo + (hi - lo) * u


def _unknown(key: str, known, where: str) -> ValueError:
  close = difflib.get_close_matches(key, list(known), n=1)
  hint = f" Did you mean '{close[0]}'?" if close else ""
  return ValueError(f"augment: unknown key '{key}' in {where}.{hint} Known: {', '.join(sorted(known))}.")


def _range(value, name: str):
  lo, hi = (value, value) if isinstance(value, (int, float)) else tuple(value)
  if lo > hi:
    raise ValueError(f"augment: {name} range ({lo}, {hi}) has lo > hi.")
  return float(lo), float(hi)


def _parse(config: Mapping) -> Dict[str, Any]:
  """Validate `config`; return {"options": ..., name: options} with p == 0 transforms dropped."""
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  parsed: Dict[str, Any] = {"options": dict(_OPTIONS)}
  for key, value in dict(config or {}).items():
    if key in _OPTIONS:
      parsed["options"][key] = value
      continue
    if key not in _DEFAULTS:
      raise _unknown(key, list(_DEFAULTS) + list(_OPTIONS), "the augment config")
    if value is None or value is False:
      continue
    opts = dict(_DEFAULTS[key])
    for sub, v in ({} if value is True else dict(value)).items():
      if sub not in opts:
        raise _unknown(sub, opts, f"augment.{key}")
      opts[sub] = v
    if not 0.0 <= float(opts["p"]) <= 1.0:
      raise ValueError(f"augment.{key}.p must be in [0, 1], got {opts['p']}.")
    for sub in ("scale", "magnitude", "sigma", "factor", "range", "std", "size"):
      if sub in opts and not (key == "elastic" and sub == "sigma"):
        opts[sub] = _range(opts[sub], f"augment.{key}.{sub}")
    if float(opts["p"]) > 0.0:
      parsed[key] = opts
  o = parsed["options"]
  if o["label_mode"] not in ("nearest", "onehot"):
    raise ValueError(f"augment.label_mode must be 'nearest' or 'onehot', got {o['label_mode']!r}.")
  if o["image_pad"] not in ("constant", "edge"):
    raise ValueError(f"augment.image_pad must be 'constant' or 'edge', got {o['image_pad']!r}.")
  if o["label_mode"] == "onehot" and not o["num_classes"]:
    raise ValueError("augment.label_mode='onehot' needs augment.num_classes.")
  return parsed


# ----------------------------------------------------------------------------------------------- sampling

def _sample(volume: Array, coords: Array, *, order: int, pad: str) -> Array:
  """Interpolate volume (*S, C) at coords (D, *S_out) (voxel units) -> (*S_out, C).

  Same values as `jax.scipy.ndimage.map_coordinates` (order 0 or 1, mode "constant" with cval 0 or
  "nearest" for pad="edge"), but the corner indices and weights are computed once and whole channel rows are
  gathered, so C channels (or K one-hot classes) cost one gather per corner instead of C.
  At integer coordinates the result is exact (weights are exactly 1 and 0).
  """
  shape, channels = volume.shape[:-1], volume.shape[-1]
  flat = volume.reshape(-1, channels)
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  out_shape = coords.shape[1:]
  coords = coords.reshape(len(shape), -1)
  if order == 0:
    corners = [[(jnp.floor(coords[d] + 0.5), None) for d in range(len(shape))]]
  else:
    lo = jnp.floor(coords)
    frac = coords - lo
    corners = itertools.product(*[[(lo[d], 1.0 - frac[d]), (lo[d] + 1.0, frac[d])] for d in range(len(shape))])
  total = 0.0
  for corner in corners:
    index, weight, valid = 0, 1.0, True
    for d, (i, w) in enumerate(corner):
      if pad == "edge":
        i = jnp.clip(i, 0, shape[d] - 1)
      else:
        valid = valid & (i >= 0) & (i <= shape[d] - 1)
      index = index + jnp.clip(i, 0, shape[d] - 1).astype(jnp.int32) * strides[d]
      weight = weight if w is None else weight * w
    weight = jnp.broadcast_to(jnp.where(valid, weight, 0.0), index.shape)
    total = total + weight[:, None] * jnp.take(flat, index, axis=0, mode="clip")
  return total.reshape(out_shape + (channels,))


def _mm(a: Array, b: Array) -> Array:
  """a @ b for tiny D x D matrices as exact float32 multiply-adds (a dot may run in TF32/bf16 on GPU/TPU)."""
  return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _rotation(angles: Array, ndim: int) -> Array:
  """Product of plane rotations, one angle (radians) per plane in the order of the module docstring."""
  planes = [(ndim - 2, ndim - 1)] if ndim == 2 else [(1, 2), (0, 2), (0, 1)]
  m = jnp.eye(ndim)
  for a, (i, j) in zip(angles, planes):
    c, s = jnp.cos(a), jnp.sin(a)
    r = jnp.eye(ndim).at[i, i].set(c).at[j, j].set(c).at[i, j].set(-s).at[j, i].set(s)
    m = _mm(r, m)
  return m


def _spatial_coords(key: Array, u: Array, shape, cfg: Dict[str, Any]) -> Array:
  """Sampling grid (D, *S) = centre + M (x - centre) + t + displacement(x), for one sample.

  key: the sample's key (for the elastic noise); u: its uniforms (see `_u`).
  """
  ndim = len(shape)
  centre = jnp.array([(n - 1) / 2.0 for n in shape], jnp.float32)
  matrix, shift = jnp.eye(ndim), jnp.zeros(ndim)
  if "flip" in cfg:
    c = cfg["flip"]
    axes = range(ndim) if c["axes"] is None else [a % ndim for a in c["axes"]]
    fire = _u(u, "flip", 0, 3)[:ndim] < c["p"]
    mask = jnp.zeros(ndim, bool).at[jnp.array(list(axes), jnp.int32)].set(True)
    matrix = _mm(jnp.diag(jnp.where(fire & mask, -1.0, 1.0)), matrix)
  if "rot90" in cfg:
    c = cfg["rot90"]
    i, j = sorted(a % ndim for a in c["plane"])
    if shape[i] != shape[j]:
      raise ValueError(f"augment.rot90: plane {c['plane']} has sizes {shape[i]} != {shape[j]}; rot90 keeps "
                       "the shape only in a square plane.")
    k = jnp.minimum(1 + jnp.floor(3.0 * _u(u, "rot90", 1)).astype(jnp.int32), 3)
    k = jnp.where(_u(u, "rot90", 0) < c["p"], k, 0)
    cos, sin = jnp.array([1.0, 0.0, -1.0, 0.0])[k], jnp.array([0.0, 1.0, 0.0, -1.0])[k]  # exact
    r = jnp.eye(ndim).at[i, i].set(cos).at[j, j].set(cos).at[i, j].set(-sin).at[j, i].set(sin)
    matrix = _mm(r, matrix)
  if "affine" in cfg:
    c = cfg["affine"]
    fire = _u(u, "affine", 0) < c["p"]
    nplanes = 1 if ndim == 2 else 3
    rot = jnp.broadcast_to(jnp.deg2rad(jnp.asarray(c["rotate_deg"], jnp.float32)), (nplanes,))
    angles = _between(_u(u, "affine", 1, 3)[:nplanes], -rot, rot)
    lo, hi = c["scale"]
    scale = _between(_u(u, "affine", 4, 3)[:1 if c["isotropic_scale"] else ndim], lo, hi)
    shear = _between(_u(u, "affine", 7, 9)[:ndim * ndim].reshape(ndim, ndim), -c["shear"], c["shear"])
    shear = jnp.eye(ndim) + shear * (1.0 - jnp.eye(ndim))
    # Pull-back map: sampling at x / scale shows the content `scale` times larger.
    a = _mm(_mm(_rotation(angles, ndim), shear), jnp.diag(jnp.broadcast_to(1.0 / scale, (ndim,))))
    t = jnp.broadcast_to(jnp.asarray(c["translate"], jnp.float32), (ndim,))
    t = _between(_u(u, "affine", 16, 3)[:ndim], -t, t)
    matrix = _mm(jnp.where(fire, a, jnp.eye(ndim)), matrix)
    shift = jnp.where(fire, t, shift)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape], indexing="ij"))
  rel = grid - centre.reshape((ndim,) + (1,) * ndim)
  # Elementwise multiply-adds, not a dot: integer grid coordinates must stay exact on every backend.
  coords = jnp.stack([sum(matrix[i, j] * rel[j] for j in range(ndim)) + centre[i] + shift[i]
                      for i in range(ndim)])
  if "elastic" in cfg:
    c = cfg["elastic"]
    coarse = tuple(max(2, round(n / float(c["sigma"])) + 1) for n in shape)
    magnitude = _between(_u(u, "elastic", 1), *c["magnitude"])
    noise = _draw(jax.random.normal, jax.random.fold_in(key, _STREAM["elastic"]), (ndim,) + coarse) * magnitude
    disp = jax.image.resize(noise, (ndim,) + tuple(shape), method="cubic")
    coords = coords + jnp.where(_u(u, "elastic", 0) < c["p"], disp, 0.0)
  return coords


# ---------------------------------------------------------------------------------------------- intensity

def _gaussian_blur(x: Array, sigma: Array, radius: int) -> Array:
  """Separable Gaussian of x (*S, C): per spatial axis, a weighted sum of 2 * radius + 1 shifted copies."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
  w = w / jnp.sum(w)
  for axis in range(x.ndim - 1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    x = sum(w[k] * jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k in range(2 * radius + 1))
  return x


def _low_res(x: Array, factor: Array, axes, linear: bool) -> Array:
  """Keep every `factor`-th voxel along `axes` (point sampling) and interpolate back, separably."""
  for axis in axes:
    n = x.shape[axis]
    u = jnp.arange(n, dtype=jnp.float32) / factor  # position on the coarse grid
    k0 = jnp.floor(u)
    frac = (u - k0) if linear else jnp.zeros_like(u)
    i0 = jnp.clip(jnp.round(k0 * factor), 0, n - 1).astype(jnp.int32)
    i1 = jnp.clip(jnp.round((k0 + 1) * factor), 0, n - 1).astype(jnp.int32)
    shape = [1] * x.ndim
    shape[axis] = n
    frac = frac.reshape(shape)
    x = (1.0 - frac) * jnp.take(x, i0, axis=axis) + frac * jnp.take(x, i1, axis=axis)
  return x


def _bias_field(key: Array, shape, order: int, coefficient: float) -> Array:
  """exp(sum_{|a| <= order} c_a prod_d u_d^a_d) on coordinates u in [-1, 1], shape (*S, 1)."""
  ndim = len(shape)
  powers = [jnp.stack([jnp.linspace(-1.0, 1.0, n) ** k for k in range(order + 1)]) for n in shape]
  coef = _draw(jax.random.uniform, key, (order + 1,) * ndim, minval=-coefficient, maxval=coefficient)
  degree = sum(jnp.meshgrid(*[jnp.arange(order + 1)] * ndim, indexing="ij"))
  coef = jnp.where(degree <= order, coef, 0.0)
  letters = "abc"[:ndim]
  spec = letters + "," + ",".join(f"{axis}{axis.upper()}" for axis in letters) + "->" + letters.upper()
  return jnp.exp(jnp.einsum(spec, coef, *powers, precision=jax.lax.Precision.HIGHEST))[..., None]


def _intensity(key: Array, u: Array, x: Array, cfg: Dict[str, Any]) -> Array:
  """The intensity chain on one float32 image (*S, C). A transform that does not fire returns x exactly."""
  spatial_axes = tuple(range(x.ndim - 1))

  def draw(name, lo_hi=None):
    fire = _u(u, name, 0) < cfg[name]["p"]
    value = None if lo_hi is None else _between(_u(u, name, 1), *lo_hi)
    return fire, value, jax.random.fold_in(key, _STREAM[name])

  if "bias_field" in cfg:
    c = cfg["bias_field"]
    fire, _, kv = draw("bias_field")
    x = jnp.where(fire, x * _bias_field(kv, x.shape[:-1], int(c["order"]), float(c["coefficient"])), x)
  if "blur" in cfg:
    fire, sigma, _ = draw("blur", cfg["blur"]["sigma"])
    radius = max(1, math.ceil(3.0 * cfg["blur"]["sigma"][1]))
    x = jnp.where(fire & (sigma > 0), _gaussian_blur(x, sigma, radius), x)
  if "low_res" in cfg:
    c = cfg["low_res"]
    fire, factor, _ = draw("low_res", c["factor"])
    axes = spatial_axes if c["axes"] is None else [a % len(spatial_axes) for a in c["axes"]]
    x = jnp.where(fire & (factor > 1.0), _low_res(x, jnp.maximum(factor, 1.0), axes, c["upsample"] == "linear"), x)
  if "brightness" in cfg:
    fire, b, _ = draw("brightness", cfg["brightness"]["range"])
    x = jnp.where(fire, x * b, x)
  if "contrast" in cfg:
    fire, c, _ = draw("contrast", cfg["contrast"]["range"])
    mean = jnp.mean(x, axis=spatial_axes, keepdims=True)
    y = (x - mean) * c + mean
    if cfg["contrast"]["preserve_range"]:
      y = jnp.clip(y, jnp.min(x, axis=spatial_axes, keepdims=True), jnp.max(x, axis=spatial_axes, keepdims=True))
    x = jnp.where(fire & (c != 1.0), y, x)
  if "gamma" in cfg:
    lo, hi = cfg["gamma"]["range"]
    fire, log_g, _ = draw("gamma", (math.log(lo), math.log(hi)))
    mn = jnp.min(x, axis=spatial_axes, keepdims=True)
    span = jnp.max(x, axis=spatial_axes, keepdims=True) - mn
    y = jnp.power((x - mn) / jnp.maximum(span, 1e-7), jnp.exp(log_g)) * span + mn
    x = jnp.where(fire & (log_g != 0.0), y, x)
  if "noise" in cfg:
    fire, std, kv = draw("noise", cfg["noise"]["std"])
    x = jnp.where(fire, x + std * _draw(jax.random.normal, kv, x.shape), x)
  return x


# -------------------------------------------------------------------------------------------- batch level

def _box(u: Array, shape, frac: Array) -> Array:
  """Boolean (*S) box with sides round(frac_d * n_d) at a random position inside the volume (u: (D,))."""
  inside = True
  for d, n in enumerate(shape):
    size = jnp.round(frac[d] * n)
    start = jnp.minimum(jnp.floor(u[d] * (n - size + 1)), n - size)
    idx = jnp.arange(n, dtype=jnp.float32).reshape([n if e == d else 1 for e in range(len(shape))])
    inside = inside & (idx >= start) & (idx < start + size)
  return inside


# A segmentation chain in the spirit of nnU-Net's default 3D augmentation (probabilities and ranges
# chosen here, not copied): what the throughput benchmarks run ("the full chain").
SEGMENTATION_CHAIN = dict(
    flip=dict(p=0.5), affine=dict(p=0.2, rotate_deg=30.0, scale=(0.7, 1.4)),
    elastic=dict(p=0.2, sigma=8.0, magnitude=(0.0, 2.0)), noise=dict(p=0.1, std=(0.0, 0.1)),
    blur=dict(p=0.2, sigma=(0.5, 1.0)), brightness=dict(p=0.15, range=(0.75, 1.25)),
    contrast=dict(p=0.15, range=(0.75, 1.25)), low_res=dict(p=0.25, factor=(1.0, 2.0)),
    gamma=dict(p=0.3, range=(0.7, 1.5)))


def make_augment(config: Mapping) -> Callable[[Array, Batch], Batch]:
  """Validate `config` (see the module docstring) and return a pure `augment(rng, batch) -> batch`.

  Raises ValueError naming an unknown key (with a did-you-mean) or a bad value. Shape-dependent checks
  (rot90 on a non-square plane, mixup on a segmentation label, missing num_classes) raise when `augment` is
  first traced.
  """
  cfg = _parse(config)
  opts = cfg.pop("options")
  spatial = {k: v for k, v in cfg.items() if k in _SPATIAL}
  intensity = {k: v for k, v in cfg.items() if k in _INTENSITY}

  def augment(rng: Array, batch: Batch) -> Batch:
    if not cfg:
      return dict(batch)
    out = dict(batch)
    image = batch["image"]
    dtype, size, shape = image.dtype, image.shape[0], image.shape[1:-1]
    ndim = len(shape)
    label = batch.get("label")
    seg = label is not None and label.ndim == ndim + 1
    x = image.astype(jnp.float32)
    keys = jax.random.split(jax.random.fold_in(rng, 0x6A5), 3)
    sample_keys = jax.random.split(keys[0], size)
    u = _draw(jax.random.uniform, keys[1], (size, _BLOCK * len(_DEFAULTS)))  # per-sample scalars, see _u

    if spatial:
      coords = jax.vmap(lambda k, v: _spatial_coords(k, v, shape, spatial))(sample_keys, u)
      warp = lambda v, c, order, pad: _sample(v, c, order=order, pad=pad)
      x = jax.vmap(warp, in_axes=(0, 0, None, None))(x, coords, 1, opts["image_pad"])
      if seg:
        if opts["label_mode"] == "onehot":
          onehot = jax.nn.one_hot(label, opts["num_classes"], dtype=jnp.float32)
          warped = jax.vmap(warp, in_axes=(0, 0, None, None))(onehot, coords, 1, "constant")
          # Outside the volume all classes weigh 0 and argmax gives 0, the background.
          out["label"] = jnp.argmax(warped, axis=-1).astype(label.dtype)
        else:
          warped = jax.vmap(warp, in_axes=(0, 0, None, None))(label[..., None], coords, 0, "constant")
          out["label"] = warped[..., 0].astype(label.dtype)
      mask = batch.get("mask")
      if mask is not None and mask.shape == image.shape[:-1]:
        warped = jax.vmap(warp, in_axes=(0, 0, None, None))(mask[..., None], coords, 0, "constant")
        out["mask"] = warped[..., 0].astype(mask.dtype)
    if intensity:
      x = jax.vmap(lambda k, v, im: _intensity(k, v, im, intensity))(sample_keys, u, x)

    batch_level = [k for k in ("cutout", "mixup", "cutmix") if k in cfg]
    if batch_level:
      y = out.get("label")
      soft = None
      if y is not None and not seg and ("mixup" in cfg or "cutmix" in cfg):
        if y.ndim == 1:
          if not opts["num_classes"]:
            raise ValueError("augment: mixup/cutmix on (B,) int labels need augment.num_classes.")
          soft = jax.nn.one_hot(y, opts["num_classes"], dtype=jnp.float32)
        else:
          soft = y.astype(jnp.float32)
      mixers = [k for k in ("mixup", "cutmix") if k in cfg]
      if mixers:  # one Beta draw for both (each jax.random.beta call is a rejection loop to compile)
        alpha = jnp.array([float(cfg[k]["alpha"]) for k in mixers])
        lams = dict(zip(mixers, jnp.moveaxis(jax.random.beta(keys[2], alpha, alpha, (size, len(mixers))), 1, 0)))
      if "cutout" in cfg:
        c = cfg["cutout"]
        fire = _u(u, "cutout", 0) < c["p"]
        holes_key = jax.random.fold_in(keys[2], _STREAM["cutout"])
        holes = _draw(jax.random.uniform, holes_key, (int(c["holes"]), 2, size, ndim))
        for h in range(int(c["holes"])):
          frac = _between(holes[h, 0], *c["size"])
          box = jax.vmap(lambda v, f: _box(v, shape, f))(holes[h, 1], frac)
          box = box & fire.reshape((size,) + (1,) * ndim)
          x = jnp.where(box[..., None], jnp.float32(c["value"]), x)
      if "mixup" in cfg:
        if seg:
          raise ValueError("augment.mixup is for classification only; a segmentation label (B, *S) was given. "
                           "Use cutmix, which pastes label maps consistently.")
        c = cfg["mixup"]
        perm = jnp.argsort(_u(u, "mixup", 1))  # a random partner for every sample
        lam = jnp.where(_u(u, "mixup", 0) < c["p"], lams["mixup"], 1.0)
        lam_x = lam.reshape((size,) + (1,) * (ndim + 1))
        x = lam_x * x + (1.0 - lam_x) * x[perm]
        if soft is not None:
          soft = lam[:, None] * soft + (1.0 - lam[:, None]) * soft[perm]
      if "cutmix" in cfg:
        c = cfg["cutmix"]
        perm = jnp.argsort(_u(u, "cutmix", 1))
        frac = jnp.broadcast_to((1.0 - lams["cutmix"])[:, None] ** (1.0 / ndim), (size, ndim))
        box = jax.vmap(lambda v, f: _box(v, shape, f))(_u(u, "cutmix", 2, 3)[:, :ndim], frac)
        box = box & (_u(u, "cutmix", 0) < c["p"]).reshape((size,) + (1,) * ndim)
        x = jnp.where(box[..., None], x[perm], x)
        if seg:
          out["label"] = jnp.where(box, out["label"][perm], out["label"])
          if out.get("mask") is not None and out["mask"].shape == box.shape:
            out["mask"] = jnp.where(box, out["mask"][perm], out["mask"])
        elif soft is not None:
          area = jnp.mean(box.reshape(size, -1).astype(jnp.float32), axis=1)[:, None]  # actual pasted share
          soft = (1.0 - area) * soft + area * soft[perm]
      if soft is not None:
        out["label"] = soft
    out["image"] = x.astype(dtype)
    return out

  return augment
