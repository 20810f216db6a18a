"""CNN-LSTM: a shared 2D CNN per slice (or per frame) followed by a bidirectional LSTM over the sequence.

For volumes read as a stack of slices along z (thick-slice CT/MRI, where 2D features transfer better than
3D ones) and for time series of frames (cine MRI, echocardiography, ultrasound sweeps). The input is
`(B, T, *frame, C)`: `T` is z for a volume and time for a series, and a frame has `spatial_dims - 1` axes
(`spatial_dims=3`: 2D frames `(B, T, y, x, C)`; `spatial_dims=4`: a time series of 3D volumes).

The frame encoder is either the small conv stack `ConvStack` (default) or any registered classifier, named
by `encoder`, whose `aux["features"]` is the per-frame embedding (e.g. "resnet18" with
`encoder_kwargs=dict(small_input=True)`). All `B * T` frames go through the encoder as one batch, so the
weights are shared and the convolutions stay large.

`ConvStack` and `build_encoder` are shared with `medjax.models.graph`.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from medjax.models import layers
from medjax.models.base import MODELS

Dtype = Any


class ConvStack(nn.Module):
  """A small rank-generic CNN: per stage two 3^n ConvNormAct blocks, the first of every stage but the
  first with stride 2. `(B, *spatial, C) -> (pooled (B, features[-1]) float32, stages)`, where `stages`
  lists the stage outputs, highest resolution first (the last is at `2 ** (len(features) - 1)` stride;
  stride-2 convs with `k // 2` padding map n to ceil(n / 2), so no input is too small)."""
  features: Sequence[int] = (32, 64, 128)
  norm: str = "batch"
  act: str = "relu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    block = nn.remat(layers.ConvNormAct, static_argnums=(2,)) if self.remat else layers.ConvNormAct
    kw = dict(norm=self.norm, act=self.act, dtype=self.dtype, param_dtype=self.param_dtype)
    stages = []
    for i, f in enumerate(self.features):
      x = block(f, 3, 1 if i == 0 else 2, **kw, name=f"stage{i + 1}_conv0")(x, train)
      x = block(f, 3, 1, **kw, name=f"stage{i + 1}_conv1")(x, train)
      stages.append(x)
    return layers.global_avg_pool(x), stages


def freeze_kwargs(kwargs: Optional[Mapping[str, Any]]) -> Optional[FrozenDict]:
  """A config's `encoder_kwargs` dict as a FrozenDict, so the module stays hashable (jit static args)."""
  if kwargs is None or isinstance(kwargs, FrozenDict):
    return kwargs
  return FrozenDict(dict(kwargs))


def build_encoder(module: nn.Module, spatial_dims: int, *, name: str = "encoder") -> nn.Module:
  """The encoder of a CNN-LSTM / CNN-GNN `module` (call inside its compact method).

  `module.encoder == "conv"`: a `ConvStack(module.features, module.norm, ...)`. Otherwise the classifier
  registered under that name, built with `num_classes=1` (its head is unused: the wrapper reads
  `aux["features"]` / `aux["stages"]`), `spatial_dims`, `dtype`, `param_dtype`, `remat` and then
  `module.encoder_kwargs` (which may override any of them). Unknown names and keys raise the registry's
  errors, naming the wrapper.
  """
  if module.encoder == "conv":
    return ConvStack(module.features, module.norm, module.act, module.dtype, module.param_dtype, module.remat,
                     name=name)
  # The registry is complete only once every model file is imported; medjax.models imports them all (it
  # imports this file too, so it cannot be imported at the top).
  importlib.import_module("medjax.models")
  where = f"{type(module).__name__}.encoder_kwargs"
  cls = MODELS.get(module.encoder)
  kwargs = dict(num_classes=1, spatial_dims=spatial_dims, dtype=module.dtype, param_dtype=module.param_dtype,
                remat=module.remat)
  accepted = MODELS.accepted_kwargs(module.encoder)
  if accepted is not None:  # models without a remat / dtype field still work as encoders
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
  kwargs.update(module.encoder_kwargs or {})
  MODELS.check_kwargs(module.encoder, kwargs, where)
  return cls(**kwargs, name=name)


