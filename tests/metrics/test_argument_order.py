"""Every public metric takes scikit-learn's argument order: the ground truth `y_true` first, then the scores,
probabilities or predictions. Each metric is called positionally and by keyword on a small example where
exchanging the two arguments gives a different number or an error, and compared with scikit-learn.

Metrics that are symmetric in their two arguments (F1 / Dice, Cohen's kappa, MCC, Hausdorff distance, ASSD, NSD) give
the same number either way; their cases say so and only check the value and the names. `dice_per_case`,
`per_class_metrics` and the other functions of counts or a confusion matrix take one array and have no order
to check.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
import sklearn.calibration
import sklearn.metrics as skm

from medjax import metrics

# Binary: 10 cases. Thresholding at 0.6 gives TP 2, FN 3, FP 2, TN 3, so sensitivity and precision differ.
Y_BIN = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
SCORE_BIN = np.array([0.1, 0.4, 0.35, 0.8, 0.65, 0.9, 0.2, 0.55, 0.3, 0.7])
PRED_BIN = (SCORE_BIN >= 0.6).astype(int)

# Multi-class: 3 classes with different reference and predicted frequencies.
Y_MC = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
PRED_MC = np.array([0, 0, 0, 2, 1, 1, 1, 2, 2])  # macro recall 0.806, macro precision 0.778
_WEIGHTS = np.array([[5, 1, 2], [4, 2, 1], [2, 3, 1], [2, 1, 3], [1, 5, 2], [2, 4, 1], [1, 2, 6], [1, 1, 4],
                     [2, 3, 2]], np.float64)
PROB_MC = _WEIGHTS / _WEIGHTS.sum(1, keepdims=True)

# Multi-label: 6 cases, 2 labels.
Y_ML = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]])
PROB_ML = np.array([[0.8, 0.3], [0.4, 0.7], [0.6, 0.2], [0.3, 0.6], [0.45, 0.1], [0.2, 0.9]])

# Regression (scikit-learn's documentation example).
Y_REG = np.array([3.0, -0.5, 2.0, 7.0])
PRED_REG = np.array([2.5, 0.0, 2.0, 8.0])

# Segmentation: a reference square and a smaller, shifted predicted one; label maps with 3 classes.
SPACING = (1.0, 2.0)
REF_MASK = np.zeros((8, 9), bool)
REF_MASK[1:6, 1:6] = True
PRED_MASK = np.zeros((8, 9), bool)
PRED_MASK[2:5, 3:7] = True
REF_LABEL = REF_MASK.astype(int) + 2 * (np.arange(9)[None, :] >= 7)
PRED_LABEL = PRED_MASK.astype(int) + 2 * (np.arange(9)[None, :] >= 8) * (np.arange(8)[:, None] >= 2)


def _surface_points(mask):
  faces = np.pad(mask, 1)
  inner = faces[1:-1, 1:-1]
  interior = inner & faces[:-2, 1:-1] & faces[2:, 1:-1] & faces[1:-1, :-2] & faces[1:-1, 2:]
  return np.argwhere(mask & ~interior) * np.asarray(SPACING)


def _surface_distances_sklearn(ref, pred):
  """(pred_to_ref, ref_to_pred) from scikit-learn's pairwise distances between surface voxel centres."""
  pairwise = skm.pairwise_distances(_surface_points(pred), _surface_points(ref))
  return pairwise.min(1), pairwise.min(0)


_PRED_TO_REF, _REF_TO_PRED = _surface_distances_sklearn(REF_MASK, PRED_MASK)


def _ece_sklearn(correct, confidence, num_bins):
  """ECE from scikit-learn's calibration_curve (non-empty bins) and the bin counts."""
  prob_true, prob_pred = sklearn.calibration.calibration_curve(correct, confidence, n_bins=num_bins)
  count = np.bincount(np.searchsorted(np.linspace(0, 1, num_bins + 1)[1:-1], confidence), minlength=num_bins)
  return float(np.sum(count[count > 0] * np.abs(prob_true - prob_pred)) / count.sum())


def _one_hot_logits(labels, k):
  return np.eye(k, dtype=np.float32)[labels]


