"""Multimodal fusion of image modalities (MRI sequences, CT and PET, ...) and a clinical record: early,
intermediate and late fusion behind one registered model, "fusion".

Input `x` (the multimodal batch of issue 24; `B` cases, every declared modality's image channels-last):

    {"images": {m: (B, *S_m, C_m) float32}, "present": {m: (B,) float32, 1 = the case has modality m},
     "tabular": {"numeric": (B, F) float32, "missing": (B, F) float32, "categorical": (B, K) int32}}

"tabular" is needed only when the model declares columns (`num_numeric`, `categorical_sizes`); categorical
codes must lie in 0..size-1 (0 = missing / unknown), which the data pipeline guarantees. Image modalities and
tabular entries the model does not declare are ignored, so a single-source baseline reads the same batches.

Absent means absent: each image is replaced by zeros where its present flag is 0 before its encoder sees it,
so no output depends on an absent image's pixels; on top of that each fusion type treats the flag as
information (a learned "missing" vector, masked attention, renormalised late weights), so zeros are never
read as data. Encoders must use a per-sample norm ("group" or "instance"): a batch norm in training would
still put the stand-in zeros of absent cases into the batch statistics of everyone else, so "batch" is
refused (as is an encoder whose default norm is "batch" when encoder_kwargs leaves it out).

Fusion types (`fusion`; the references are the usual ones for each idea):
  "early": the images concatenated as channels plus one presence channel per modality, one encoder
    ("encoder"); the tabular embedding joins the pooled features before the head. Needs equal spatial shapes.
  "concat": per-modality pooled features (absent -> a learned per-modality "missing" vector), the presence
    flags and the tabular embedding, concatenated.
  "attention": one token per modality and one tabular token, pooled by attention weights (Ilse et al. 2018's
    attention pooling) whose softmax runs over present tokens only; aux["attention"] (B, tokens).
  "film": each modality's last-stage map modulated as relu(gamma * h + beta) with gamma = 1 + dgamma and beta
    computed from the tabular embedding (FiLM, Perez et al. 2018), pooled, then as "concat".
  "cross_attention": a pre-norm transformer (Vaswani et al. 2017) over a CLS token, every position of each
    modality's last-stage map (projected to `hidden_size`, plus a learned modality embedding; no positional
    embedding, so the maps' sizes are free) and tabular tokens (one per numeric column from (value, missing),
    one per categorical column); absent modalities' tokens are masked out as keys.
  "late_mean" / "late_learned": logits per source (a Dense on each modality's pooled features, an MLP on the
    record), combined by the mean over present sources or by softmax(learned per-source weights) over present
    sources; aux["source_logits"] (B, sources, classes), sources in `modalities` order then "tabular".
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.base import MODELS
from medjax.registry import Registry

Dtype = Any

FUSIONS = Registry("fusion type")
for _name, _what in [("early", "channels + presence channels into one encoder"),
                     ("concat", "pooled features, missing vectors, presence flags, record"),
                     ("attention", "presence-masked attention pooling of per-source tokens"),
                     ("film", "record-conditioned FiLM on each modality's last-stage map"),
                     ("cross_attention", "transformer over map, record and CLS tokens"),
                     ("late_mean", "mean of present sources' logits"),
                     ("late_learned", "learned source weights renormalised over present sources")]:
  FUSIONS.add(_name, _what)
LATE = ("late_mean", "late_learned")
NEEDS_MAP = ("film", "cross_attention")  # these read aux["stages"][-1]; the rest aux["features"]
SET_BY_FUSION = ("num_classes", "spatial_dims", "dtype", "param_dtype")  # encoder fields the wrapper owns


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to entries where `mask` is True; masked entries get exactly 0 and a
  row with no True entry gets all zeros (not NaN). `scores` (..., N) any float, `mask` (..., N) bool ->
  float32 (..., N)."""
  scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  e = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


