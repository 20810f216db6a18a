"""medjax.compress.report: latency as a median of waited calls, the Markdown table and the plot."""

import jax.numpy as jnp
import numpy as np
import pytest

from medjax.compress import report


def _row(name, auc, size, **kw):
  values = dict(name=name, what=f"made as {name}", metrics={"auc": auc, "accuracy": 0.5}, params=100, nonzero=100,
                size=size, latency_ms_1=1.0, latency_ms_batch=4.0, batch=8)
  values.update(kw)
  return report.Variant(**values)


def test_latency_is_the_median_of_the_timed_calls_after_warmup(monkeypatch):
  calls = []
  # Fake clock: call k of `predict` takes durations[k] seconds; perf_counter advances only inside predict.
  durations = [100.0, 100.0, 0.003, 0.001, 5.0, 0.002, 0.004]
  now = [0.0]
  monkeypatch.setattr(report.time, "perf_counter", lambda: now[0])

  def predict(x):
    now[0] += durations[len(calls)]
    calls.append(x.shape)
    return jnp.zeros(())

  ms = report.latency_ms(predict, np.zeros((2, 3)), repeats=5, warmup=2)
  assert len(calls) == 7  # the two warm-up calls (compilation) are not timed
  assert ms == pytest.approx(3.0)  # median of 3, 1, 5000, 2, 4 ms: one slow call does not move it
  with pytest.raises(ValueError, match="repeats must be >= 1"):
    report.latency_ms(predict, np.zeros(1), repeats=0)


def test_measure_times_batch_one_and_the_full_batch():
  shapes = []

  def predict(x):
    shapes.append(x.shape)
    return jnp.asarray(x).sum()

  row = report.measure("original", "float", predict, np.ones((4, 5, 5, 1), np.float32), metrics={"auc": np.float32(1)},
                       params=10, nonzero=7, size=40, repeats=3, warmup=1)
  assert shapes == [(1, 5, 5, 1)] * 4 + [(4, 5, 5, 1)] * 4
  assert row.batch == 4 and row.params == 10 and row.nonzero == 7 and row.size == 40
  assert row.metrics == {"auc": 1.0} and type(row.metrics["auc"]) is float
  with pytest.raises(ValueError, match=r"measure\('x'\): images must be a batch"):
    report.measure("x", "", predict, np.ones((0, 3)), metrics={}, params=0, nonzero=0, size=0)


def test_count_nonzero_counts_exact_zeros_only():
  params = {"a": np.array([0.0, 1e-30, -2.0]), "b": {"k": np.zeros((2, 2)), "c": np.ones(3)}}
  assert report.count_nonzero(params) == 5


def test_markdown_table_one_row_per_variant_with_ratio_to_the_original():
  rows = [_row("original", 0.91234, 4_000_000), _row("ptq int8", None, 1_000_000, nonzero=50)]
  lines = report.markdown_table(rows).splitlines()
  assert lines[0] == ("| variant | auc | accuracy | params | nonzero | bytes | x original | ms (batch 1) | ms (batch B) "
                      "| how |")
  assert len(lines) == 4 and lines[1].count("|") == lines[0].count("|")
  assert lines[2] == ("| original | 0.9123 | 0.5000 | 100 | 100 | 4.00 MB | 1.000 | 1.00 | 4.00 (B=8) | made as "
                      "original |")
  assert lines[3].startswith("| ptq int8 | n/a | 0.5000 | 100 | 50 | 1.00 MB | 0.250 |")
  assert report.metric_names([_row("a", 1, 1, metrics={"dice": 0.8, "x": 1, "auc": 0.7})]) == ["auc", "dice", "x"]
  with pytest.raises(ValueError, match="no rows"):
    report.markdown_table([])


def test_plot_writes_a_png(tmp_path):
  path = report.plot([_row("original", 0.9, 4000), _row("pruned", None, 1000)], str(tmp_path / "r.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no metrics"):
    report.plot([_row("a", 1, 1, metrics={})], str(tmp_path / "x.png"))
