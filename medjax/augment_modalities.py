"""On-device augmentation of multimodal batches, and modality dropout.

  config.augment = dict(flip=dict(p=0.5), noise=True, modality_dropout=dict(p=0.3, sources=("t2", "tabular")))

A multimodal batch's "image" is a dict (`medjax.data.datasets.multimodal`): {"images": {m: (B, *S_m, C_m)},
"present": {m: (B,)}, "tabular": {"numeric": (B, F), "missing": (B, F), "categorical": (B, K)}}.

Image transforms (every `medjax.augment` key) act on each modality separately with the SAME random key, so
modalities of one shape (co-registered series) get the same flips, rotations and warps and stay aligned;
modalities of different shapes get transforms drawn for their own shapes. Intensity factors are shared as well.
An absent modality stays exactly zero (transforms such as noise would otherwise write into it). Batch-level
mixing (mixup, cutmix) would have to mix records and presence flags too and is refused; segmentation labels
with several modalities are refused (the label belongs to one grid).

Modality dropout (Neverova et al. 2016, "ModDrop"): each listed source of each case is removed with probability
`p`: an image modality gets present 0 and an all-zero image; "tabular" gets every value marked missing (numeric
0, missing 1, categorical 0 = unknown). A case never loses its last present source: when every present source
of a case is drawn for removal, the one with the largest draw stays. Its keys: p (default 0.25) and sources
(default None: every image modality and "tabular").
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from medjax import augment
from medjax.typing import Array, Batch

DROPOUT_KEY = "modality_dropout"
TABULAR = "tabular"
DROPOUT_DEFAULTS = dict(p=0.25, sources=None)
_BATCH_LEVEL = ("mixup", "cutmix")


def parse_dropout(options: Any) -> Optional[Dict[str, Any]]:
  """`config.augment.modality_dropout` checked and merged over DROPOUT_DEFAULTS; None when off (None, False or
  p = 0). Errors name the key."""
  if options is None or options is False:
    return None
  given = {} if options is True else (options.to_dict() if hasattr(options, "to_dict") else dict(options))
  unknown = sorted(set(given) - set(DROPOUT_DEFAULTS))
  if unknown:
    raise ValueError(f"augment.{DROPOUT_KEY}: unknown key(s) {unknown}; known: {sorted(DROPOUT_DEFAULTS)}.")
  merged = {**DROPOUT_DEFAULTS, **given}
  p = merged["p"]
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
    raise ValueError(f"augment.{DROPOUT_KEY}.p must be a probability in [0, 1), got {p!r}.")
  if merged["sources"] is not None:
    sources = merged["sources"]
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources) or not sources:
      raise ValueError(f"augment.{DROPOUT_KEY}.sources must be a non-empty list of modality names (or "
                       f"{TABULAR!r}), got {sources!r}.")
    merged["sources"] = tuple(sources)
  return merged if p > 0 else None


def check_sources(dropout: Mapping[str, Any], modalities: Sequence[str], has_tabular: bool) -> None:
  """Raises ValueError naming `augment.modality_dropout.sources` when it lists a source the data lacks."""
  known = tuple(modalities) + ((TABULAR,) if has_tabular else ())
  for source in dropout["sources"] or ():
    if source not in known:
      raise ValueError(f"augment.{DROPOUT_KEY}.sources: {source!r} is not a source of this data; choose from "
                       f"{known}.")


def _zero_absent(image: Array, present: Array) -> Array:
  return image * present.reshape((-1,) + (1,) * (image.ndim - 1)).astype(image.dtype)


def modality_dropout(rng: Array, inputs: Mapping[str, Any], options: Mapping[str, Any]) -> Dict[str, Any]:
  """Modality dropout (module doc) of one multimodal model input. Returns the input with the same structure,
  shapes and dtypes: present flags (B,) lowered to 0 for removed sources, their images zeroed, and for a
  removed "tabular" every value marked missing."""
  images, present = dict(inputs["images"]), dict(inputs["present"])
  tab = inputs.get(TABULAR)
  names = list(images)
  sources = list(options["sources"] or names + ([TABULAR] if tab is not None else []))
  check_sources(options, names, tab is not None)
  size = next(iter(present.values())).shape[0] if present else tab["numeric"].shape[0]
  # Presence before dropout, per source: a tabular record counts as present unless every value is missing.
  if tab is not None:
    any_value = jnp.concatenate([1.0 - tab["missing"], (tab["categorical"] > 0).astype(jnp.float32)], axis=1)
    tab_present = (jnp.max(any_value, axis=1, initial=0.0) > 0).astype(jnp.float32)
  before = jnp.stack([tab_present if s == TABULAR else present[s].astype(jnp.float32) for s in sources], axis=1)
  u = jax.random.uniform(jax.random.fold_in(rng, 0x40D), (size, len(sources)))
  keep = jnp.where(u < options["p"], 0.0, 1.0) * before
  # Every source of the case drawn for removal: keep the present one with the largest draw.
  rescue = jax.nn.one_hot(jnp.argmax(jnp.where(before > 0, u, -1.0), axis=1), len(sources)) * before
  keep = jnp.where(jnp.sum(keep, axis=1, keepdims=True) > 0, keep, rescue)
  out = dict(inputs)
  for j, source in enumerate(sources):
    k = keep[:, j]
    if source == TABULAR:
      out[TABULAR] = {"numeric": tab["numeric"] * k[:, None].astype(tab["numeric"].dtype),
                      "missing": jnp.maximum(tab["missing"], 1.0 - k[:, None]).astype(tab["missing"].dtype),
                      "categorical": tab["categorical"] * k[:, None].astype(tab["categorical"].dtype)}
    else:
      present[source] = (present[source] * k).astype(present[source].dtype)
      images[source] = _zero_absent(images[source], present[source])
  out["images"], out["present"] = images, present
  return out


def make_augment(config: Mapping[str, Any]) -> Callable[[Array, Batch], Batch]:
  """The augmentation of `config.augment` for single-image and multimodal batches (module doc): the image
  transforms of `medjax.augment.make_augment` plus `modality_dropout`. Raises ValueError naming the key for bad
  options; refusals that depend on the batch (mixup on multimodal input, dropout of single images) are raised
  when the function is first traced."""
  config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  dropout = parse_dropout(config.pop(DROPOUT_KEY, None))
  image_augment = augment.make_augment(config)

  def apply(rng: Array, batch: Batch) -> Batch:
    inputs = batch["image"]
    if not isinstance(inputs, Mapping):
      if dropout is not None:
        raise ValueError(f"augment.{DROPOUT_KEY} needs multimodal examples (a dataset with named modalities); this "
                         "batch holds one image.")
      return image_augment(rng, batch)
    mixing = [k for k in _BATCH_LEVEL if config.get(k)]
    if mixing:
      raise ValueError(f"augment.{mixing[0]} is not supported for multimodal batches (it would have to mix "
                       "records and presence flags too).")
    label = batch.get("label")
    out = dict(batch)
    images = dict(inputs["images"])
    if label is not None and label.ndim > 1 and len(images) > 1:
      raise ValueError("augment: segmentation labels with several image modalities are not supported.")
    for name, image in images.items():
      moved = image_augment(rng, {"image": image, **({"label": label} if label is not None else {})})
      images[name] = _zero_absent(moved["image"], inputs["present"][name])
      if label is not None and "label" in moved:
        out["label"] = moved["label"]
    inputs = {**inputs, "images": images}
    out["image"] = modality_dropout(rng, inputs, dropout) if dropout is not None else inputs
    return out

  return apply