@dataclasses.dataclass
class Case:
  id: str
  fn: Callable[..., Any]
  y_true: Any
  second_name: str  # the second argument's keyword
  second: Any
  expected: Any  # what scikit-learn gives
  extract: Callable[[Any], Any] = lambda result: result
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # further arguments, in signature order
  kw_only: Dict[str, Any] = dataclasses.field(default_factory=dict)
  symmetric: bool = False  # swapping y_true and the second argument cannot change the value
  swap_match: Optional[str] = None  # the swapped call raises an error matching this


def _binary_summary(result):
  return [result[k] for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "balanced_accuracy",
                              "kappa", "auc", "pr_auc")]


def _multiclass_summary(result):
  return [result[k] for k in ("accuracy", "balanced_accuracy", "sensitivity", "precision", "f1", "kappa",
                              "kappa_quadratic", "auc", "auc_micro")]


def _multilabel_summary(result):
  return [result[k] for k in ("subset_accuracy", "sensitivity", "precision", "f1", "auc", "auc_micro", "pr_auc")]


_BIN_ROC = skm.roc_curve(Y_BIN, SCORE_BIN, drop_intermediate=False)
_BIN_PR = skm.precision_recall_curve(Y_BIN, SCORE_BIN)
_CONF_MC, _CORRECT_MC = PROB_MC.max(1), PROB_MC.argmax(1) == Y_MC
_SK_CAL = sklearn.calibration.calibration_curve(_CORRECT_MC, _CONF_MC, n_bins=4)
_SEG_CM = skm.confusion_matrix(REF_LABEL.ravel(), PRED_LABEL.ravel(), labels=range(3))
_SEG_AVG = dict(labels=range(3), average=None)  # every class is in both maps: no zero division
_SEG_TRUE, _SEG_PRED = REF_LABEL.ravel(), PRED_LABEL.ravel()
_LOOK_SWAPPED = "look swapped"


def _one_vs_rest_mean(score, y_true, y_pred):
  """Macro mean over the classes of score(class c) + score(not c) - 1: informedness (recall) or markedness
  (precision) from scikit-learn's binary scores."""
  return np.mean([score(y_true == c, y_pred == c) + score(y_true != c, y_pred != c) - 1 for c in range(3)])


_INFORMEDNESS_MC = _one_vs_rest_mean(skm.recall_score, Y_MC, PRED_MC)
_MARKEDNESS_MC = _one_vs_rest_mean(skm.precision_score, Y_MC, PRED_MC)
_NSD_TOLERANCE = 2.0
_NSD = ((np.sum(_PRED_TO_REF <= _NSD_TOLERANCE) + np.sum(_REF_TO_PRED <= _NSD_TOLERANCE))
        / (_PRED_TO_REF.size + _REF_TO_PRED.size))
_MASK_TRUE, _MASK_PRED = REF_MASK.ravel(), PRED_MASK.ravel()
# Two overlapping region channels: the square and the class-2 strip of the label maps.
REF_REGIONS = np.stack([REF_MASK, REF_LABEL == 2], -1)
PRED_REGIONS = np.stack([PRED_MASK, PRED_LABEL == 2], -1)
_REGION_TRUE, _REGION_PRED = REF_REGIONS.reshape(-1, 2), PRED_REGIONS.reshape(-1, 2)

