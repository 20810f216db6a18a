"""Metrics saved with a checkpoint, and ranking steps by one of them ("best" checkpoints)."""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
from orbax.checkpoint import checkpoint_managers as ocm


def to_json_value(value: Any) -> Any:
  """Makes a metric leaf JSON-friendly: jax/numpy scalars become Python numbers, dicts recurse."""
  if isinstance(value, Mapping):
    return {str(k): to_json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v) for v in value]
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  return value


def metric_value(metrics: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
  """The finite float `metrics[key]` ("val/dice_mean"; nested dicts are also searched along "/"), else None.

  None means "this step has no usable value": the key is absent, the value is not a number, or it is NaN/inf
  (a diverged run must never be kept as a "best" checkpoint).
  """
  if not metrics:
    return None
  value: Any = metrics.get(key) if key in metrics else None
  if value is None:  # nested form {"val": {"dice_mean": ...}}
    node: Any = metrics
    for part in key.split("/"):
      if not isinstance(node, Mapping) or part not in node:
        return None
      node = node[part]
    value = node
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


class BestWithMetric:
  """Orbax preservation policy: the `n` best steps among those whose metric has a finite value.

  Steps without the metric (or with NaN) are invisible to this policy, so they are never kept as "best";
  they survive only through the LatestN policy it is combined with. The ranking itself is Orbax's `BestN`.
  """

  def __init__(self, key: str, n: int, mode: str):
    self.key = key
    self._best = ocm.BestN(get_metric_fn=lambda m: metric_value(m, key), reverse=(mode == "min"), n=n,
                           keep_checkpoints_without_metrics=False)

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> List[bool]:
    scored = [i for i, info in enumerate(checkpoints) if metric_value(info.metrics, self.key) is not None]
    keep = [False] * len(checkpoints)
    for i, flag in zip(scored, self._best.should_preserve([checkpoints[i] for i in scored], context=context)):
      keep[i] = bool(flag)
    return keep


def best_of(metrics_by_step: Mapping[int, Optional[Mapping[str, Any]]], key: str, mode: str) -> Optional[int]:
  """The step whose `metric_value(metrics, key)` is best ("max" or "min"; the later step wins ties), None if no
  step has a finite value."""
  best: Optional[tuple] = None
  sign = 1.0 if mode == "max" else -1.0
  for step in sorted(metrics_by_step):
    value = metric_value(metrics_by_step[step], key)
    if value is not None and (best is None or sign * value >= best[0]):
      best = (sign * value, step)
  return None if best is None else best[1]
