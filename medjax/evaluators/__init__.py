"""Evaluators: turn a model's predictions over a split into named metrics and reports.

An evaluator provides a jittable `stats_fn(outputs, aux, batch)` of small per-example statistics, computed
on device inside the eval step, a host-side `summarize(stats)` over the whole split (cheap enough for every
validation), and `report(stats, ids, metadata=None)`: metrics with bootstrap confidence intervals, the
per-case table, subgroup metrics and the data for plots. `evaluate` runs the loop; padded examples (weight 0
in the last batch) are dropped before summarising, so every example of the split counts exactly once
whatever the batch size and device count.
"""

from medjax.evaluators.base import EVALUATORS, collect, evaluate
from medjax.evaluators import classification, regression, segmentation  # registers the evaluators

__all__ = ["EVALUATORS", "classification", "collect", "evaluate", "regression", "segmentation"]