CASES = [
    # ------------------------------------------------------------------ ranking (binary scores)
    Case("roc_auc", metrics.roc_auc, Y_BIN, "y_score", SCORE_BIN, skm.roc_auc_score(Y_BIN, SCORE_BIN),
         swap_match=_LOOK_SWAPPED),
    Case("average_precision", metrics.average_precision, Y_BIN, "y_score", SCORE_BIN,
         skm.average_precision_score(Y_BIN, SCORE_BIN), swap_match=_LOOK_SWAPPED),
    Case("roc_curve", metrics.roc_curve, Y_BIN, "y_score", SCORE_BIN, np.concatenate(_BIN_ROC),
         extract=np.concatenate, swap_match=_LOOK_SWAPPED),
    Case("pr_curve", metrics.pr_curve, Y_BIN, "y_score", SCORE_BIN,
         np.concatenate([_BIN_PR[0][::-1], _BIN_PR[1][::-1], _BIN_PR[2][::-1]]),
         extract=lambda r: np.concatenate([r[0], r[1], r[2][1:]]), swap_match=_LOOK_SWAPPED),
    Case("operating_point", metrics.operating_point, Y_BIN, "y_score", SCORE_BIN,
         [_BIN_ROC[2][np.argmax(_BIN_ROC[1] >= 0.8)], _BIN_ROC[1][np.argmax(_BIN_ROC[1] >= 0.8)],
          1 - _BIN_ROC[0][np.argmax(_BIN_ROC[1] >= 0.8)]],
         extract=lambda r: [r["threshold"], r["sensitivity"], r["specificity"]],
         extra={"target_sensitivity": 0.8}, swap_match=_LOOK_SWAPPED),
    # ------------------------------------------------------------------ thresholded (class indices)
    Case("sensitivity", metrics.sensitivity, Y_BIN, "y_pred", PRED_BIN, skm.recall_score(Y_BIN, PRED_BIN)),
    Case("recall", metrics.recall, Y_BIN, "y_pred", PRED_BIN, skm.recall_score(Y_BIN, PRED_BIN)),
    Case("specificity", metrics.specificity, Y_BIN, "y_pred", PRED_BIN,
         skm.recall_score(Y_BIN, PRED_BIN, pos_label=0)),
    Case("precision", metrics.precision, Y_BIN, "y_pred", PRED_BIN, skm.precision_score(Y_BIN, PRED_BIN)),
    Case("f1", metrics.f1, Y_BIN, "y_pred", PRED_BIN, skm.f1_score(Y_BIN, PRED_BIN), symmetric=True),
    Case("sensitivity_macro", metrics.sensitivity, Y_MC, "y_pred", PRED_MC,
         skm.recall_score(Y_MC, PRED_MC, average="macro"), extra={"num_classes": 3}),
    Case("precision_macro", metrics.precision, Y_MC, "y_pred", PRED_MC,
         skm.precision_score(Y_MC, PRED_MC, average="macro"), extra={"num_classes": 3}),
    Case("balanced_accuracy", metrics.balanced_accuracy, Y_MC, "y_pred", PRED_MC,
         skm.balanced_accuracy_score(Y_MC, PRED_MC), extra={"num_classes": 3}),
    Case("confusion_matrix", metrics.confusion_matrix, Y_MC, "y_pred", PRED_MC,
         skm.confusion_matrix(Y_MC, PRED_MC, labels=range(3)), extra={"num_classes": 3}),
    Case("cohen_kappa", metrics.cohen_kappa, Y_MC, "y_pred", PRED_MC,
         skm.cohen_kappa_score(Y_MC, PRED_MC, weights="linear"), extra={"num_classes": 3, "weights": "linear"},
         symmetric=True),
    Case("fbeta", metrics.fbeta, Y_BIN, "y_pred", PRED_BIN, skm.fbeta_score(Y_BIN, PRED_BIN, beta=2.0),
         extra={"beta": 2.0}),
    Case("fbeta_macro", metrics.fbeta, Y_MC, "y_pred", PRED_MC, skm.fbeta_score(Y_MC, PRED_MC, beta=0.5, average="macro"),
         extra={"beta": 0.5, "num_classes": 3}),
    Case("npv", metrics.npv, Y_BIN, "y_pred", PRED_BIN, skm.precision_score(Y_BIN, PRED_BIN, pos_label=0)),
    Case("fpr", metrics.fpr, Y_BIN, "y_pred", PRED_BIN, 1 - skm.recall_score(Y_BIN, PRED_BIN, pos_label=0)),
    Case("fnr", metrics.fnr, Y_BIN, "y_pred", PRED_BIN, 1 - skm.recall_score(Y_BIN, PRED_BIN)),
    Case("fdr", metrics.fdr, Y_BIN, "y_pred", PRED_BIN, 1 - skm.precision_score(Y_BIN, PRED_BIN)),
    Case("informedness", metrics.informedness, Y_MC, "y_pred", PRED_MC, _INFORMEDNESS_MC, extra={"num_classes": 3}),
    Case("markedness", metrics.markedness, Y_MC, "y_pred", PRED_MC, _MARKEDNESS_MC, extra={"num_classes": 3}),
    Case("mcc", metrics.mcc, Y_MC, "y_pred", PRED_MC, skm.matthews_corrcoef(Y_MC, PRED_MC), extra={"num_classes": 3},
         symmetric=True),
    # ------------------------------------------------------------------ probabilities
    Case("accuracy", metrics.accuracy, Y_MC, "y_prob", PROB_MC, skm.accuracy_score(Y_MC, PROB_MC.argmax(1)),
         swap_match=_LOOK_SWAPPED),
    Case("roc_auc_ovr", metrics.roc_auc_ovr, Y_MC, "y_score", PROB_MC,
         skm.roc_auc_score(Y_MC, PROB_MC, multi_class="ovr"), swap_match=_LOOK_SWAPPED),
    Case("roc_auc_ovr_micro", metrics.roc_auc_ovr, Y_MC, "y_score", PROB_MC,
         skm.roc_auc_score(Y_MC, PROB_MC, multi_class="ovr", average="micro"), extra={"average": "micro"},
         swap_match=_LOOK_SWAPPED),
    Case("classification_metrics_binary", metrics.classification_metrics, Y_BIN, "y_prob", SCORE_BIN,
         [skm.accuracy_score(Y_BIN, SCORE_BIN >= 0.6), skm.recall_score(Y_BIN, SCORE_BIN >= 0.6),
          skm.recall_score(Y_BIN, SCORE_BIN >= 0.6, pos_label=0), skm.precision_score(Y_BIN, SCORE_BIN >= 0.6),
          skm.f1_score(Y_BIN, SCORE_BIN >= 0.6), skm.balanced_accuracy_score(Y_BIN, SCORE_BIN >= 0.6),
          skm.cohen_kappa_score(Y_BIN, SCORE_BIN >= 0.6), skm.roc_auc_score(Y_BIN, SCORE_BIN),
          skm.average_precision_score(Y_BIN, SCORE_BIN)],
         extract=_binary_summary, kw_only={"task": "binary", "threshold": 0.6}, swap_match=_LOOK_SWAPPED),
    Case("classification_metrics_multiclass", metrics.classification_metrics, Y_MC, "y_prob", PROB_MC,
         [skm.accuracy_score(Y_MC, PROB_MC.argmax(1)), skm.balanced_accuracy_score(Y_MC, PROB_MC.argmax(1)),
          skm.recall_score(Y_MC, PROB_MC.argmax(1), average="macro"),
          skm.precision_score(Y_MC, PROB_MC.argmax(1), average="macro"),
          skm.f1_score(Y_MC, PROB_MC.argmax(1), average="macro"), skm.cohen_kappa_score(Y_MC, PROB_MC.argmax(1)),
          skm.cohen_kappa_score(Y_MC, PROB_MC.argmax(1), weights="quadratic"),
          skm.roc_auc_score(Y_MC, PROB_MC, multi_class="ovr"),
          skm.roc_auc_score(Y_MC, PROB_MC, multi_class="ovr", average="micro")],
         extract=_multiclass_summary, kw_only={"task": "multi-class"}, swap_match=_LOOK_SWAPPED),
    Case("classification_metrics_multilabel", metrics.classification_metrics, Y_ML, "y_prob", PROB_ML,
         [skm.accuracy_score(Y_ML, PROB_ML >= 0.5), skm.recall_score(Y_ML, PROB_ML >= 0.5, average="macro"),
          skm.precision_score(Y_ML, PROB_ML >= 0.5, average="macro"),
          skm.f1_score(Y_ML, PROB_ML >= 0.5, average="macro"), skm.roc_auc_score(Y_ML, PROB_ML),
          skm.roc_auc_score(Y_ML, PROB_ML, average="micro"), skm.average_precision_score(Y_ML, PROB_ML)],
         extract=_multilabel_summary, kw_only={"task": "multi-label"}, swap_match=_LOOK_SWAPPED),
    # ------------------------------------------------------------------ calibration
    Case("calibration_curve", metrics.calibration_curve, _CORRECT_MC, "y_prob", _CONF_MC,
         np.concatenate([_SK_CAL[1], _SK_CAL[0]]),
         extract=lambda r: np.concatenate([r[0][r[2] > 0], r[1][r[2] > 0]]), extra={"num_bins": 4},
         swap_match=_LOOK_SWAPPED),
    Case("confidence_and_correct", metrics.confidence_and_correct, Y_MC, "y_prob", PROB_MC,
         skm.accuracy_score(Y_MC, PROB_MC.argmax(1)), extract=lambda r: np.mean(r[1]), swap_match=_LOOK_SWAPPED),
    Case("expected_calibration_error", metrics.expected_calibration_error, Y_MC, "y_prob", PROB_MC,
         _ece_sklearn(_CORRECT_MC, _CONF_MC, 4), extra={"num_bins": 4}, swap_match=_LOOK_SWAPPED),
    Case("expected_calibration_error_binary", metrics.expected_calibration_error, Y_BIN, "y_prob", SCORE_BIN,
         _ece_sklearn((SCORE_BIN >= 0.5) == Y_BIN, np.maximum(SCORE_BIN, 1 - SCORE_BIN), 4),
         extra={"num_bins": 4}, swap_match=_LOOK_SWAPPED),
    # ------------------------------------------------------------------ regression
    Case("regression_metrics", metrics.regression_metrics, Y_REG, "y_pred", PRED_REG,
         [skm.mean_absolute_error(Y_REG, PRED_REG), skm.root_mean_squared_error(Y_REG, PRED_REG),
          np.mean(PRED_REG - Y_REG)],
         extract=lambda r: [r["mae"], r["rmse"], r["bland_altman_bias"]]),
    # ------------------------------------------------------------------ counts and segmentation
    Case("confusion_counts", metrics.confusion_counts, Y_MC[None], "y_pred", _one_hot_logits(PRED_MC, 3)[None],
         skm.confusion_matrix(Y_MC, PRED_MC, labels=range(3)), extract=np.asarray, extra={"num_classes": 3},
         swap_match=_LOOK_SWAPPED),
    Case("confusion_counts_classes", metrics.confusion_counts, Y_MC[None], "y_pred", PRED_MC[None],
         skm.confusion_matrix(Y_MC, PRED_MC, labels=range(3)), extract=np.asarray, extra={"num_classes": 3}),
    Case("segmentation_counts", metrics.segmentation_counts, REF_LABEL[None], "logits",
         _one_hot_logits(PRED_LABEL, 3)[None],
         np.stack([np.diag(_SEG_CM), _SEG_CM.sum(0), _SEG_CM.sum(1)], -1), extract=lambda r: np.asarray(r)[0],
         swap_match=_LOOK_SWAPPED),
    Case("segmentation_case_metrics", metrics.segmentation_case_metrics, REF_LABEL, "y_pred", PRED_LABEL,
         np.concatenate([skm.f1_score(_SEG_TRUE, _SEG_PRED, **_SEG_AVG),
                         skm.jaccard_score(_SEG_TRUE, _SEG_PRED, **_SEG_AVG),
                         skm.precision_score(_SEG_TRUE, _SEG_PRED, **_SEG_AVG),
                         skm.recall_score(_SEG_TRUE, _SEG_PRED, **_SEG_AVG),
                         (_SEG_CM.sum(0) - _SEG_CM.sum(1)) * 2.0 / 1000]),
         extract=lambda r: np.concatenate([r[k] for k in ("dice", "iou", "precision", "recall", "volume_diff_ml")]),
         extra={"num_classes": 3, "spacing_mm": SPACING}),
    Case("surface_distances", metrics.surface_distances, REF_MASK, "y_pred", PRED_MASK,
         np.concatenate([np.sort(_PRED_TO_REF), [-1.0], np.sort(_REF_TO_PRED)]),
         extract=lambda r: np.concatenate([np.sort(r[0]), [-1.0], np.sort(r[1])]), extra={"spacing_mm": SPACING}),
    Case("hausdorff_distance", metrics.hausdorff_distance, REF_MASK, "y_pred", PRED_MASK,
         max(_PRED_TO_REF.max(), _REF_TO_PRED.max()), extra={"spacing_mm": SPACING, "percentile": 100},
         symmetric=True),
    Case("average_surface_distance", metrics.average_surface_distance, REF_MASK, "y_pred", PRED_MASK,
         np.concatenate([_PRED_TO_REF, _REF_TO_PRED]).mean(), extra={"spacing_mm": SPACING}, symmetric=True),
    Case("normalized_surface_dice", metrics.normalized_surface_dice, REF_MASK, "y_pred", PRED_MASK, _NSD,
         extra={"spacing_mm": SPACING, "tolerance_mm": _NSD_TOLERANCE}, symmetric=True),
    Case("binary_case_metrics", metrics.binary_case_metrics, REF_MASK, "y_pred", PRED_MASK,
         [skm.f1_score(_MASK_TRUE, _MASK_PRED), skm.jaccard_score(_MASK_TRUE, _MASK_PRED),
          skm.precision_score(_MASK_TRUE, _MASK_PRED), skm.recall_score(_MASK_TRUE, _MASK_PRED)],
         extract=lambda r: [r[k] for k in ("dice", "iou", "precision", "recall")], extra={"spacing_mm": SPACING}),
    Case("multilabel_case_metrics", metrics.multilabel_case_metrics, REF_REGIONS, "y_pred", PRED_REGIONS,
         np.concatenate([skm.f1_score(_REGION_TRUE, _REGION_PRED, average=None),
                         skm.recall_score(_REGION_TRUE, _REGION_PRED, average=None)]),
         extract=lambda r: np.concatenate([r["dice"], r["recall"]]), extra={"spacing_mm": SPACING}),
    Case("multilabel_segmentation_counts", metrics.multilabel_segmentation_counts, REF_REGIONS[None], "logits",
         (4.0 * PRED_REGIONS - 2.0).astype(np.float32)[None],
         np.stack([(_REGION_TRUE & _REGION_PRED).sum(0), _REGION_PRED.sum(0), _REGION_TRUE.sum(0)], -1),
         extract=lambda r: np.asarray(r)[0]),
]


