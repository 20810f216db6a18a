"""Pretext models: a registered encoder (any medjax model) wrapped with the heads and the on-device views or
corruptions of one self-supervised task, so that pretraining runs through the ordinary train step.

Every wrapper keeps the encoder as its submodule `encoder` (`ENCODER`), so the pretrained encoder is the
`params/encoder/...` subtree of the run's variables (`encoder_variables`), in the encoder's own names: a
downstream run of the same model loads it with `config.init_from` (medjax.checkpoint.init_from takes the
subtree when the source run was a pretext run).

The random views, rotations, corruptions and masks are drawn inside the forward pass from the "dropout" key
stream, which the train step derives as `fold_in(state.rng, step)`: they are a deterministic function of
(seed, step), so a resumed run draws the same ones. Evaluation (`train=False`) uses a fixed key, so the
validation pretext loss compares the same views at every evaluation.

Contracts with the encoder (checked with a message naming the model when they fail):
  contrastive, rotation: `aux["features"]`, pooled features `(B, F)` (every classification model), or an
    `aux["bottleneck"]` map, averaged over space (U-Net, UNETR, Swin UNETR: their encoder alone is trained);
  restoration: `aux["features"]`, a dense map `(B, *spatial, F)` at the input's resolution (U-Net, UNETR, Swin
    UNETR, TransUNet);
  masked image modelling: a dense map as restoration, or, for a plain ViT, `aux["tokens"]` with one token per
    mask patch (a class token is dropped).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.base import pooled_features, submodule_variables
from medjax.pretext import corruptions, masking

ENCODER = "encoder"
MOMENTUM = "momentum"  # the collection holding the target network of BYOL / MoCo
Dtype = Any
Views = Callable[[jax.Array, jax.Array], jax.Array]  # views(key, images (B, *spatial, C)) -> images


def view_key(module: nn.Module, train: bool) -> jax.Array:
  """The key of this forward pass's random views: the step's "dropout" stream in training, a fixed key in
  evaluation (and at initialisation)."""
  return module.make_rng("dropout") if train else jax.random.PRNGKey(0)


def encoder_variables(variables: Dict[str, Any]) -> Dict[str, Any]:
  """The encoder's own variables `{"params": ..., "batch_stats": ...}` out of a pretext model's variables."""
  return submodule_variables(variables, ENCODER, skip=MOMENTUM, what="pretext encoder")


def _dense_features(aux: Dict[str, Any], encoder: nn.Module, spatial: Tuple[int, ...]) -> jax.Array:
  features = aux.get("features")
  if features is None or tuple(features.shape[1:-1]) != tuple(spatial):
    raise ValueError(f"{type(encoder).__name__}: this pretext task needs a dense aux['features'] map (B, "
                     f"*{spatial}, F) at the input's resolution (a U-Net, UNETR or Swin UNETR); got "
                     f"{None if features is None else features.shape}.")
  return features


class MLP(nn.Module):
  """Projection or prediction head: (Dense -> BatchNorm -> ReLU) x (num_layers - 1) -> Dense,
  `(N, F) -> (N, out_dim)` (SimCLR's projector; BYOL's projector and predictor)."""
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"dense{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name=f"norm{i}")(x)
      x = nn.relu(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, name=f"dense{self.num_layers - 1}")(x)


class Contrastive(nn.Module):
  """Two random views per image through one encoder and a projector: SimCLR (Chen et al. 2020), and with
  `momentum` a target network updated as an exponential moving average of the online one plus a predictor
  (BYOL, Grill et al. 2020; MoCo v3, Chen, Xie and He 2021).

  `(B, *spatial, C)` -> (embeddings `(B, 2, D)` float32 of views 1 and 2: the projections, or with a predictor
  its outputs; aux). aux: "features" `(B, 2, F)` encoder features; with `momentum`, "targets" `(B, 2, D)` the
  target network's projections (no gradient).

  The views are interleaved (view 1 and 2 of an example next to each other) before the encoder, so the
  encoder's batch of 2B stays split over the devices as the images were; batch norm sees the whole global
  batch of views under `jax.jit`.

  The target network lives in the "momentum" collection (encoder and projector parameters). Each training
  forward pass first moves it towards the online parameters, t <- t + (1 - momentum)(o - t), then computes the
  targets with it: MoCo's order; BYOL updates after the optimizer step, i.e. the same sequence shifted by one
  step. Under gradient accumulation the update happens once per micro-batch.
  """
  encoder: nn.Module
  views: Views
  projection_dim: int = 128
  hidden_dim: int = 512
  projector_layers: int = 2
  momentum: Optional[float] = None
  predictor_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    batch = x.shape[0]
    key1, key2 = jax.random.split(view_key(self, train))
    views = jnp.stack([self.views(key1, x), self.views(key2, x)], axis=1)
    views = views.reshape((2 * batch,) + x.shape[1:])
    _, aux = self.encoder(views, train=train)
    features = pooled_features(aux, f"{type(self).__name__} over {type(self.encoder).__name__}")
    projector = MLP(self.hidden_dim, self.projection_dim, self.projector_layers, self.dtype, name="projector")
    z = projector(features, train)
    out_aux = {"features": features.reshape(batch, 2, -1)}
    if self.predictor_dim:
      z = MLP(self.predictor_dim, self.projection_dim, 2, self.dtype, name="predictor")(z, train)
    if self.momentum is not None:
      targets = self._targets(views, projector, train)
      out_aux["targets"] = targets.reshape(batch, 2, -1)
    return z.astype(jnp.float32).reshape(batch, 2, -1), out_aux

  def _targets(self, views, projector: nn.Module, train: bool):
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"Contrastive: momentum must be in [0, 1), got {self.momentum}.")
    params = self.variables["params"]
    online = {"encoder": params[ENCODER], "projector": params["projector"]}
    target = self.variable(MOMENTUM, "params", lambda: jax.tree.map(jnp.copy, online))
    if train and not self.is_initializing():
      keep = jnp.float32(self.momentum)
      target.value = jax.tree.map(lambda t, o: t + (1.0 - keep) * (jax.lax.stop_gradient(o) - t),
                                  target.value, online)
    weights = jax.lax.stop_gradient(target.value)
    stats = self.variables.get("batch_stats", {})

    def run(module, name, x):
      # The target network normalises with the current batch's statistics in training, as the online one does;
      # the running statistics it would update are the online network's and are discarded.
      variables = {"params": weights[name], **({"batch_stats": stats[name]} if name in stats else {})}
      out, _ = module.clone(parent=None).apply(variables, x, train=train, mutable=["batch_stats"])
      return out

    _, target_aux = run(self.encoder, "encoder", views)
    target_features = pooled_features(target_aux, f"{type(self).__name__} over {type(self.encoder).__name__}")
    return jax.lax.stop_gradient(run(projector, "projector", target_features)).astype(jnp.float32)


class BYOL(Contrastive):
  """`Contrastive` with BYOL's defaults: a momentum target network (0.99: BYOL's 0.996 is for 10^5 steps; short
  runs need a faster target) and a 2-layer predictor."""
  momentum: Optional[float] = 0.99
  predictor_dim: int = 512


class MoCo(BYOL):
  """`Contrastive` with MoCo v3's structure (momentum keys, a predictor on the queries); its loss, InfoNCE
  against the other view's keys of the global batch, is the objective's."""


class RotationPrediction(nn.Module):
  """Each image rotated by a random multiple of 90 degrees (2D: 4 classes; 3D: 10, about each axis), and a
  linear head on the encoder's pooled features predicts which (Gidaris et al. 2018; Taleb et al. 2020).

  `(B, *spatial, C)` -> (logits `(B, K)` float32, aux: "rotation" `(B,)` int32 the drawn classes).
  Rotated planes must be square.
  """
  encoder: nn.Module
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    rotated, classes = corruptions.random_rotations(view_key(self, train), x)
    _, aux = self.encoder(rotated, train=train)
    features = pooled_features(aux, f"{type(self).__name__} over {type(self.encoder).__name__}")
    logits = nn.Dense(corruptions.num_rotation_classes(x.ndim - 2), dtype=self.dtype,
                      name="rotation_head")(features.astype(self.dtype))
    return logits.astype(jnp.float32), {"rotation": classes}


class Restoration(nn.Module):
  """Models Genesis (Zhou et al. 2021): the encoder-decoder restores the image from a corrupted copy; a 1x1
  convolution on its last decoder map outputs the image's channels.

  `(B, *spatial, C)` -> (restored `(B, *spatial, C)` float32, aux: "corrupted" the input the model saw).
  """
  encoder: nn.Module
  corrupt: Callable[[jax.Array, jax.Array], jax.Array]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    corrupted = self.corrupt(view_key(self, train), x)
    _, aux = self.encoder(corrupted, train=train)
    features = _dense_features(aux, self.encoder, x.shape[1:-1])
    restored = nn.Conv(x.shape[-1], (1,) * (x.ndim - 2), dtype=self.dtype, name="restoration_head")(features)
    return restored.astype(jnp.float32), {"corrupted": corrupted}


class MaskedImageModel(nn.Module):
  """Masked image modelling: a random `mask_ratio` of the N-D patches of each image (exactly that many per
  image) is replaced by a learned patch of pixels, and the model predicts the pixels of every patch; the
  loss (medjax.losses.masked_patch_loss) counts the masked ones only.

  As SimMIM (Xie et al. 2022) and MAE (He et al. 2022) with one difference from MAE: the encoder sees every
  position, masked ones carrying the learned patch (for a ViT, whose patch embedding is linear, the same as a
  learned mask token), instead of dropping them; that is what works for convolutional and windowed (Swin)
  encoders, at the cost of MAE's speed-up. Decoder: the encoder's own (UNETR, Swin UNETR, U-Net) with a 1x1
  convolution to the image's channels, or for a plain ViT a linear layer from each token to its patch.

  `(B, *spatial, C)` -> (predicted patches `(B, N, prod(patch_size) * C)` float32, aux: "mask" `(B, N)` bool
  (True = masked), "target" `(B, N, prod(patch_size) * C)` the image's patches, "masked_image").
  """
  encoder: nn.Module
  patch_size: Any = 16
  mask_ratio: float = 0.75
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    patches = masking.patchify(x, self.patch_size)
    batch, num_patches, patch_dim = patches.shape
    mask = masking.random_patch_mask(view_key(self, train), batch, num_patches, self.mask_ratio)
    fill = self.param("mask_patch", nn.initializers.zeros, (patch_dim,), jnp.float32)
    masked = masking.apply_mask(x, mask, self.patch_size, fill.astype(x.dtype))
    _, aux = self.encoder(masked, train=train)
    features = aux.get("features")
    if features is not None and features.ndim == x.ndim:
      dense = _dense_features(aux, self.encoder, x.shape[1:-1])
      image = nn.Conv(x.shape[-1], (1,) * (x.ndim - 2), dtype=self.dtype, name="reconstruction_head")(dense)
      predicted = masking.patchify(image, self.patch_size)
    else:
      tokens = aux.get("tokens")
      if tokens is not None and tokens.shape[1] == num_patches + 1:
        tokens = tokens[:, 1:]  # the class token
      if tokens is None or tokens.shape[1] != num_patches:
        raise ValueError(f"{type(self.encoder).__name__}: masked image modelling needs a dense aux['features'] "
                         f"map or one aux['tokens'] entry per mask patch ({num_patches} patches of "
                         f"{self.patch_size}); got tokens {None if tokens is None else tokens.shape}. Use the "
                         f"encoder's patch size as pretext patch_size.")
      predicted = nn.Dense(patch_dim, dtype=self.dtype, name="reconstruction_head")(tokens)
    return predicted.astype(jnp.float32), {"mask": mask, "target": patches, "masked_image": masked}
