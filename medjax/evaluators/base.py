"""Evaluator registry and the evaluation loop."""

from __future__ import annotations

from typing import Callable, Dict, Iterable

import jax
import numpy as np

from medjax.registry import Registry
from medjax.typing import Batch, Metrics

EVALUATORS = Registry("evaluator")


def _gather_to_host(tree):
  """Global (possibly multi-host) arrays -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def evaluate(evaluator, eval_fn: Callable[[Batch], Dict[str, jax.Array]], batches: Iterable[Batch]) -> Metrics:
  """Runs `eval_fn` (compiled forward + `evaluator.stats_fn`) over `batches` and summarises.

  Args:
    evaluator: object with `summarize(stats: dict of (N, ...) arrays) -> Metrics`.
    eval_fn: batch -> dict of per-example device arrays (B, ...).
    batches: global batches, each with a "weight" (B,) array that is 0 for padding examples.
  Returns: metrics without split prefix, e.g. {"dice_mean": 0.9, "dice/organ": 0.93}.
  """
  pending = []
  for batch in batches:
    # Dispatch all batches before fetching anything so the device never waits for the host.
    pending.append((eval_fn(batch), batch["weight"]))
  if not pending:
    raise ValueError("evaluate: the split has no examples.")
  host = _gather_to_host(pending)
  keep = np.concatenate([np.asarray(weight) > 0 for _, weight in host])
  stats = {key: np.concatenate([np.asarray(s[key]) for s, _ in host])[keep] for key in host[0][0]}
  return evaluator.summarize(stats)
