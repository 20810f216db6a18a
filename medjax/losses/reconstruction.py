"""Reconstruction losses for self-supervised pretraining (issue 21): masked-patch regression and restoration.

masked_patch_loss: MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", CVPR) and SimMIM (Xie
et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling", CVPR) regress the pixels of the masked patches
only. Patches are rows of `medjax.pretext.masking.patchify`, `(B, N, P)` with P = prod(patch) * C:

    loss(b) = sum_n m(b, n) * mean_p (pred(b, n, p) - target(b, n, p))^2  /  sum_n m(b, n).

With `norm_pix` (MAE's `norm_pix_loss`, its default for the best representations) each target patch is first
standardised by its own mean and biased variance: (t - mean) / sqrt(var + eps). MAE averages over all masked patches
of the batch; the mean of these per-example values is the same number when every example masks the same number of
patches (as `medjax.pretext.masking.random_patch_mask` does). The predictions of visible patches never enter the
value (they are selected away, not multiplied by 0), so it is unchanged bit for bit whatever they are, and their
gradient is exactly 0.

restoration_loss: Models Genesis (Zhou et al. 2019, "Models Genesis: Generic Autodidactic Models for 3D Medical
Image Analysis", MICCAI) restores the original image from a corrupted one with an image-to-image network and an
L2 loss over every voxel; "l1" is its robust variant.

Both return one float32 value per example `(B,)` whatever the input dtype; under `jax.jit` with the batch sharded
over the mesh's data axis the values do not depend on the number of devices (tests/losses/test_reconstruction.py).
They are not `(logits, labels)` losses, so they are not in the registry; the self-supervised objectives call them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.typing import Array

RESTORATION_KINDS = ("mse", "l1")


def masked_patch_loss(pred: Array, target: Array, mask: Array, *, norm_pix: bool = False,
                      eps: float = 1e-6) -> jax.Array:
  """Per-example mean squared error over the masked patches, `(B,)` float32 (module docstring).

  pred, target: `(B, N, P)` patch rows (N patches of P = prod(patch) * C values), any float dtype.
  mask: `(B, N)` bool or 0/1, True / 1 = masked (the patches whose error counts).
  norm_pix: standardise each target patch by its own mean and biased variance first (MAE's norm_pix_loss).
  eps: added to the variance under the square root with `norm_pix`.
  An example with no masked patch gets 0 (no NaN, zero gradient).
  """
  pred, target, mask = jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)
  if pred.ndim != 3 or pred.shape != target.shape or mask.shape != pred.shape[:2]:
    raise ValueError(f"masked_patch_loss: pred and target must both be (B, N, P) and mask (B, N), got pred "
                     f"{pred.shape}, target {target.shape} and mask {mask.shape}.")
  pred, target, mask = pred.astype(jnp.float32), target.astype(jnp.float32), mask.astype(bool)
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + eps)
  # Select, not multiply: a visible patch's prediction (even inf or NaN) never reaches the sum or the gradient.
  error = jnp.where(mask[..., None], pred - target, 0.0)
  per_patch = jnp.mean(jnp.square(error), axis=-1)
  count = jnp.sum(mask, axis=1, dtype=jnp.float32)
  return jnp.sum(per_patch, axis=1) / jnp.maximum(count, 1.0)


def restoration_loss(pred: Array, target: Array, *, kind: str = "mse") -> jax.Array:
  """Per-example restoration error over all voxels and channels, `(B,)` float32 (Models Genesis).

  pred, target: `(B, *spatial, C)` images (the restored and the original), any float dtype.
  kind: "mse" (mean squared error, Models Genesis' loss) or "l1" (mean absolute error).
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if kind not in RESTORATION_KINDS:
    raise ValueError(f"restoration_loss: kind must be one of {RESTORATION_KINDS}, got {kind!r}.")
  if pred.ndim < 2 or pred.shape != target.shape:
    raise ValueError(f"restoration_loss: pred and target must have the same (B, *spatial, C) shape, got "
                     f"{pred.shape} and {target.shape}.")
  residual = pred.astype(jnp.float32) - target.astype(jnp.float32)
  values = jnp.square(residual) if kind == "mse" else jnp.abs(residual)
  return jnp.mean(values, axis=tuple(range(1, values.ndim)))
