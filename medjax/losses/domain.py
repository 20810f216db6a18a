"""The domain-adversarial objective (DANN; Ganin et al. 2016, JMLR 17(59)): task loss plus the domain
classifier's cross-entropy, per example, for a model wrapped in `medjax.models.domain_adversarial.
DomainAdversarial` (which puts aux["domain_logits"] behind a gradient reversal layer, so the one minimised sum
trains the domain head and, reversed, the encoder against it).

Domain ids come from the batch (`batch["site"]` by default, int (B,), 0..K-1). Out-of-range ids cannot raise
inside a compiled step without checkify, so they are caught twice: on the host, when the ids are concrete
(eager calls, data checks: `check_domain_ids`), and inside `jax.jit` by making the example's loss NaN, which
the train step reports as a non-finite step (skipped, and the loop stops naming the step) instead of silently
training on a clipped id.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.losses.objective import Objective
from medjax.typing import Array, Batch

DOMAIN_LOGITS = "domain_logits"

__all__ = ["DOMAIN_LOGITS", "check_domain_ids", "domain_accuracy", "domain_adversarial_objective",
           "domain_cross_entropy"]


def check_domain_ids(ids: Any, num_domains: int, domain_key: str = "site") -> None:
  """Host check: every id of `ids` (int array, any shape) lies in 0..num_domains-1. Raises ValueError naming
  `domain_key` and the offending values."""
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"batch[{domain_key!r}]: domain ids must be integers, got dtype {ids.dtype}.")
  bad = (ids < 0) | (ids >= num_domains)
  if np.any(bad):
    raise ValueError(f"batch[{domain_key!r}]: domain ids must lie in 0..{num_domains - 1} (num_domains="
                     f"{num_domains}); got {sorted(set(ids[bad].tolist()))[:10]} in {int(bad.sum())} examples.")


def _domain_ids(aux: Mapping[str, Any], batch: Batch, domain_key: str, num_domains: int):
  """(logits (B, K) float32, ids (B,) int32) with the shape checks every caller needs."""
  if DOMAIN_LOGITS not in aux:
    raise KeyError(f"aux has no {DOMAIN_LOGITS!r}: the domain-adversarial objective needs a model wrapped in "
                   f"DomainAdversarial (aux keys: {sorted(aux)}).")
  if domain_key not in batch:
    raise KeyError(f"batch has no {domain_key!r} (the domain ids of the domain-adversarial objective); batch "
                   f"keys: {sorted(batch)}. Use a site-aware dataset or set domain_key.")
  logits = jnp.asarray(aux[DOMAIN_LOGITS], jnp.float32)
  ids = batch[domain_key]
  if logits.ndim != 2 or logits.shape[-1] != num_domains:
    raise ValueError(f"aux[{DOMAIN_LOGITS!r}] must be (B, {num_domains}) for num_domains={num_domains}, got "
                     f"{tuple(logits.shape)}.")
  if tuple(ids.shape) != (logits.shape[0],):
    raise ValueError(f"batch[{domain_key!r}] must be ({logits.shape[0]},) domain ids, one per example, got shape "
                     f"{tuple(ids.shape)}.")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"batch[{domain_key!r}]: domain ids must be integers, got dtype {ids.dtype}.")
  if not isinstance(ids, jax.core.Tracer):
    check_domain_ids(ids, num_domains, domain_key)
  return logits, jnp.asarray(ids, jnp.int32)


def domain_cross_entropy(aux: Mapping[str, Any], batch: Batch, *, domain_key: str = "site",
                         num_domains: int) -> Array:
  """Cross-entropy (nats) of aux["domain_logits"] (B, K) against batch[domain_key] (B,), per example (B,)
  float32; NaN for an id outside 0..K-1 under `jax.jit` (a ValueError when the ids are concrete)."""
  logits, ids = _domain_ids(aux, batch, domain_key, num_domains)
  valid = (ids >= 0) & (ids < num_domains)
  # The clipped id keeps the selected branch finite, so the gradient of valid examples is untouched.
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.clip(ids, 0, num_domains - 1))
  return jnp.where(valid, xent, jnp.nan).astype(jnp.float32)


def domain_adversarial_objective(task_objective: Objective, *, weight: float = 1.0, domain_key: str = "site",
                                 num_domains: int) -> Objective:
  """`objective(outputs, aux, batch) -> (B,)`: task_objective(outputs, aux, batch) + weight * domain
  cross-entropy (nats) of aux["domain_logits"] against batch[domain_key], per example, float32.

  The reversal coefficient (its schedule) lives in the model; `weight` scales the domain term for the head and
  the encoder alike. Raises KeyError naming `domain_key` or "domain_logits" when the batch or aux lacks it,
  ValueError for wrong shapes or (concrete) out-of-range ids; see the module docstring for traced ids.
  """
  if num_domains < 2:
    raise ValueError(f"domain_adversarial_objective: num_domains must be at least 2, got {num_domains}.")
  if not weight >= 0.0:
    raise ValueError(f"domain_adversarial_objective: weight must be >= 0, got {weight}.")

  def objective(outputs: Any, aux: Mapping[str, Any], batch: Batch) -> Array:
    domain = domain_cross_entropy(aux, batch, domain_key=domain_key, num_domains=num_domains)
    task = jnp.asarray(task_objective(outputs, aux, batch), jnp.float32)
    return task + jnp.float32(weight) * domain

  return objective


def domain_accuracy(aux: Mapping[str, Any], batch: Batch, domain_key: str = "site") -> Array:
  """1.0 where argmax of aux["domain_logits"] (B, K) equals batch[domain_key] (B,), else 0.0; (B,) float32.
  On features that carry no domain information the best an adversary can do is the share of the most frequent
  domain (chance)."""
  logits = aux.get(DOMAIN_LOGITS) if isinstance(aux, Mapping) else None
  if logits is None:
    raise KeyError(f"aux has no {DOMAIN_LOGITS!r}: domain accuracy needs a model wrapped in DomainAdversarial.")
  logits, ids = _domain_ids(aux, batch, domain_key, logits.shape[-1])
  return (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)