class TabularEncoder(nn.Module):
  """The record embedding: an MLP (Dense -> ReLU -> Dense) on concat(numeric, missing flags, one learned
  embedding of width `features` per categorical column). `(B, F), (B, F), (B, K) int -> (B, features)`
  float32. Numeric values flagged missing are zeroed here too, so only the flag carries them."""
  num_numeric: int
  categorical_sizes: Sequence[int]
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, numeric, missing, categorical):
    parts = []
    if self.num_numeric:
      missing = missing.astype(jnp.float32)
      parts += [jnp.where(missing > 0.5, 0.0, numeric.astype(jnp.float32)), missing]
    for k, size in enumerate(self.categorical_sizes):
      parts.append(nn.Embed(size, self.features, param_dtype=self.param_dtype, name=f"categorical{k}")(
        categorical[:, k]).astype(jnp.float32))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.relu(nn.Dense(self.features, name="hidden", **kw)(jnp.concatenate(parts, axis=-1).astype(self.dtype)))
    return nn.Dense(self.features, name="out", **kw)(h).astype(jnp.float32)


class MaskedBlock(nn.Module):
  """Pre-norm transformer block whose keys are masked: `x + MHA(LN(x), keys where valid)`, then
  `x + MLP(LN(x))` (exact GELU). `(B, N, D), valid (B, N) bool -> (B, N, D)`."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, valid):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(name="norm1", **kw)(x)
    x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attn", **kw)(
      y, mask=valid[:, None, None, :], deterministic=True)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp1", **kw)(nn.LayerNorm(name="norm2", **kw)(x)), approximate=False)
    return x + nn.Dense(x.shape[-1], name="mlp2", **kw)(y)


@MODELS.register("fusion")
class Fusion(nn.Module):
  """Multimodal classifier: `x` (the dict above) -> `(logits (B, num_classes) float32, aux)`.

  Fields:
    num_classes: classifier outputs.
    spatial_dims: 2 or 3, the rank of every image modality.
    modalities: the image modality names, in the order used for tokens, sources and parameters; () for a
      record-only model ("concat", "attention", "cross_attention" and the late types).
    fusion: a name in FUSIONS (see the module docstring).
    encoder / encoder_kwargs: a registered model name and its fields (e.g. "resnet18", dict(width=16,
      small_input=True, norm="group")); one instance per modality ("encoder_<modality>"), or one "encoder"
      for "early". Its `num_classes` (1: its own head is unused), spatial_dims, dtype and param_dtype are set
      here. It must expose aux["features"] (B, C), or aux["stages"][-1] (B, *S', C) for "film" and
      "cross_attention" (the ResNets give both), and use norm "group" or "instance".
    num_numeric / categorical_sizes: the record's numeric columns and, per categorical column, its vocabulary
      size + 1 (index 0 = missing / unknown). Both empty: no record.
    tabular_dim: width of the record embedding (`TabularEncoder`) and of each categorical embedding.
    hidden_size / num_heads / num_layers: token width ("attention", "cross_attention") and the transformer
      ("cross_attention"; MLP width 2 * hidden_size).
    head_hidden: width of the hidden layer of the head on the fused features (Dense -> ReLU -> Dense); 0 = a
      linear head. On by default because a label that depends on an image feature and a record feature jointly
      (an interaction, not a sum) cannot be read by a linear head on concatenated features.
    dtype / param_dtype: compute / parameter dtypes (masks, softmaxes and the logits in float32).

  aux: "features" (B, D) float32: the fused features the head reads; for late fusion the per-source features
  concatenated (modalities in order, then the record's hidden layer), each absent source's block zeroed, since
  late fusion has no joint representation. Plus "attention" (B, tokens) for "attention", "source_logits"
  (B, sources, num_classes) and "source_weights" (B, sources) for the late types.
  """
  num_classes: int
  spatial_dims: int = 2
  modalities: Sequence[str] = ()
  fusion: str = "concat"
  encoder: str = "resnet18"
  encoder_kwargs: Optional[Mapping[str, Any]] = None
  num_numeric: int = 0
  categorical_sizes: Sequence[int] = ()
  tabular_dim: int = 32
  hidden_size: int = 64
  num_heads: int = 4
  num_layers: int = 1
  head_hidden: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def has_tabular(self) -> bool:
    return bool(self.num_numeric or self.categorical_sizes)

  def _check_fields(self) -> None:
    where = "Fusion"
    if self.fusion not in FUSIONS:
      raise ValueError(f"{where}: {FUSIONS.unknown_message(self.fusion)}")
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"{where}: spatial_dims must be 2 or 3, got {self.spatial_dims}.")
    mods = tuple(self.modalities)
    if isinstance(self.modalities, str) or len(set(mods)) != len(mods) or not all(isinstance(m, str) and m
                                                                                 for m in mods):
      raise ValueError(f"{where}: modalities must be a tuple of distinct non-empty names, got {self.modalities!r}.")
    if self.num_numeric < 0 or any(int(s) < 1 for s in self.categorical_sizes):
      raise ValueError(f"{where}: num_numeric must be >= 0 and every categorical size >= 1 (vocabulary + 1), got "
                       f"num_numeric={self.num_numeric}, categorical_sizes={tuple(self.categorical_sizes)}.")
    if not mods and not self.has_tabular:
      raise ValueError(f"{where}: nothing to fuse: no modalities and no tabular columns (num_numeric=0, "
                       f"categorical_sizes=()).")
    if not mods and self.fusion in ("early", "film"):
      raise ValueError(f"{where}: fusion={self.fusion!r} needs at least one image modality (modalities=()); "
                       f"use 'concat', 'attention', 'cross_attention' or a late type for a record-only model.")
    if self.fusion in ("attention", "cross_attention") and self.hidden_size < 1:
      raise ValueError(f"{where}: hidden_size must be positive, got {self.hidden_size}.")
    if self.fusion == "cross_attention" and (self.num_layers < 1 or self.hidden_size % max(self.num_heads, 1)
                                              or self.num_heads < 1):
      raise ValueError(f"{where}: fusion='cross_attention' needs num_layers >= 1 and hidden_size divisible by "
                       f"num_heads >= 1; got num_layers={self.num_layers}, hidden_size={self.hidden_size}, "
                       f"num_heads={self.num_heads}.")
    if self.fusion == "film" and not self.has_tabular:
      raise ValueError(f"{where}: fusion='film' computes gamma/beta from the record, so it needs tabular columns: "
                       f"set num_numeric and/or categorical_sizes.")

  def _encoder(self, name: str) -> nn.Module:
    """A fresh encoder submodule `name`, after checking encoder_kwargs (unknown keys, owned keys, norm)."""
    kwargs = dict(self.encoder_kwargs or {})
    where = "Fusion encoder_kwargs"
    owned = [k for k in SET_BY_FUSION if k in kwargs]
    if owned:
      raise ValueError(f"{where}: {owned} are set by the fusion model (num_classes=1 for the unused encoder head, "
                       f"the fusion's spatial_dims, dtype and param_dtype); remove them.")
    MODELS.check_kwargs(self.encoder, kwargs, where=where)
    kwargs.update(num_classes=1, spatial_dims=self.spatial_dims, dtype=self.dtype, param_dtype=self.param_dtype)
    cls = MODELS.get(self.encoder)
    if getattr(cls(**kwargs, parent=None), "norm", None) == "batch":
      raise ValueError(f"{where}: encoder {self.encoder!r} uses norm='batch' (given or its default); training "
                       f"batch statistics would mix the zero stand-ins of absent modalities into every case. "
                       f"Set encoder_kwargs['norm'] to 'group' or 'instance'.")
    return cls(**kwargs, name=name)

  def _encode(self, name: str, image, train: bool):
    """`(B, *S, C)` -> pooled features `(B, C')` float32, or the last-stage map `(B, *S', C')` for NEEDS_MAP."""
    _, aux = self._encoder(name)(image, train=train)
    if self.fusion in NEEDS_MAP:
      stages = aux.get("stages") if isinstance(aux, Mapping) else None
      if not stages or stages[-1].ndim != self.spatial_dims + 2:
        raise ValueError(f"Fusion(fusion={self.fusion!r}): encoder {self.encoder!r} gives no aux['stages'] list "
                         f"ending in a (B, *spatial, C) map; use a ResNet encoder.")
      return stages[-1]
    features = aux.get("features") if isinstance(aux, Mapping) else None
    if features is None or features.ndim != 2:
      raise ValueError(f"Fusion(fusion={self.fusion!r}): encoder {self.encoder!r} gives no pooled aux['features'] "
                       f"(B, C); use an encoder that does (the ResNets).")
    return features.astype(jnp.float32)

  def _inputs(self, x) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[Any]]:
    """Validated (images with absent cases zeroed, present flags (B,) float32, record (numeric, missing,
    categorical) or None)."""
    if not isinstance(x, Mapping) or "images" not in x or "present" not in x:
      got = sorted(x) if isinstance(x, Mapping) else f"an array of shape {getattr(x, 'shape', None)}"
      raise ValueError(f"Fusion expects x = {{'images': {{...}}, 'present': {{...}}[, 'tabular': {{...}}]}} "
                       f"(the multimodal batch), got {got}.")
    images, present, batch = {}, {}, None
    for m in self.modalities:
      for key in ("images", "present"):
        if m not in x[key]:
          raise ValueError(f"Fusion: x[{key!r}] has no declared modality {m!r} (it has {sorted(x[key])}); every "
                           f"modality in `modalities` must be in the batch (zeros and present 0 where absent).")
      image, flag = x["images"][m], x["present"][m]
      if image.ndim != self.spatial_dims + 2:
        raise ValueError(f"Fusion: image {m!r} has shape {tuple(image.shape)}; spatial_dims={self.spatial_dims} "
                         f"needs (B, *spatial, C) with {self.spatial_dims} spatial axes.")
      batch = image.shape[0] if batch is None else batch
      if flag.shape != (batch,) or image.shape[0] != batch:
        raise ValueError(f"Fusion: modality {m!r}: image {tuple(image.shape)} and present {tuple(flag.shape)} "
                         f"must share the batch size {batch} (present is (B,)).")
      present[m] = flag.astype(jnp.float32)
      keep = (present[m] > 0.5).reshape((batch,) + (1,) * (image.ndim - 1))
      images[m] = jnp.where(keep, image, 0).astype(self.dtype)  # the one place absent pixels are dropped
    if not self.has_tabular:
      return images, present, None
    tab = x.get("tabular")
    if not isinstance(tab, Mapping):
      raise ValueError("Fusion: the model declares tabular columns (num_numeric / categorical_sizes) but x has no "
                       "'tabular' dict.")
    k = len(self.categorical_sizes)
    expected = {"numeric": self.num_numeric, "missing": self.num_numeric, "categorical": k}
    for key, width in expected.items():
      if width and (key not in tab or tab[key].ndim != 2 or tab[key].shape[1] != width
                    or (batch is not None and tab[key].shape[0] != batch)):
        got = tuple(tab[key].shape) if key in tab else "nothing"
        raise ValueError(f"Fusion: x['tabular'][{key!r}] must be (B={batch or 'B'}, {width}) for num_numeric="
                         f"{self.num_numeric}, categorical_sizes={tuple(self.categorical_sizes)}; got {got}.")
    n = tab["numeric"].shape[0] if self.num_numeric else tab["categorical"].shape[0]
    numeric = tab["numeric"] if self.num_numeric else jnp.zeros((n, 0), jnp.float32)
    missing = tab["missing"] if self.num_numeric else numeric
    categorical = tab["categorical"].astype(jnp.int32) if k else jnp.zeros((n, 0), jnp.int32)
    record = (numeric.astype(jnp.float32), missing.astype(jnp.float32), categorical)
    return images, present, record

  def _head(self, features):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = features.astype(self.dtype)
    if self.head_hidden:
      h = nn.relu(nn.Dense(self.head_hidden, name="head_hidden", **kw)(h))
    return nn.Dense(self.num_classes, name="head", **kw)(h).astype(jnp.float32)

  def _missing_filled(self, m: str, features, flag):
    """Features `(B, C)` with absent cases' rows replaced by the learned vector "missing_<m>"."""
    missing = self.param(f"missing_{m}", nn.initializers.normal(0.02), (features.shape[-1],), self.param_dtype)
    return jnp.where(flag[:, None] > 0.5, features, missing.astype(jnp.float32)[None])

  @nn.compact
  def __call__(self, x, *, train: bool) -> Tuple[jax.Array, Dict[str, Any]]:
    self._check_fields()
    images, present, record = self._inputs(x)
    mods = tuple(self.modalities)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = None
    if record is not None and self.fusion != "cross_attention":  # cross_attention reads per-column tokens instead
      emb = TabularEncoder(self.num_numeric, tuple(self.categorical_sizes), self.tabular_dim, name="tabular",
                           **kw)(*record)
    aux: Dict[str, Any] = {}
    if self.fusion == "early":
      shapes = {m: tuple(images[m].shape[1:-1]) for m in mods}
      if len(set(shapes.values())) > 1:
        raise ValueError(f"Fusion(fusion='early') concatenates the modalities as channels, so they need equal "
                         f"spatial shapes; got {shapes}. Resample them to one grid or use an intermediate fusion.")
      flags = [jnp.broadcast_to(present[m].reshape((-1,) + (1,) * (self.spatial_dims + 1)),
                                images[m].shape[:-1] + (1,)).astype(self.dtype) for m in mods]
      fused = self._encode("encoder", jnp.concatenate([images[m] for m in mods] + flags, axis=-1), train)
      features = fused if emb is None else jnp.concatenate([fused, emb], axis=-1)
    elif self.fusion in ("concat", "film"):
      parts = []
      for m in mods:
        h = self._encode(f"encoder_{m}", images[m], train)
        if self.fusion == "film":
          c = h.shape[-1]
          film = nn.Dense(2 * c, kernel_init=nn.initializers.zeros, name=f"film_{m}", **kw)(emb.astype(self.dtype))
          shape = (-1,) + (1,) * self.spatial_dims + (c,)
          gamma, beta = (1.0 + film[:, :c]).reshape(shape), film[:, c:].reshape(shape)
          h = jnp.mean(nn.relu(gamma * h + beta).astype(jnp.float32), axis=tuple(range(1, h.ndim - 1)))
        parts.append(self._missing_filled(m, h, present[m]))
      parts += [jnp.stack([present[m] for m in mods], axis=-1)] if mods else []
      features = jnp.concatenate(parts + ([] if emb is None else [emb]), axis=-1)
    elif self.fusion == "attention":
      tokens = [nn.Dense(self.hidden_size, name=f"token_{m}", **kw)(self._encode(f"encoder_{m}", images[m], train))
                for m in mods]
      flags = [present[m] for m in mods]
      if emb is not None:
        tokens.append(nn.Dense(self.hidden_size, name="token_tabular", **kw)(emb.astype(self.dtype)))
        flags.append(jnp.ones_like(emb[:, 0]))
      tokens = jnp.stack(tokens, axis=1).astype(jnp.float32)  # (B, T, hidden)
      valid = jnp.stack(flags, axis=1) > 0.5
      scores = nn.Dense(1, name="attention_score", **kw)(
        nn.tanh(nn.Dense(self.hidden_size, name="attention_hidden", **kw)(tokens)))[..., 0]
      weights = masked_softmax(scores, valid)
      features = jnp.einsum("bt,btd->bd", weights, jnp.where(valid[..., None], tokens, 0.0))
      aux["attention"] = weights
    elif self.fusion == "cross_attention":
      features = self._cross_attention(images, present, record, train)
    else:
      return self._late(images, present, emb, train)
    aux["features"] = features.astype(jnp.float32)
    return self._head(features), aux

  def _cross_attention(self, images, present, record, train):
    d, kw = self.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens, valid = [], []
    for m in self.modalities:
      h = self._encode(f"encoder_{m}", images[m], train)
      t = nn.Dense(d, name=f"token_{m}", **kw)(h.reshape(h.shape[0], -1, h.shape[-1]))
      embed = self.param(f"modality_embedding_{m}", nn.initializers.normal(0.02), (d,), self.param_dtype)
      tokens.append(t + embed.astype(t.dtype))
      valid.append(jnp.broadcast_to(present[m][:, None] > 0.5, t.shape[:2]))
    if record is not None:
      numeric, missing, categorical = record
      numeric = jnp.where(missing > 0.5, 0.0, numeric)
      if self.num_numeric:  # one token per column from (value, missing flag), weights per column
        kernel = self.param("numeric_token_kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                            (self.num_numeric, 2, d), self.param_dtype)
        bias = self.param("numeric_token_bias", nn.initializers.normal(0.02), (self.num_numeric, d),
                          self.param_dtype)
        tokens.append((jnp.einsum("bfi,fid->bfd", jnp.stack([numeric, missing], -1), kernel) + bias).astype(
          self.dtype))
      for k, size in enumerate(self.categorical_sizes):
        tokens.append(nn.Embed(size, d, param_dtype=self.param_dtype, name=f"categorical_token{k}")(
          categorical[:, k:k + 1]).astype(self.dtype))
      valid += [jnp.ones(t.shape[:2], bool) for t in tokens[len(valid):]]
    b = tokens[0].shape[0]
    cls = self.param("cls_token", nn.initializers.normal(0.02), (d,), self.param_dtype)
    tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))] + tokens, axis=1)
    valid = jnp.concatenate([jnp.ones((b, 1), bool)] + valid, axis=1)
    for i in range(self.num_layers):
      tokens = MaskedBlock(self.num_heads, 2 * d, name=f"block{i}", **kw)(tokens, valid)
    return nn.LayerNorm(name="norm", **kw)(tokens[:, 0]).astype(jnp.float32)

  def _late(self, images, present, emb, train):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats, logits, flags = [], [], []
    for m in self.modalities:
      feats.append(self._encode(f"encoder_{m}", images[m], train))
      logits.append(nn.Dense(self.num_classes, name=f"head_{m}", **kw)(feats[-1].astype(self.dtype)))
      flags.append(present[m])
    if emb is not None:
      feats.append(nn.relu(nn.Dense(self.tabular_dim, name="head_tabular_hidden", **kw)(emb.astype(self.dtype))))
      logits.append(nn.Dense(self.num_classes, name="head_tabular", **kw)(feats[-1]))
      flags.append(jnp.ones_like(emb[:, 0]))
    source_logits = jnp.stack(logits, axis=1).astype(jnp.float32)  # (B, S, classes)
    valid = jnp.stack(flags, axis=1) > 0.5
    if self.fusion == "late_mean":
      count = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
      weights = valid.astype(jnp.float32) / jnp.maximum(count, 1.0)  # no source present: logits 0
    else:
      w = self.param("source_weights", nn.initializers.zeros, (len(logits),), jnp.float32)
      weights = masked_softmax(jnp.broadcast_to(w, valid.shape), valid)
    combined = jnp.einsum("bs,bsc->bc", weights, jnp.where(valid[..., None], source_logits, 0.0))
    features = jnp.concatenate([jnp.where(v[:, None] > 0.5, f.astype(jnp.float32), 0.0) for f, v in zip(feats, flags)],
                               axis=-1)
    return combined, {"features": features, "source_logits": source_logits, "source_weights": weights}