def encode(encoder: nn.Module, x, train: bool):
  """Runs `build_encoder`'s module: `(pooled (B, D) float32, stages list)` for either kind."""
  if isinstance(encoder, ConvStack):
    return encoder(x, train)
  _, aux = encoder(x, train=train)
  return aux["features"].astype(jnp.float32), list(aux.get("stages", []))


def _sequence_mask(lengths, batch: int, steps: int):
  """`(B,)` lengths (None: all `steps`) -> `(B, T)` bool mask of the valid prefix."""
  if lengths is None:
    return jnp.ones((batch, steps), bool)
  return jnp.arange(steps)[None, :] < jnp.asarray(lengths)[:, None]


@MODELS.register("cnn_lstm")
class CNNLSTM(nn.Module):
  """CNN-LSTM classifier: `(B, T, *frame, C)` -> `(logits, aux)`.

  Call: `model.apply(variables, x, train=..., lengths=None, mask=None)`. `lengths` `(B,)` int or `mask`
  `(B, T)` bool mark padded sequences: valid steps must be a prefix (padding at the end); padded steps do
  not change the outputs of valid ones (the reverse LSTM starts at each sequence's last valid step), are
  left out of the pooling and get zero per-step logits. Padded frames still pass through the encoder, so with
  norm="batch" in training they enter the batch statistics (use "group"/"instance" to avoid that).

  Fields:
    num_classes: classifier outputs.
    spatial_dims: axes between batch and channels, the sequence axis included: 3 for slices/frames
      `(B, T, y, x, C)` (default), 4 for a series of 3D volumes `(B, T, z, y, x, C)`.
    encoder: "conv" (`ConvStack` with `features`, `norm`, `act`) or a registered classifier name.
    encoder_kwargs: extra fields of a registered encoder, e.g. `dict(small_input=True, width=32)`.
    features / norm / act: the "conv" encoder's stage widths, norm kind and activation.
    embed_dim: if set, a Dense + activation projects each frame embedding to this width before the LSTM.
    hidden_size: LSTM width per direction; num_lstm_layers stacked (bi)LSTMs.
    bidirectional: forward and reverse LSTMs, outputs concatenated (`2 * hidden_size` wide).
    cell: "optimized_lstm" (`nn.OptimizedLSTMCell`, one fused matmul per step) or "lstm" (`nn.LSTMCell`);
      same parameters.
    pooling: "mean" over valid steps or "last" (forward state at the last valid step concatenated with the
      reverse state at step 0, i.e. each direction's final state) for per-sequence logits.
    per_step: per-step logits `(B, T, num_classes)` instead of per-sequence `(B, num_classes)`.
    dropout: rate on the frame embeddings, between LSTM layers and before the head ("dropout" rng stream).
    dtype / param_dtype: compute / parameter dtypes (LSTM carries stay float32); remat: rematerialise the
      encoder's blocks (passed to a registered encoder).

  aux: "slice_features" `(B, T, D)` float32 per-frame embeddings (after `embed_dim`), "sequence_features"
  `(B, T, H)` float32 LSTM outputs (zero at padded steps), "features" `(B, H)` float32 pooled sequence
  features (also in per_step mode), "mask" `(B, T)` bool valid steps, "stages" the encoder's stage outputs
  of all frames, `(B * T, *frame', C')` each.
  """
  num_classes: int
  spatial_dims: int = 3
  encoder: str = "conv"
  encoder_kwargs: Optional[Mapping[str, Any]] = None
  features: Sequence[int] = (32, 64, 128)
  norm: str = "batch"
  act: str = "relu"
  embed_dim: Optional[int] = None
  hidden_size: int = 128
  num_lstm_layers: int = 1
  bidirectional: bool = True
  cell: str = "optimized_lstm"
  pooling: str = "mean"
  per_step: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "encoder_kwargs", freeze_kwargs(self.encoder_kwargs))
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool, lengths=None, mask=None):
    name = type(self).__name__
    if self.spatial_dims < 2:
      raise ValueError(f"{name}: spatial_dims={self.spatial_dims} must count the sequence axis and at least "
                       f"one frame axis (3 for 2D frames).")
    if x.ndim != self.spatial_dims + 2:
      axes = {3: "(B, T, y, x, C)", 4: "(B, T, z, y, x, C)"}.get(self.spatial_dims, "(B, T, *frame, C)")
      raise ValueError(f"{name}(spatial_dims={self.spatial_dims}) expects input {axes} (a sequence of "
                       f"{self.spatial_dims - 1}D frames, channels-last), got shape {tuple(x.shape)}.")
    if self.pooling not in ("mean", "last"):
      raise ValueError(f"{name}: pooling={self.pooling!r} must be 'mean' or 'last'.")
    cells = {"optimized_lstm": nn.OptimizedLSTMCell, "lstm": nn.LSTMCell}
    if self.cell not in cells:
      raise ValueError(f"{name}: cell={self.cell!r} must be one of {', '.join(map(repr, cells))}.")
    if lengths is not None and mask is not None:
      raise ValueError(f"{name}: pass either lengths or mask, not both.")
    b, t = x.shape[:2]
    if mask is not None:
      if tuple(mask.shape) != (b, t):
        raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, expected (B, T) = {(b, t)}.")
      lengths = jnp.sum(jnp.asarray(mask, jnp.int32), axis=1)
    elif lengths is not None and tuple(jnp.shape(lengths)) != (b,):
      raise ValueError(f"{name}: lengths has shape {tuple(jnp.shape(lengths))}, expected (B,) = {(b,)}.")
    if lengths is not None:
      lengths = jnp.asarray(lengths, jnp.int32)
    valid = _sequence_mask(lengths, b, t)

    # Every frame of every sequence as one batch: shared weights, large convolutions.
    frames = x.reshape(b * t, *x.shape[2:]).astype(self.dtype)
    pooled, stages = encode(build_encoder(self, self.spatial_dims - 1), frames, train)
    h = pooled.reshape(b, t, -1)
    if self.embed_dim is not None:
      h = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(h)
      h = layers.activation(self.act)(h).astype(jnp.float32)
    slice_features = h
    h = nn.Dropout(self.dropout, deterministic=not train)(h.astype(self.dtype))

    cell_cls = cells[self.cell]
    final_fwd = final_bwd = None
    for i in range(self.num_lstm_layers):
      if i > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
      cell = dict(features=self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
      # The cells carry the names: they own the parameters (nn.RNN only scans them).
      fwd = nn.RNN(cell_cls(**cell, name=f"lstm{i}_fwd"))(h, seq_lengths=lengths)
      outs = [fwd]
      if self.bidirectional:
        # keep_order: outputs come back in input order; with seq_lengths only the valid prefix is reversed.
        bwd = nn.RNN(cell_cls(**cell, name=f"lstm{i}_bwd"), reverse=True, keep_order=True)(
          h, seq_lengths=lengths)
        outs.append(bwd)
      h = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else fwd
      # Zero the padded steps so nothing downstream (next layer, pooling, per-step head) sees them.
      h = jnp.where(valid[..., None], h, 0).astype(self.dtype)
      final_fwd, final_bwd = fwd, outs[-1] if self.bidirectional else None
    sequence_features = h.astype(jnp.float32)

    if self.pooling == "mean":
      count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(jnp.float32)
      features = jnp.sum(sequence_features, axis=1) / count
    else:
      last = (jnp.full((b,), t, jnp.int32) if lengths is None else lengths) - 1
      last = jnp.clip(last, 0, t - 1)
      features = jnp.take_along_axis(final_fwd.astype(jnp.float32), last[:, None, None], axis=1)[:, 0]
      if self.bidirectional:
        features = jnp.concatenate([features, final_bwd[:, 0].astype(jnp.float32)], axis=-1)

    head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")
    if self.per_step:
      y = nn.Dropout(self.dropout, deterministic=not train)(h)
      logits = jnp.where(valid[..., None], head(y).astype(jnp.float32), 0.0)
    else:
      y = nn.Dropout(self.dropout, deterministic=not train)(features.astype(self.dtype))
      logits = head(y).astype(jnp.float32)
    aux = {"slice_features": slice_features, "sequence_features": sequence_features, "features": features,
           "mask": valid, "stages": stages}
    return logits, aux
