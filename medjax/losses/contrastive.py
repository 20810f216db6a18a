"""Contrastive and self-distillation losses for self-supervised pretraining: NT-Xent (SimCLR), InfoNCE
against momentum keys (MoCo v3) and BYOL's normalised regression.

NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations", eq. 1): the
2B embeddings of two views of B examples are L2-normalised; each one's positive is the other view of its example
and its negatives are the other 2B - 2 embeddings of the batch:

    l(i) = -log( exp(s(i, p(i)) / t) / sum_{k != i} exp(s(i, k) / t) ),   s = cosine similarity.

The batch is the global one: under `jax.jit` with the embeddings sharded over the mesh's data axis, the (2B, 2B)
similarity matrix takes every device's embeddings as negatives (XLA gathers them), so the value does not depend on
the number of devices (tests/losses/test_contrastive.py: 1 and 8 devices agree). `info_nce` is global the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalise(z: jax.Array) -> jax.Array:
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))


def _check_pair(name: str, a: jax.Array, b: jax.Array) -> None:
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"{name}: both inputs must be (B, D) of the same shape, got {a.shape} and {b.shape}")


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1) -> jax.Array:
  """Per-example NT-Xent `(B,)` float32: the mean of the example's two terms l(b) and l(b + B) (module docstring).

  z1, z2: `(B, D)` embeddings (projection-head outputs) of the first and second view, in any float dtype.
  temperature: t > 0 (SimCLR: 0.1 to 0.5; its batch-4096 default 0.1).
  The mean over the batch is the paper's loss L = 1 / 2B sum_i l(i).
  """
  _check_pair("nt_xent", z1, z2)
  if z1.shape[0] < 2:
    raise ValueError(f"nt_xent: a batch of {z1.shape[0]} has no negatives; it needs at least 2 examples")
  if not temperature > 0:
    raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
  batch = z1.shape[0]
  z = _normalise(jnp.concatenate([z1, z2]))
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)  # k != i
  positive = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
  terms = jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(2 * batch), positive]
  return 0.5 * (terms[:batch] + terms[batch:])


def info_nce(queries: jax.Array, keys: jax.Array, *, temperature: float = 0.2) -> jax.Array:
  """Per-example InfoNCE `(B,)` float32 of MoCo v3 (Chen, Xie and He 2021, "An Empirical Study of Training
  Self-Supervised Vision Transformers", Algorithm 1): query b's positive is key b, its negatives the other B - 1
  keys of the global batch; cross-entropy of the cosine similarities / t, times 2t as the paper scales it.

  queries: `(B, D)` online predictions of one view; keys: `(B, D)` momentum-encoder projections of the other
  view (treated as constants: no gradient flows into them).
  """
  _check_pair("info_nce", queries, keys)
  if not temperature > 0:
    raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
  logits = (_normalise(queries) @ _normalise(jax.lax.stop_gradient(keys)).T) / temperature
  index = jnp.arange(queries.shape[0])
  return 2.0 * temperature * (jax.nn.logsumexp(logits, axis=1) - logits[index, index])


def byol_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example BYOL regression `(B,)` float32 (Grill et al. 2020, "Bootstrap Your Own Latent", eq. 2):
  ||p/|p| - t/|t|||^2 = 2 - 2 cos(p, t), with the target-network projections `targets` as constants.

  predictions: `(B, D)` online predictor outputs of one view; targets: `(B, D)` of the other view.
  """
  _check_pair("byol_loss", predictions, targets)
  cosine = jnp.sum(_normalise(predictions) * _normalise(jax.lax.stop_gradient(targets)), axis=-1)
  return 2.0 - 2.0 * cosine