def _values(result):
  return np.asarray(result, np.float64).ravel()


def _assert_close(actual, expected):
  actual, expected = _values(actual), _values(expected)
  assert actual.shape == expected.shape, (actual, expected)
  np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


def _differs(actual, expected) -> bool:
  actual, expected = _values(actual), _values(expected)
  return actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-9, atol=1e-12,
                                                            equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_sklearn_order_positional_and_keyword(case):
  positional = case.fn(case.y_true, case.second, *case.extra.values(), **case.kw_only)
  _assert_close(case.extract(positional), case.expected)
  keyword = case.fn(**{"y_true": case.y_true, case.second_name: case.second}, **case.extra, **case.kw_only)
  _assert_close(case.extract(keyword), case.expected)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_swapped_arguments_are_detected_or_differ(case):
  """The examples are chosen so that the old (prediction-first) order cannot pass unnoticed."""
  if case.swap_match is not None:
    with pytest.raises(ValueError, match=case.swap_match):
      case.fn(case.second, case.y_true, *case.extra.values(), **case.kw_only)
    return
  swapped = case.extract(case.fn(case.second, case.y_true, *case.extra.values(), **case.kw_only))
  if case.symmetric:
    _assert_close(swapped, case.expected)
  else:
    assert _differs(swapped, case.expected)


