"""Contrastive losses for self-supervised pretraining (issue 21, first part): NT-Xent.

NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations", eq. 1): the
2B embeddings of two views of B examples are L2-normalised; each one's positive is the other view of its example
and its negatives are the other 2B - 2 embeddings of the batch:

    l(i) = -log( exp(s(i, p(i)) / t) / sum_{k != i} exp(s(i, k) / t) ),   s = cosine similarity.

The batch is the global one: under `jax.jit` with the embeddings sharded over the mesh's data axis, the (2B, 2B)
similarity matrix takes every device's embeddings as negatives (XLA gathers them), so the value does not depend on
the number of devices (tests/losses/test_contrastive.py: 1 and 8 devices agree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1) -> jax.Array:
  """Per-example NT-Xent `(B,)` float32: the mean of the example's two terms l(b) and l(b + B) (module docstring).

  z1, z2: `(B, D)` embeddings (projection-head outputs) of the first and second view, in any float dtype.
  temperature: t > 0 (SimCLR: 0.1 to 0.5; its batch-4096 default 0.1).
  The mean over the batch is the paper's loss L = 1 / 2B sum_i l(i).
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"nt_xent: z1 and z2 must both be (B, D), got {z1.shape} and {z2.shape}")
  if z1.shape[0] < 2:
    raise ValueError(f"nt_xent: a batch of {z1.shape[0]} has no negatives; it needs at least 2 examples")
  if not temperature > 0:
    raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
  batch = z1.shape[0]
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-12))
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)  # k != i
  positive = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
  terms = jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(2 * batch), positive]
  return 0.5 * (terms[:batch] + terms[batch:])
