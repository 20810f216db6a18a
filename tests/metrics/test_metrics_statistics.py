"""Bootstrap intervals, subgroup reports, regression agreement, and on-device confusion counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medjax import metrics


def _mean(x):
  return float(np.mean(x))


def test_bootstrap_contains_estimate_and_is_deterministic():
  rng = np.random.default_rng(0)
  scores, positives = rng.random(80), rng.random(80) < 0.5
  scores = scores + 0.5 * positives
  first = metrics.bootstrap_ci(metrics.roc_auc, positives, scores, num_samples=200, seed=3)
  again = metrics.bootstrap_ci(metrics.roc_auc, positives, scores, num_samples=200, seed=3)
  other = metrics.bootstrap_ci(metrics.roc_auc, positives, scores, num_samples=200, seed=4)
  assert first == again and first != other
  assert first["value"] == metrics.roc_auc(positives, scores)
  assert first["low"] < first["value"] < first["high"]
  assert first["num_samples"] == 200


def test_bootstrap_resamples_patients():
  rng = np.random.default_rng(1)
  per_patient = rng.normal(size=30)
  repeats = 4
  rows = np.repeat(per_patient, repeats)  # every patient has 4 identical rows (e.g. 4 slices)
  patients = np.repeat(np.arange(30), repeats)
  shuffle = rng.permutation(rows.size)  # a patient's rows need not be contiguous
  rows, patients = rows[shuffle], patients[shuffle]
  grouped = metrics.bootstrap_ci(_mean, rows, groups=patients, num_samples=300, seed=7)
  one_row_each = metrics.bootstrap_ci(_mean, per_patient, num_samples=300, seed=7)
  # Drawing whole patients is drawing from the 30 patient values: the same draws give the same interval.
  assert grouped == pytest.approx(one_row_each)
  # Treating the 120 correlated rows as independent understates the uncertainty (about 1/sqrt(4) as wide).
  naive = metrics.bootstrap_ci(_mean, rows, num_samples=300, seed=7)
  assert naive["high"] - naive["low"] < 0.7 * (grouped["high"] - grouped["low"])


def test_bootstrap_skips_nan_replicates():
  positives = np.array([True] + [False] * 9)  # most resamples lack the single positive: AUC NaN
  result = metrics.bootstrap_ci(metrics.roc_auc, positives, np.arange(10.0), num_samples=100, seed=0)
  assert 0 < result["num_samples"] < 100 and np.isfinite(result["low"]) and np.isfinite(result["high"])
  none_defined = metrics.bootstrap_ci(metrics.roc_auc, np.zeros(3, bool), np.arange(3.0), num_samples=5)
  assert none_defined["num_samples"] == 0 and np.isnan(none_defined["low"]) and np.isnan(none_defined["value"])


def test_bootstrap_bad_inputs():
  with pytest.raises(ValueError, match="same length"):
    metrics.bootstrap_ci(_mean, np.arange(4.0), groups=np.arange(3))
  with pytest.raises(ValueError, match="alpha"):
    metrics.bootstrap_ci(_mean, np.arange(4.0), alpha=1.5)


def test_subgroup_report_numbers():
  preds = np.array([1, 1, 0, 0, 1, 0, 1, 1])
  labels = np.array([1, 0, 0, 0, 1, 1, 1, 1])
  site = np.array(["a", "a", "a", "a", "b", "b", "c", "c"])
  fns = {"accuracy": lambda y, p: float(np.mean(p == y)), "sensitivity": metrics.sensitivity}  # (y_true, y_pred)
  report = metrics.subgroup_report(fns, (labels, preds), site, min_size=2)
  assert report["groups"]["a"] == {"n": 4, "accuracy": 0.75, "sensitivity": 1.0}
  assert report["groups"]["b"] == {"n": 2, "accuracy": 0.5, "sensitivity": 0.5}
  assert report["groups"]["c"] == {"n": 2, "accuracy": 1.0, "sensitivity": 1.0}
  assert report["gaps"]["accuracy"] == {"gap": 0.5, "max_group": "c", "min_group": "b"}
  assert report["gaps"]["sensitivity"]["gap"] == 0.5 and report["gaps"]["sensitivity"]["min_group"] == "b"
  assert report["skipped"] == {}
  small = metrics.subgroup_report(fns, (labels, preds), site, min_size=3)
  assert small["skipped"] == {"b": 2, "c": 2} and list(small["groups"]) == ["a"]
  assert np.isnan(small["gaps"]["accuracy"]["gap"]) and small["gaps"]["accuracy"]["max_group"] is None
  numeric = metrics.subgroup_report(fns, (labels, preds), np.array([0, 0, 0, 0, 1, 1, 1, 1]))
  assert set(numeric["groups"]) == {0, 1} and all(type(k) is int for k in numeric["groups"])


def test_subgroup_report_bad_inputs():
  fns = {"mean": lambda x: float(np.mean(x))}
  with pytest.raises(ValueError, match="empty"):
    metrics.subgroup_report(fns, (np.zeros(0),), np.zeros(0))
  with pytest.raises(ValueError, match="same length"):
    metrics.subgroup_report(fns, (np.zeros(3),), np.zeros(2))
  with pytest.raises(ValueError, match="NaN"):
    metrics.subgroup_report(fns, (np.zeros(2),), np.array([1.0, np.nan]))


def test_regression_matches_numpy_and_scipy():
  rng = np.random.default_rng(0)
  target = rng.normal(50, 10, size=40)
  pred = target + rng.normal(2, 3, size=40)
  result = metrics.regression_metrics(target, pred)
  diff = pred - target
  assert result["mae"] == pytest.approx(np.mean(np.abs(diff)))
  assert result["rmse"] == pytest.approx(np.sqrt(np.mean(diff**2)))
  assert result["pearson_r"] == pytest.approx(scipy.stats.pearsonr(pred, target).statistic)
  assert result["bland_altman_bias"] == pytest.approx(np.mean(diff))
  assert result["loa_high"] - result["loa_low"] == pytest.approx(2 * 1.96 * np.std(diff, ddof=1))
  assert np.isnan(metrics.regression_metrics(np.arange(3.0), np.ones(3))["pearson_r"])
  with pytest.raises(ValueError, match="NaN"):
    metrics.regression_metrics(np.ones(2), np.array([1.0, np.nan]))


def test_confusion_counts_match_host_and_sum_over_batches_and_devices():
  rng = np.random.default_rng(0)
  num_classes = 3
  logits = rng.normal(size=(16, 5, 4, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(16, 5, 4))
  weight = np.ones(16, np.float32)
  weight[-3:] = 0  # padding examples
  expected = metrics.confusion_matrix(labels[:13].ravel(), logits[:13].argmax(-1).ravel(), num_classes)
  counts_fn = jax.jit(metrics.confusion_counts, static_argnums=2)
  whole = np.asarray(counts_fn(labels, logits, num_classes, weight))
  assert whole.dtype == np.int32
  np.testing.assert_array_equal(whole, expected)
  per_batch = sum(np.asarray(counts_fn(labels[i:i + 4], logits[i:i + 4], num_classes, weight[i:i + 4]),
                             np.int64) for i in range(0, 16, 4))
  np.testing.assert_array_equal(per_batch, expected)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  sharded = counts_fn(shard(labels), shard(logits), num_classes, shard(weight))
  np.testing.assert_array_equal(np.asarray(sharded), expected)
  preds = np.asarray(counts_fn(labels, jnp.asarray(logits.argmax(-1)), num_classes, weight))
  np.testing.assert_array_equal(preds, expected)


def test_confusion_counts_skips_out_of_range_labels():
  labels = jnp.array([[0, 1, -1, 3]])  # -1 (an ignore index) and 3 are outside [0, 3)
  counts = np.asarray(metrics.confusion_counts(labels, jnp.array([[0, 1, 1, 1]]), 3))
  np.testing.assert_array_equal(counts, np.diag([1, 1, 0]))


def test_confusion_counts_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="does not match y_true"):
    metrics.confusion_counts(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 4, 3)), 3)
  with pytest.raises(ValueError, match="num_classes is 4"):
    metrics.confusion_counts(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5, 3)), 4)
  with pytest.raises(ValueError, match="weight must be"):
    metrics.confusion_counts(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5)), 3, jnp.ones(3))