def test_every_exported_metric_with_two_arrays_is_covered():
  covered = {case.fn for case in CASES}
  single_input = {"dice_per_case", "iou_per_case", "generalized_dice_score", "per_class_metrics", "fbeta_per_class",
                  "mcc_from_confusion", "bootstrap_ci", "subgroup_report"}  # tested below or in their own modules
  missing = [name for name in metrics.__all__ if name not in single_input and getattr(metrics, name) not in covered]
  assert not missing


def test_bootstrap_and_subgroups_pass_arrays_in_order():
  """The generic summaries hand their arrays to the metric positionally, so (y_true, y_score) stays in order."""
  result = metrics.bootstrap_ci(metrics.roc_auc, Y_BIN, SCORE_BIN, num_samples=20, seed=0)
  assert result["value"] == pytest.approx(skm.roc_auc_score(Y_BIN, SCORE_BIN))
  with pytest.raises(ValueError, match=_LOOK_SWAPPED):
    metrics.bootstrap_ci(metrics.roc_auc, SCORE_BIN, Y_BIN, num_samples=5)
  site = np.array(["a"] * 5 + ["b"] * 5)
  report = metrics.subgroup_report({"recall": metrics.sensitivity}, (Y_BIN, PRED_BIN), site)
  for group in ("a", "b"):
    rows = site == group
    assert report["groups"][group]["recall"] == pytest.approx(skm.recall_score(Y_BIN[rows], PRED_BIN[rows]))


def test_swap_guards_do_not_misfire():
  # Hard 0/1 predictions are valid scores: no "swapped" error when y_true is binary.
  assert metrics.roc_auc(Y_BIN, PRED_BIN) == pytest.approx(skm.roc_auc_score(Y_BIN, PRED_BIN))
  # A non-binary y_true with non-binary scores is a plain input error, not a swap.
  with pytest.raises(ValueError, match="binary values") as error:
    metrics.roc_auc(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))
  assert _LOOK_SWAPPED not in str(error.value)
  # Two binary arrays cannot be told apart: the documented order is the only guide.
  assert metrics.sensitivity(Y_BIN, PRED_BIN) != metrics.sensitivity(PRED_BIN, Y_BIN)
