"""Classification, ranking and calibration metrics against scikit-learn on randomised cases with ties."""

import numpy as np
import pytest
import sklearn.metrics as skm

from medjax import metrics
from medjax.metrics import ranking

SEEDS = range(4)


def _binary_case(seed, n=60):
  rng = np.random.default_rng(seed)
  positives = rng.random(n) < 0.4
  positives[:2] = [True, False]  # both classes always present
  scores = np.round(np.clip(0.5 + 0.3 * (positives - 0.5) + 0.3 * rng.normal(size=n), 0, 1), 1)  # ties
  return scores, positives


def _multiclass_case(seed, n=80, k=4):
  rng = np.random.default_rng(seed)
  labels = np.r_[np.arange(k), rng.integers(0, k, n - k)]
  # Small integer weights make many tied probabilities within a column while rows still sum to 1.
  weights = rng.integers(1, 4, size=(n, k)) + 2 * np.eye(k, dtype=int)[labels]
  return weights / weights.sum(1, keepdims=True), labels


def _multilabel_case(seed, n=50, k=3):
  rng = np.random.default_rng(seed)
  positives = rng.random((n, k)) < 0.4
  positives[:2] = [[True] * k, [False] * k]
  probs = np.round(np.clip(0.5 + 0.3 * (positives - 0.5) + 0.3 * rng.normal(size=(n, k)), 0, 1), 1)
  return probs, positives


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_curves_match_sklearn(seed):
  scores, positives = _binary_case(seed)
  fpr, tpr, thresholds = metrics.roc_curve(positives, scores)
  sk_fpr, sk_tpr, sk_thr = skm.roc_curve(positives, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
  np.testing.assert_array_equal(thresholds, sk_thr)
  assert (fpr[0], tpr[0]) == (0.0, 0.0) and np.all(np.diff(thresholds) < 0)
  precision, recall, pr_thr = metrics.pr_curve(positives, scores)
  sk_p, sk_r, sk_pr_thr = skm.precision_recall_curve(positives, scores)
  # scikit-learn orders by increasing threshold and appends the (recall 0, precision 1) end point.
  np.testing.assert_allclose(precision, sk_p[::-1], atol=1e-12)
  np.testing.assert_allclose(recall, sk_r[::-1], atol=1e-12)
  np.testing.assert_array_equal(pr_thr[1:], sk_pr_thr[::-1])
  assert metrics.average_precision(positives, scores) == pytest.approx(
      skm.average_precision_score(positives, scores), abs=1e-6)
  assert metrics.roc_auc(positives, scores) == pytest.approx(skm.roc_auc_score(positives, scores), abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_summary_matches_sklearn(seed):
  scores, positives = _binary_case(seed)
  result = metrics.classification_metrics(positives, scores, task="binary", threshold=0.5)
  preds = scores >= 0.5
  expected = {
      "accuracy": skm.accuracy_score(positives, preds), "sensitivity": skm.recall_score(positives, preds),
      "specificity": skm.recall_score(~positives, ~preds), "precision": skm.precision_score(positives, preds),
      "f1": skm.f1_score(positives, preds), "balanced_accuracy": skm.balanced_accuracy_score(positives, preds),
      "kappa": skm.cohen_kappa_score(positives, preds), "auc": skm.roc_auc_score(positives, scores),
      "pr_auc": skm.average_precision_score(positives, scores)}
  for name, value in expected.items():
    assert result[name] == pytest.approx(value, abs=1e-6), name
  assert result["num_cases"] == len(scores)
  two_column = metrics.classification_metrics(positives, np.stack([1 - scores, scores], 1), task="binary")
  assert two_column == pytest.approx(result, nan_ok=True)
  labels, preds = positives.astype(int), preds.astype(int)
  assert metrics.sensitivity(labels, preds) == pytest.approx(expected["sensitivity"], abs=1e-9)
  assert metrics.recall(labels, preds) == pytest.approx(expected["sensitivity"], abs=1e-9)
  assert metrics.specificity(labels, preds) == pytest.approx(expected["specificity"], abs=1e-9)
  assert metrics.precision(labels, preds) == pytest.approx(expected["precision"], abs=1e-9)
  assert metrics.f1(labels, preds) == pytest.approx(expected["f1"], abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_matches_sklearn(seed):
  probs, labels = _multiclass_case(seed)
  k = probs.shape[1]
  preds = probs.argmax(1)
  result = metrics.classification_metrics(labels, probs, task="multi-class")
  onehot = np.eye(k)[labels]
  expected = {
      "accuracy": skm.accuracy_score(labels, preds),
      "balanced_accuracy": skm.balanced_accuracy_score(labels, preds),
      "sensitivity": skm.recall_score(labels, preds, average="macro"),
      "precision": skm.precision_score(labels, preds, average="macro"),
      "f1": skm.f1_score(labels, preds, average="macro"),
      "kappa": skm.cohen_kappa_score(labels, preds),
      "kappa_linear": skm.cohen_kappa_score(labels, preds, weights="linear"),
      "kappa_quadratic": skm.cohen_kappa_score(labels, preds, weights="quadratic"),
      "auc": skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
      "auc_micro": skm.roc_auc_score(labels, probs, multi_class="ovr", average="micro"),
      "pr_auc": skm.average_precision_score(onehot, probs, average="macro"),
      "pr_auc_micro": skm.average_precision_score(onehot, probs, average="micro")}
  for name, value in expected.items():
    assert result[name] == pytest.approx(value, abs=1e-6), name
  specificity = [skm.recall_score(labels != c, preds != c) for c in range(k)]
  assert result["specificity"] == pytest.approx(np.mean(specificity), abs=1e-6)
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, k),
                                skm.confusion_matrix(labels, preds, labels=range(k)))
  assert metrics.confusion_matrix(labels, preds, k).dtype == np.int64
  assert metrics.roc_auc_ovr(labels, probs, average="micro") == pytest.approx(expected["auc_micro"], abs=1e-6)
  assert metrics.balanced_accuracy(labels, preds, k) == pytest.approx(expected["balanced_accuracy"], abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_matches_sklearn(seed):
  probs, positives = _multilabel_case(seed)
  result = metrics.classification_metrics(positives, probs, task="multi-label", threshold=0.5)
  preds = probs >= 0.5
  expected = {
      "auc": skm.roc_auc_score(positives, probs, average="macro"),
      "auc_micro": skm.roc_auc_score(positives, probs, average="micro"),
      "pr_auc": skm.average_precision_score(positives, probs, average="macro"),
      "pr_auc_micro": skm.average_precision_score(positives, probs, average="micro"),
      "f1": skm.f1_score(positives, preds, average="macro"),
      "precision": skm.precision_score(positives, preds, average="macro"),
      "sensitivity": skm.recall_score(positives, preds, average="macro"),
      "subset_accuracy": skm.accuracy_score(positives, preds),
      "accuracy": 1.0 - skm.hamming_loss(positives, preds),
      "balanced_accuracy": np.mean([skm.balanced_accuracy_score(positives[:, j], preds[:, j])
                                    for j in range(probs.shape[1])])}
  for name, value in expected.items():
    assert result[name] == pytest.approx(value, abs=1e-6), name


def test_ranking_metrics_with_all_scores_tied():
  scores, positives = np.full(6, 0.3), np.array([1, 0, 1, 0, 0, 1], bool)
  assert metrics.roc_auc(positives, scores) == 0.5
  assert metrics.average_precision(positives, scores) == pytest.approx(0.5)
  fpr, tpr, _ = metrics.roc_curve(positives, scores)
  np.testing.assert_array_equal(fpr, [0, 1])
  np.testing.assert_array_equal(tpr, [0, 1])


def test_undefined_per_class_ratios_are_nan_and_left_out_of_macro():
  labels = np.array([0, 0, 1, 1])
  preds = np.array([0, 0, 0, 1])  # class 2 absent from both; class 1 recall 0.5
  per_class = metrics.per_class_metrics(metrics.confusion_matrix(labels, preds, 3))
  assert np.isnan(per_class["sensitivity"][2]) and np.isnan(per_class["precision"][2])
  assert np.isnan(per_class["f1"][2])
  assert metrics.sensitivity(labels, preds, 3) == pytest.approx((1.0 + 0.5) / 2)
  never_predicted = metrics.per_class_metrics(metrics.confusion_matrix([0, 1], [0, 0], 2))
  assert np.isnan(never_predicted["precision"][1]) and never_predicted["f1"][1] == 0.0


def test_single_class_ranking_metrics_are_nan():
  assert np.isnan(metrics.average_precision(np.zeros(4, bool), np.arange(4.0)))
  assert np.isnan(metrics.roc_auc(np.ones(4, bool), np.arange(4.0)))


@pytest.mark.parametrize("seed", SEEDS)
def test_operating_point_matches_brute_force(seed):
  scores, positives = _binary_case(seed)
  target = 0.8
  best = None
  for t in np.unique(scores):  # brute force: the most specific threshold that reaches the target
    predicted = scores >= t
    sens, spec = predicted[positives].mean(), (~predicted[~positives]).mean()
    if sens >= target and (best is None or spec > best[2] or (spec == best[2] and t > best[0])):
      best = (t, sens, spec)
  point = metrics.operating_point(positives, scores, target)
  assert (point["threshold"], point["sensitivity"], point["specificity"]) == pytest.approx(best)


def _ece_by_loops(confidences, correct, num_bins):
  total = 0.0
  for m in range(num_bins):
    low, high = m / num_bins, (m + 1) / num_bins
    inside = (confidences > low) & (confidences <= high) | ((m == 0) & (confidences == 0))
    if inside.any():
      total += inside.sum() * abs(correct[inside].mean() - confidences[inside].mean())
  return total / len(confidences)


@pytest.mark.parametrize("seed", SEEDS)
def test_calibration_matches_loops(seed):
  probs, labels = _multiclass_case(seed)
  confidences, correct = probs.max(1), probs.argmax(1) == labels
  assert metrics.expected_calibration_error(labels, probs, 10) == pytest.approx(
      _ece_by_loops(confidences, correct, 10), abs=1e-12)
  mean_conf, mean_acc, count = metrics.calibration_curve(correct, confidences, 10)
  assert count.sum() == len(labels) and np.all(np.isnan(mean_conf[count == 0]))
  filled = count > 0
  bin_low, bin_high = np.arange(10)[filled] / 10, np.arange(1, 11)[filled] / 10
  assert np.all((mean_conf[filled] > bin_low) & (mean_conf[filled] <= bin_high))
  assert np.all((mean_acc[filled] >= 0) & (mean_acc[filled] <= 1))


def test_calibration_known_values():
  # Two right-closed bins: (0, .5] holds 0.2 and 0.5, (.5, 1] holds 0.9 and 1.0.
  confidences, correct = np.array([0.2, 0.5, 0.9, 1.0]), np.array([False, True, True, True])
  mean_conf, mean_acc, count = metrics.calibration_curve(correct, confidences, 2)
  np.testing.assert_array_equal(count, [2, 2])
  np.testing.assert_allclose(mean_conf, [0.35, 0.95])
  np.testing.assert_allclose(mean_acc, [0.5, 1.0])
  # Binary probabilities: confidence max(p, 1 - p); p = 0.1 predicts negative, so a label 0 is right.
  assert metrics.expected_calibration_error(np.array([0, 0]), np.array([0.1, 0.8]), 10) == pytest.approx(
      (abs(1 - 0.9) + abs(0 - 0.8)) / 2)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="same length"):
    metrics.classification_metrics(np.array([0, 1]), np.full((3, 2), 0.5), task="multi-class")
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    metrics.classification_metrics(np.array([0, 3]), np.full((2, 3), 0.3), task="multi-class")
  with pytest.raises(ValueError, match="NaN"):
    metrics.classification_metrics(np.array([0, 1]), np.array([0.2, np.nan]), task="binary")
  with pytest.raises(ValueError, match="binary values"):
    metrics.roc_auc(np.array([0, 2]), np.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="same shape"):
    metrics.classification_metrics(np.zeros((2, 2)), np.full((2, 3), 0.3), task="multi-label")
  with pytest.raises(ValueError, match="task must be"):
    metrics.classification_metrics(np.zeros(2), np.full((2, 3), 0.3), task="multiclass")
  with pytest.raises(ValueError, match="weights must be"):
    metrics.cohen_kappa([0, 1], [0, 1], 2, weights="cubic")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    metrics.calibration_curve(np.array([True]), np.array([1.2]))
  with pytest.raises(ValueError, match="both positive and negative"):
    metrics.operating_point(np.ones(3, bool), np.arange(3.0), 0.9)


# ------------------------------------------------------------------------------------------ MCC, F-beta, rates


def _rates_from_sklearn(labels, preds, k):
  """One-vs-rest rates per class from scikit-learn's confusion matrix (scikit-learn has no NPV/FDR function)."""
  cm = skm.confusion_matrix(labels, preds, labels=range(k)).astype(float)
  tp = np.diag(cm)
  fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
  tn = cm.sum() - tp - fn - fp
  with np.errstate(invalid="ignore", divide="ignore"):
    rates = {"npv": tn / (tn + fn), "fpr": fp / (fp + tn), "fnr": fn / (fn + tp), "fdr": fp / (fp + tp),
             "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "precision": tp / (tp + fp)}
  rates["informedness"] = rates["sensitivity"] + rates["specificity"] - 1
  rates["markedness"] = rates["precision"] + rates["npv"] - 1
  return rates


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_mcc_fbeta_and_rates_match_sklearn(seed):
  scores, positives = _binary_case(seed)
  labels, preds = positives.astype(int), (scores >= 0.5).astype(int)
  assert metrics.mcc(labels, preds) == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)
  assert metrics.matthews_corrcoef is metrics.mcc
  for beta in (0.5, 1.0, 2.0, 3.7):
    assert metrics.fbeta(labels, preds, beta) == pytest.approx(skm.fbeta_score(labels, preds, beta=beta), abs=1e-12)
  assert metrics.fbeta(labels, preds, 1.0) == pytest.approx(metrics.f1(labels, preds), abs=1e-12)
  rates = _rates_from_sklearn(labels, preds, 2)
  for name in ("npv", "fpr", "fnr", "fdr", "informedness", "markedness"):
    assert getattr(metrics, name)(labels, preds) == pytest.approx(rates[name][1], abs=1e-12), name
  assert metrics.fpr(labels, preds) == pytest.approx(1 - skm.recall_score(labels, preds, pos_label=0), abs=1e-12)
  assert metrics.fnr(labels, preds) == pytest.approx(1 - skm.recall_score(labels, preds), abs=1e-12)
  assert metrics.fdr(labels, preds) == pytest.approx(1 - skm.precision_score(labels, preds), abs=1e-12)
  youden = skm.recall_score(labels, preds) + skm.recall_score(labels, preds, pos_label=0) - 1
  assert metrics.informedness(labels, preds) == pytest.approx(youden, abs=1e-12)
  assert metrics.informedness(labels, preds) == pytest.approx(2 * skm.balanced_accuracy_score(labels, preds) - 1)
  result = metrics.classification_metrics(positives, scores, task="binary", betas=(2.0, 0.5))
  assert result["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)
  assert result["f2"] == pytest.approx(skm.fbeta_score(labels, preds, beta=2.0), abs=1e-12)
  assert result["f0.5"] == pytest.approx(skm.fbeta_score(labels, preds, beta=0.5), abs=1e-12)
  for name in ("npv", "fpr", "fnr", "fdr", "informedness", "markedness"):
    assert result[name] == pytest.approx(rates[name][1], abs=1e-12), name


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_mcc_fbeta_rates_and_weighted_auc_match_sklearn(seed):
  probs, labels = _multiclass_case(seed)
  k = probs.shape[1]
  preds = probs.argmax(1)
  assert metrics.mcc(labels, preds, k) == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)
  for beta in (0.5, 2.0):
    assert metrics.fbeta(labels, preds, beta, k) == pytest.approx(
        skm.fbeta_score(labels, preds, beta=beta, average="macro"), abs=1e-12)
  rates = _rates_from_sklearn(labels, preds, k)
  for name in ("npv", "fpr", "fnr", "fdr", "informedness", "markedness"):
    assert getattr(metrics, name)(labels, preds, k) == pytest.approx(np.mean(rates[name]), abs=1e-12), name
  weighted = skm.roc_auc_score(labels, probs, multi_class="ovr", average="weighted")
  assert metrics.roc_auc_ovr(labels, probs, average="weighted") == pytest.approx(weighted, abs=1e-12)
  result = metrics.classification_metrics(labels, probs, task="multi-class", betas=(2,))
  assert result["auc_weighted"] == pytest.approx(weighted, abs=1e-12)
  assert result["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)
  assert result["f2"] == pytest.approx(skm.fbeta_score(labels, preds, beta=2, average="macro"), abs=1e-12)
  assert result["markedness"] == pytest.approx(np.mean(rates["markedness"]), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_weighted_auc_fbeta_and_mcc_match_sklearn(seed):
  probs, positives = _multilabel_case(seed)
  preds = probs >= 0.5
  result = metrics.classification_metrics(positives, probs, task="multi-label", betas=(2.0,))
  assert result["auc_weighted"] == pytest.approx(skm.roc_auc_score(positives, probs, average="weighted"), abs=1e-12)
  assert result["f2"] == pytest.approx(skm.fbeta_score(positives, preds, beta=2.0, average="macro"), abs=1e-12)
  per_label = [skm.matthews_corrcoef(positives[:, j], preds[:, j]) for j in range(probs.shape[1])]
  assert result["mcc"] == pytest.approx(np.mean(per_label), abs=1e-12)
  fdr = [1 - skm.precision_score(positives[:, j], preds[:, j]) for j in range(probs.shape[1])]
  assert result["fdr"] == pytest.approx(np.mean(fdr), abs=1e-12)


def test_weighted_average_weighs_by_prevalence_and_skips_undefined_columns():
  y_true = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 1]], bool)  # column 2 all positive: AUC undefined
  scores = np.array([[0.9, 0.2, 0.5], [0.6, 0.7, 0.1], [0.3, 0.1, 0.4], [0.2, 0.4, 0.3]])
  aucs = [metrics.roc_auc(y_true[:, j], scores[:, j]) for j in range(2)]
  expected = (3 * aucs[0] + 1 * aucs[1]) / 4
  assert metrics.roc_auc(y_true[:, 0], scores[:, 0]) == pytest.approx(skm.roc_auc_score(y_true[:, 0], scores[:, 0]))
  assert ranking.averaged(metrics.roc_auc, y_true, scores, "weighted") == pytest.approx(expected)
  with pytest.raises(ValueError, match="'macro', 'weighted' or 'micro'"):
    ranking.averaged(metrics.roc_auc, y_true, scores, "samples")


def test_mcc_degenerate_is_zero_like_sklearn_and_fbeta_checks_beta():
  labels, preds = np.array([0, 1, 1, 0]), np.array([1, 1, 1, 1])  # one predicted class: a constant marginal
  assert metrics.mcc(labels, preds) == skm.matthews_corrcoef(labels, preds) == 0.0
  assert metrics.mcc(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2]), 3) == 1.0
  assert np.isnan(metrics.fbeta_per_class(metrics.confusion_matrix([0, 1], [0, 1], 3), 2.0)[2])  # absent class
  with pytest.raises(ValueError, match="beta must be a positive number"):
    metrics.fbeta(labels, preds, 0.0)
