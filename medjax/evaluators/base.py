"""Evaluator registry, the evaluation loop, and the input checks every evaluator shares.

An evaluator has three methods:

  stats_fn(outputs, aux, batch) -> dict of (B, ...) arrays   jittable, runs on device inside the eval step
  summarize(stats) -> {name: float}                          host, over the whole split; cheap (every validation)
  report(stats, ids, metadata=None) -> dict                  host, once: CIs, per-case table, subgroups, curves

`stats` is the dict of `stats_fn` outputs concatenated over the split with padding examples dropped
(`collect`), so every example counts exactly once whatever the batch size and device count.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax.registry import Registry
from medjax.typing import Array, Batch, Metrics

EVALUATORS = Registry("evaluator")

# Per-example counters of bad input, computed on device by `input_checks` and turned into errors on host.
NONFINITE_KEY, OUT_OF_RANGE_KEY = "num_nonfinite_outputs", "num_labels_out_of_range"


def _gather_to_host(tree):
  """Global (possibly multi-host) arrays -> numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def collect(eval_fn: Callable[[Batch], Dict[str, jax.Array]], batches: Iterable[Batch]) -> Dict[str, np.ndarray]:
  """Runs `eval_fn` over `batches` and returns its outputs concatenated over the split, padding dropped.

  Args:
    eval_fn: batch -> dict of per-example device arrays (B, ...).
    batches: global batches, each with a "weight" (B,) array that is 0 for padding examples.
  Returns: {key: (N, ...) numpy array} in batch order.
  """
  pending = []
  for batch in batches:
    # Dispatch all batches before fetching anything so the device never waits for the host.
    pending.append((eval_fn(batch), batch["weight"]))
  if not pending:
    raise ValueError("evaluate: the split has no examples.")
  host = _gather_to_host(pending)
  keep = np.concatenate([np.asarray(weight) > 0 for _, weight in host])
  return {key: np.concatenate([np.asarray(s[key]) for s, _ in host])[keep] for key in host[0][0]}


def evaluate(evaluator, eval_fn: Callable[[Batch], Dict[str, jax.Array]], batches: Iterable[Batch]) -> Metrics:
  """Runs `eval_fn` (compiled forward + `evaluator.stats_fn`) over `batches` and summarises.

  Returns: metrics without split prefix, e.g. {"dice_mean": 0.9, "dice/organ": 0.93}.
  """
  return evaluator.summarize(collect(eval_fn, batches))


# ------------------------------------------------------------------------------------------ input checks


def input_checks(outputs: Array, labels: Optional[Array], num_classes: Optional[int]) -> Dict[str, Array]:
  """Per-example counts of non-finite outputs and of labels outside [0, num_classes) (jittable).

  Computed on device so a bad case is reported by index without moving its arrays to the host.
  Returns {NONFINITE_KEY: (B,) int32[, OUT_OF_RANGE_KEY: (B,) int32]}.
  """
  per_example = lambda x: jnp.sum(x.reshape(x.shape[0], -1), axis=1, dtype=jnp.int32)
  checks = {NONFINITE_KEY: per_example(~jnp.isfinite(outputs))}
  if labels is not None and num_classes is not None:
    checks[OUT_OF_RANGE_KEY] = per_example((labels < 0) | (labels >= num_classes))
  return checks


def _first_cases(mask: np.ndarray, ids: Optional[Sequence] = None, limit: int = 5) -> str:
  positions = np.flatnonzero(mask)[:limit]
  names = [f"id {ids[p]}" if ids is not None else f"#{p}" for p in positions]
  more = f" and {int(mask.sum()) - len(positions)} more" if mask.sum() > limit else ""
  return ", ".join(names) + more


def raise_on_bad_input(stats: Dict[str, np.ndarray], what: str, num_classes: Optional[int],
                       ids: Optional[Sequence] = None) -> None:
  """Raises ValueError naming the cases (split positions, or ids) with non-finite outputs or bad labels."""
  if NONFINITE_KEY in stats and np.any(stats[NONFINITE_KEY] > 0):
    bad = np.asarray(stats[NONFINITE_KEY]) > 0
    raise ValueError(f"{what}: the model produced NaN/inf outputs for {int(bad.sum())} of {len(bad)} cases "
                     f"({_first_cases(bad, ids)}); metrics would be meaningless.")
  if OUT_OF_RANGE_KEY in stats and np.any(stats[OUT_OF_RANGE_KEY] > 0):
    bad = np.asarray(stats[OUT_OF_RANGE_KEY]) > 0
    raise ValueError(f"{what}: {int(bad.sum())} of {len(bad)} cases have labels outside [0, {num_classes}) "
                     f"({_first_cases(bad, ids)}).")


def check_shapes(outputs_shape: Sequence[int], labels_shape: Sequence[int], expected: str, what: str,
                 ok: bool) -> None:
  """Raises ValueError when outputs and labels do not fit together (checked at trace time on device)."""
  if not ok:
    raise ValueError(f"{what}: outputs of shape {tuple(outputs_shape)} do not fit labels of shape "
                     f"{tuple(labels_shape)}; expected {expected}.")
