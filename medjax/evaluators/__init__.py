"""Evaluators: turn a model's predictions over a split into named metrics.

An evaluator provides a jittable `stats_fn(outputs, aux, batch)` of small per-example statistics, computed
on device inside the eval step, and a host-side `summarize(stats)` over the whole split. `evaluate` runs
the loop; padded examples (weight 0 in the last batch) are dropped before summarising, so every example
of the split counts exactly once whatever the batch size and device count.
"""

from medjax.evaluators.base import EVALUATORS, evaluate
from medjax.evaluators import classification, segmentation  # registers the evaluators

__all__ = ["EVALUATORS", "evaluate", "classification", "segmentation"]
