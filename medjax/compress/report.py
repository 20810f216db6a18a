"""The compression report: one row per model variant (the float original, int8 PTQ, pruned, distilled, exported)
with its test metrics, parameter count, storage bytes and CPU/GPU latency, as a Markdown table, JSON and a plot.

  row = report.measure("ptq int8", "int8 PTQ, 8 calibration batches", predict, images, metrics={"auc": 0.91},
                       params=n, nonzero=nz, size=quantize.size_bytes(qvars), repeats=20)
  text = report.markdown_table(rows); report.plot(rows, "report.png")

This module takes plain callables and arrays (compress/ sits in the parts layer: it reads no config or
workdir); `medjax.tools.compress_report` builds the variants from runs and computes their metrics as
`medjax.tools.evaluate` does.

Latency: `predict(images)` is called `warmup` times (compilation, caches) and then `repeats` times, each call
waited for with `jax.block_until_ready`; the median of the timed calls, in milliseconds, is reported, for one
image (batch 1) and for a full batch (the run's evaluation batch). The median, not the mean: a shared machine's
stray slow call moves the mean, not the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import numpy as np

# Metrics shown in the table, in this order, when a row has them (the evaluators' headline metrics).
HEADLINE = ("auc", "accuracy", "dice")


class Variant(NamedTuple):
  """One row of the report.

  name: short label ("original", "ptq int8", "prune 0.5", ...); what: how it was made, in words.
  metrics: headline metric name -> value on the report's split (None where it could not be computed).
  params: stored parameter entries (every array leaf of the params); nonzero: those that are not exactly 0
    (unstructured pruning zeroes weights without removing them: params stay, nonzero drops).
  size: bytes of the weights as held in memory (int8 one byte, float32 four; `quantize.size_bytes`), or for an
    exported predictor folder its bytes on disk.
  latency_ms_1 / latency_ms_batch: median milliseconds of one forward call on 1 image / on `batch` images.
  batch: the full batch's size.
  """
  name: str
  what: str
  metrics: Dict[str, Optional[float]]
  params: int
  nonzero: int
  size: int
  latency_ms_1: float
  latency_ms_batch: float
  batch: int

  def as_dict(self) -> Dict[str, Any]:
    return self._asdict()


def latency_ms(predict: Callable[[Any], Any], images: Any, *, repeats: int = 20, warmup: int = 2) -> float:
  """Median wall time in ms of `predict(images)` over `repeats` calls after `warmup` untimed ones, each call
  waited for with `jax.block_until_ready` (dispatch is asynchronous). Raises ValueError for repeats < 1."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"latency_ms: repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
  for _ in range(warmup):
    jax.block_until_ready(predict(images))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(predict(images))
    times.append(time.perf_counter() - start)
  return 1000.0 * statistics.median(times)


def count_nonzero(params: Any) -> int:
  """Entries of every array leaf of `params` that are not exactly 0."""
  return int(sum(int(np.count_nonzero(np.asarray(leaf))) for leaf in jax.tree.leaves(params)))


def measure(name: str, what: str, predict: Callable[[Any], Any], images: Any, *, metrics: Dict[str, Any],
            params: int, nonzero: int, size: int, repeats: int = 20, warmup: int = 2) -> Variant:
  """A `Variant` with its latency timed on `images` `(B, *spatial, C)`: batch 1 (`images[:1]`) and all B."""
  images = np.asarray(images)
  if images.ndim < 2 or images.shape[0] < 1:
    raise ValueError(f"measure({name!r}): images must be a batch (B >= 1, *spatial, C), got shape {images.shape}.")
  one = latency_ms(predict, images[:1], repeats=repeats, warmup=warmup)
  full = latency_ms(predict, images, repeats=repeats, warmup=warmup)
  shown = {k: (None if v is None else float(v)) for k, v in metrics.items()}
  return Variant(name=name, what=what, metrics=shown, params=int(params), nonzero=int(nonzero), size=int(size),
                 latency_ms_1=one, latency_ms_batch=full, batch=int(images.shape[0]))


def metric_names(rows: Sequence[Variant]) -> List[str]:
  """The headline metrics any row has, in `HEADLINE` order, then any others in first-seen order."""
  seen: List[str] = []
  for row in rows:
    seen += [k for k in row.metrics if k not in seen]
  return [k for k in HEADLINE if k in seen] + [k for k in seen if k not in HEADLINE]


def _bytes(n: int) -> str:
  for unit, scale in (("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def markdown_table(rows: Sequence[Variant]) -> str:
  """The rows as a Markdown table: variant, metrics (4 decimals), params, nonzero, bytes (and the ratio to the
  first row, the original), latency at batch 1 and at the full batch (ms)."""
  if not rows:
    raise ValueError("markdown_table: no rows.")
  names = metric_names(rows)
  base = rows[0].size
  header = ["variant", *names, "params", "nonzero", "bytes", "x original", "ms (batch 1)", "ms (batch B)", "how"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" + "---:|" * (len(names) + 6) + "---|"]
  for r in rows:
    values = ["n/a" if r.metrics.get(k) is None else f"{r.metrics[k]:.4f}" for k in names]
    ratio = f"{r.size / base:.3f}" if base else "n/a"
    cells = [r.name, *values, f"{r.params:,}", f"{r.nonzero:,}", _bytes(r.size), ratio, f"{r.latency_ms_1:.2f}",
             f"{r.latency_ms_batch:.2f} (B={r.batch})", r.what]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: Sequence[Variant], path: str, metric: Optional[str] = None) -> str:
  """Two panels, one marker per variant: `metric` (default the first headline metric the rows have) against
  bytes (log scale) and against full-batch latency. Writes a PNG to `path` (matplotlib Agg) and returns it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = metric_names(rows)
  metric = metric or (names[0] if names else None)
  if metric is None:
    raise ValueError("plot: the rows have no metrics to plot.")
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  markers = "osD^v<>ph*X"
  for i, r in enumerate(rows):
    value = r.metrics.get(metric)
    y = np.nan if value is None else value  # no metric: no marker, the legend still lists it
    for ax, x in zip(axes, (r.size, r.latency_ms_batch)):
      ax.plot([x], [y], markers[i % len(markers)], markersize=8, label=r.name)
  axes[0].set_xscale("log")
  axes[0].set_xlabel("weight bytes (log)")
  axes[1].set_xlabel(f"latency, ms per batch of {rows[0].batch}")
  for ax in axes:
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8, loc="best")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


__all__ = ["HEADLINE", "Variant", "count_nonzero", "latency_ms", "markdown_table", "measure", "metric_names", "plot"]
