"""Classification metrics on host arrays (numpy).

Thresholded metrics come from the confusion matrix (rows = reference, columns = prediction). Per class,
a ratio whose denominator is zero is undefined and returned as NaN (e.g. precision of a class that is never
predicted, sensitivity of a class absent from the reference); macro averages are means over the classes
where the metric is defined. F1 = 2TP / (2TP + FP + FN) is 0, not NaN, for a class that is present in the
reference or predicted but never hit, so a classifier that never predicts a class is still penalised.
F-beta follows the same rule. The Matthews correlation coefficient is 0, not NaN, when a marginal of the
confusion matrix is constant (scikit-learn's convention). Binary tasks (two classes) report the positive
class, index 1. Arguments follow scikit-learn: the reference `y_true` first, then the predictions `y_pred`
(class indices) or probabilities `y_prob`.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from medjax.metrics import _checks, calibration, ranking


def accuracy(y_true, y_prob) -> float:
  """Top-1 accuracy in [0, 1], scikit-learn's `accuracy_score(y_true, y_prob.argmax(1))`.

  Args:
    y_true: (N,) class indices in [0, K).
    y_prob: (N, K) class probabilities or scores; the prediction is their argmax (threshold 0.5 for K = 2).
  """
  _checks.check_not_swapped_ranks(y_true, y_prob, "accuracy")
  probs = _checks.as_scores(y_prob, "y_prob", ndim=2)
  labels = _checks.as_labels(y_true, "y_true", probs.shape[1])
  _checks.same_length(y_true=labels, y_prob=probs)
  return float(np.mean(np.argmax(probs, axis=-1) == labels))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
  """(K, K) int64 counts; entry [i, j] counts cases of reference class i predicted as class j (scikit-learn's
  `confusion_matrix(y_true, y_pred, labels=range(num_classes))`).

  Args:
    y_true: (N,) reference class indices in [0, num_classes).
    y_pred: (N,) predicted class indices in [0, num_classes).
    num_classes: K.
  """
  labels = _checks.as_labels(y_true, "y_true", num_classes)
  preds = _checks.as_labels(y_pred, "y_pred", num_classes)
  _checks.same_shape(y_true=labels, y_pred=preds)
  flat = labels.ravel() * num_classes + preds.ravel()
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_ratio(numerator, denominator) -> np.ndarray:
  numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / denominator, np.nan)


def _one_vs_rest(cm: np.ndarray):
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  fn, fp = cm.sum(axis=1) - tp, cm.sum(axis=0) - tp
  return tp, fp, fn, cm.sum() - tp - fn - fp


def per_class_metrics(cm: np.ndarray) -> Dict[str, np.ndarray]:
  """One-vs-rest ratios per class from a (K, K) confusion matrix (rows reference, columns prediction).

  Returns: dict of (K,) float64 arrays, NaN where undefined (see the module docstring):
    sensitivity TP / (TP + FN), specificity TN / (TN + FP), precision (PPV) TP / (TP + FP),
    f1 2TP / (2TP + FP + FN), npv TN / (TN + FN), fpr FP / (FP + TN) = 1 - specificity,
    fnr FN / (FN + TP) = 1 - sensitivity, fdr FP / (FP + TP) = 1 - precision,
    informedness (Youden's J, bookmaker informedness) sensitivity + specificity - 1, and
    markedness PPV + NPV - 1 (Powers 2011, "Evaluation: from precision, recall and F-measure to ROC,
    informedness, markedness and correlation", JMLT 2(1)).
  """
  tp, fp, fn, tn = _one_vs_rest(cm)
  result = {"sensitivity": _safe_ratio(tp, tp + fn), "specificity": _safe_ratio(tn, tn + fp),
            "precision": _safe_ratio(tp, tp + fp), "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
            "npv": _safe_ratio(tn, tn + fn), "fpr": _safe_ratio(fp, fp + tn), "fnr": _safe_ratio(fn, fn + tp),
            "fdr": _safe_ratio(fp, fp + tp)}
  result["informedness"] = result["sensitivity"] + result["specificity"] - 1.0
  result["markedness"] = result["precision"] + result["npv"] - 1.0
  return result


def fbeta_per_class(cm: np.ndarray, beta: float) -> np.ndarray:
  """F-beta = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP) per class from a (K, K) confusion matrix (van
  Rijsbergen 1979): recall weighs beta times as much as precision. (K,) float64, NaN for a class absent from
  both reference and prediction."""
  beta = float(beta)
  if not np.isfinite(beta) or beta <= 0:
    raise ValueError(f"beta must be a positive number, got {beta}.")
  tp, fp, fn, _ = _one_vs_rest(cm)
  b2 = beta * beta
  return _safe_ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


def mcc_from_confusion(cm: np.ndarray) -> float:
  """Matthews correlation coefficient of a (K, K) confusion matrix; for K > 2 Gorodkin's R_K (Comput. Biol.
  Chem. 28, 2004): (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), with c correct cases,
  s all cases, p_k predicted and t_k true counts of class k. 0.0 when a marginal is constant, as in
  scikit-learn."""
  cm = np.asarray(cm, np.float64)
  true, pred = cm.sum(axis=1), cm.sum(axis=0)
  total = cm.sum()
  covariance = np.trace(cm) * total - true @ pred
  denominator = (total**2 - pred @ pred) * (total**2 - true @ true)
  return float(covariance / np.sqrt(denominator)) if denominator > 0 else 0.0


def _nanmean(values: np.ndarray) -> float:
  defined = values[~np.isnan(values)]
  return float(defined.mean()) if defined.size else float("nan")


def _summary(name: str, y_true, y_pred, num_classes: int) -> float:
  values = per_class_metrics(confusion_matrix(y_true, y_pred, num_classes))[name]
  return float(values[1]) if num_classes == 2 else _nanmean(values)


def sensitivity(y_true, y_pred, num_classes: int = 2) -> float:
  """Sensitivity (recall, TP / (TP + FN)): of the positive class when num_classes is 2, else the macro mean
  (scikit-learn's `recall_score(y_true, y_pred)`, or with average="macro").

  Args: y_true, y_pred: (N,) reference and predicted class indices in [0, num_classes).
  """
  return _summary("sensitivity", y_true, y_pred, num_classes)


recall = sensitivity


def specificity(y_true, y_pred, num_classes: int = 2) -> float:
  """Specificity TN / (TN + FP); positive class when num_classes is 2, else the macro one-vs-rest mean.
  y_true, y_pred: (N,) reference and predicted class indices."""
  return _summary("specificity", y_true, y_pred, num_classes)


def precision(y_true, y_pred, num_classes: int = 2) -> float:
  """Precision (PPV, TP / (TP + FP)); positive class when num_classes is 2, else the macro mean
  (scikit-learn's `precision_score(y_true, y_pred)`). y_true, y_pred: (N,) class indices."""
  return _summary("precision", y_true, y_pred, num_classes)


def f1(y_true, y_pred, num_classes: int = 2) -> float:
  """F1 = 2TP / (2TP + FP + FN); positive class when num_classes is 2, else the macro mean (scikit-learn's
  `f1_score(y_true, y_pred)`). y_true, y_pred: (N,) class indices."""
  return _summary("f1", y_true, y_pred, num_classes)


def npv(y_true, y_pred, num_classes: int = 2) -> float:
  """Negative predictive value TN / (TN + FN); positive class when num_classes is 2, else the macro
  one-vs-rest mean. y_true, y_pred: (N,) reference and predicted class indices."""
  return _summary("npv", y_true, y_pred, num_classes)


def fpr(y_true, y_pred, num_classes: int = 2) -> float:
  """False positive rate FP / (FP + TN) = 1 - specificity; positive class when num_classes is 2, else the
  macro one-vs-rest mean. y_true, y_pred: (N,) class indices."""
  return _summary("fpr", y_true, y_pred, num_classes)


def fnr(y_true, y_pred, num_classes: int = 2) -> float:
  """False negative rate (miss rate) FN / (FN + TP) = 1 - sensitivity; positive class when num_classes is 2,
  else the macro mean. y_true, y_pred: (N,) class indices."""
  return _summary("fnr", y_true, y_pred, num_classes)


def fdr(y_true, y_pred, num_classes: int = 2) -> float:
  """False discovery rate FP / (FP + TP) = 1 - precision; positive class when num_classes is 2, else the macro
  mean. y_true, y_pred: (N,) class indices."""
  return _summary("fdr", y_true, y_pred, num_classes)


def informedness(y_true, y_pred, num_classes: int = 2) -> float:
  """Informedness (Youden's J) sensitivity + specificity - 1 in [-1, 1]; positive class when num_classes is
  2, else the macro one-vs-rest mean. y_true, y_pred: (N,) class indices."""
  return _summary("informedness", y_true, y_pred, num_classes)


def markedness(y_true, y_pred, num_classes: int = 2) -> float:
  """Markedness PPV + NPV - 1 in [-1, 1]; positive class when num_classes is 2, else the macro one-vs-rest
  mean. y_true, y_pred: (N,) class indices."""
  return _summary("markedness", y_true, y_pred, num_classes)


def fbeta(y_true, y_pred, beta: float, num_classes: int = 2) -> float:
  """F-beta score (`fbeta_per_class`); positive class when num_classes is 2, else the macro mean over the
  classes present in reference or prediction (scikit-learn's `fbeta_score(y_true, y_pred, beta=beta)`, or
  with average="macro"). y_true, y_pred: (N,) class indices; beta > 0 (2 favours recall, 0.5 precision)."""
  values = fbeta_per_class(confusion_matrix(y_true, y_pred, num_classes), beta)
  return float(values[1]) if num_classes == 2 else _nanmean(values)


def mcc(y_true, y_pred, num_classes: int = 2) -> float:
  """Matthews correlation coefficient in [-1, 1] (Matthews 1975; multi-class R_K of Gorodkin 2004), see
  `mcc_from_confusion`; scikit-learn's `matthews_corrcoef(y_true, y_pred)`. y_true, y_pred: (N,) class
  indices in [0, num_classes)."""
  return mcc_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


matthews_corrcoef = mcc


def balanced_accuracy(y_true, y_pred, num_classes: int) -> float:
  """Mean per-class sensitivity over the classes present in the reference (Brodersen et al., ICPR 2010;
  scikit-learn's `balanced_accuracy_score(y_true, y_pred)`). y_true, y_pred: (N,) class indices."""
  return _nanmean(per_class_metrics(confusion_matrix(y_true, y_pred, num_classes))["sensitivity"])


def cohen_kappa(y_true, y_pred, num_classes: int, weights: Optional[str] = None) -> float:
  """Cohen's kappa, 1 - sum(W * O) / sum(W * E), with O the observed confusion matrix and E the one expected
  from its marginals by chance (Cohen 1960; weighted form Cohen 1968); scikit-learn's
  `cohen_kappa_score(y_true, y_pred, weights=weights)`.

  Args:
    y_true, y_pred: (N,) reference and predicted class indices.
    weights: None (disagreement 1 off the diagonal), "linear" (|i - j|) or "quadratic" ((i - j)^2), with
      class indices taken as ordinal.
  Returns: kappa in [-1, 1]; NaN when chance disagreement is zero (e.g. a single class everywhere).
  """
  observed = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
  expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
  distance = np.abs(np.subtract.outer(np.arange(num_classes), np.arange(num_classes))).astype(np.float64)
  if weights is None:
    w = (distance > 0).astype(np.float64)
  elif weights == "linear":
    w = distance
  elif weights == "quadratic":
    w = distance**2
  else:
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}.")
  chance = np.sum(w * expected)
  return float(1.0 - np.sum(w * observed) / chance) if chance > 0 else float("nan")


def roc_auc_ovr(y_true, y_score, average: str = "macro") -> float:
  """ROC-AUC of class probabilities: the positive-class AUC for K = 2; else one-vs-rest, "macro" (mean of
  per-class AUCs over classes present, as MedMNIST reports it; scikit-learn's `roc_auc_score(y_true, y_score,
  multi_class="ovr")` when every class is present), "weighted" (per-class AUCs weighted by class prevalence;
  scikit-learn's average="weighted") or "micro" (all one-vs-rest decisions pooled).

  Args:
    y_true: (N,) class indices in [0, K).
    y_score: (N, K) class probabilities or scores.
    average: "macro", "weighted" or "micro".
  """
  _checks.check_not_swapped_ranks(y_true, y_score, "roc_auc_ovr", "y_score")
  probs = _checks.as_scores(y_score, "y_score", ndim=2)
  labels = _checks.as_labels(y_true, "y_true", probs.shape[1])
  _checks.same_length(y_true=labels, y_score=probs)
  if probs.shape[-1] == 2:
    return ranking.roc_auc(labels == 1, probs[:, 1])
  return ranking.averaged(ranking.roc_auc, np.eye(probs.shape[1], dtype=bool)[labels], probs, average)


def _thresholded(per_class: Dict[str, np.ndarray], cm: np.ndarray, betas: Sequence[float], pick) -> Dict[str, float]:
  """The confusion-matrix summaries, each reduced by `pick` (positive class, or macro mean)."""
  result = {name: pick(values) for name, values in per_class.items()}
  result.update({_fbeta_key(beta): pick(fbeta_per_class(cm, beta)) for beta in betas})
  return result


def _fbeta_key(beta: float) -> str:
  return f"f{float(beta):g}"


def _binary_metrics(positives, scores, threshold, betas) -> Dict[str, float]:
  preds = (scores >= threshold).astype(np.int64)
  labels = positives.astype(np.int64)
  cm = confusion_matrix(labels, preds, 2)
  per_class = per_class_metrics(cm)
  result = _thresholded(per_class, cm, betas, lambda values: float(values[1]))
  result.update(
      accuracy=float(np.mean(preds == labels)),
      balanced_accuracy=_nanmean(per_class["sensitivity"]), mcc=mcc_from_confusion(cm),
      auc=ranking.roc_auc(positives, scores), pr_auc=ranking.average_precision(positives, scores),
      kappa=cohen_kappa(labels, preds, 2), ece=calibration.expected_calibration_error(positives, scores))
  return result


def _multiclass_metrics(labels, probs, betas) -> Dict[str, float]:
  num_classes = probs.shape[1]
  preds = probs.argmax(axis=1)
  cm = confusion_matrix(labels, preds, num_classes)
  one_hot = np.eye(num_classes, dtype=bool)[labels]
  result = _thresholded(per_class_metrics(cm), cm, betas, _nanmean)
  result.update(
      accuracy=float(np.mean(preds == labels)), balanced_accuracy=result["sensitivity"],
      mcc=mcc_from_confusion(cm),
      auc=ranking.averaged(ranking.roc_auc, one_hot, probs, "macro"),
      auc_micro=ranking.averaged(ranking.roc_auc, one_hot, probs, "micro"),
      auc_weighted=ranking.averaged(ranking.roc_auc, one_hot, probs, "weighted"),
      pr_auc=ranking.averaged(ranking.average_precision, one_hot, probs, "macro"),
      pr_auc_micro=ranking.averaged(ranking.average_precision, one_hot, probs, "micro"),
      kappa=cohen_kappa(labels, preds, num_classes),
      kappa_linear=cohen_kappa(labels, preds, num_classes, "linear"),
      kappa_quadratic=cohen_kappa(labels, preds, num_classes, "quadratic"),
      ece=calibration.expected_calibration_error(labels, probs))
  return result


def _multilabel_metrics(positives, probs, threshold, betas) -> Dict[str, float]:
  preds = probs >= threshold
  matrices = [confusion_matrix(positives[:, k], preds[:, k], 2) for k in range(probs.shape[1])]
  per_label = [per_class_metrics(cm) for cm in matrices]
  result = {name: _nanmean(np.array([values[name][1] for values in per_label])) for name in per_label[0]}
  result.update({_fbeta_key(beta): _nanmean(np.array([fbeta_per_class(cm, beta)[1] for cm in matrices]))
                 for beta in betas})
  # Per label, balanced accuracy is (sensitivity + specificity) / 2; NaN for a label with a single class.
  balanced = np.array([(values["sensitivity"][1] + values["specificity"][1]) / 2 for values in per_label])
  result.update(
      accuracy=float(np.mean(preds == positives)), subset_accuracy=float(np.mean(np.all(preds == positives, 1))),
      balanced_accuracy=_nanmean(balanced), mcc=float(np.mean([mcc_from_confusion(cm) for cm in matrices])),
      auc=ranking.averaged(ranking.roc_auc, positives, probs, "macro"),
      auc_micro=ranking.averaged(ranking.roc_auc, positives, probs, "micro"),
      auc_weighted=ranking.averaged(ranking.roc_auc, positives, probs, "weighted"),
      pr_auc=ranking.averaged(ranking.average_precision, positives, probs, "macro"),
      pr_auc_micro=ranking.averaged(ranking.average_precision, positives, probs, "micro"),
      ece=calibration.expected_calibration_error(positives.ravel(), probs.ravel()))
  return result


def classification_metrics(y_true, y_prob, *, task: str = "multi-class", threshold: float = 0.5,
                           betas: Sequence[float] = ()) -> Dict[str, float]:
  """Every summary metric of one split, as plain floats.

  Args:
    y_true: (N,) {0, 1} for binary, (N,) class indices for multi-class, (N, K) {0, 1} for multi-label.
    y_prob: "binary": (N,) positive-class probabilities or (N, 2); "multi-class": (N, K); "multi-label":
      (N, K) independent per-label probabilities.
    task: "binary", "multi-class" or "multi-label".
    threshold: decision threshold on the positive probability (binary, multi-label); multi-class uses argmax.
    betas: F-beta scores to add, one key "f<beta>" each ("f2", "f0.5").
  Returns: accuracy, balanced_accuracy, sensitivity, specificity, precision, f1, npv, fpr, fnr, fdr,
    informedness, markedness (positive class, or macro over classes / labels), mcc (binary; multi-class R_K;
    macro over labels for multi-label), auc, pr_auc (ROC-AUC and average precision; macro one-vs-rest for
    multi-class/-label), ece and num_cases; binary and multi-class add kappa; multi-class adds kappa_linear,
    kappa_quadratic, auc_micro, auc_weighted and pr_auc_micro; multi-label adds subset_accuracy (all labels
    right), auc_micro, auc_weighted and pr_auc_micro.
  """
  fn = "classification_metrics"
  _checks.check_not_swapped_ranks(y_true, y_prob, fn)
  probs = _checks.as_scores(y_prob, "y_prob", ndim=(1, 2))
  num_cases = _checks.same_length(y_true=y_true, y_prob=probs)
  if task == "binary":
    if probs.ndim == 2:
      if probs.shape[1] != 2:
        raise ValueError(f"binary task: y_prob must be (N,) or (N, 2), got {probs.shape}.")
      probs = probs[:, 1]
    result = _binary_metrics(_checks.binary_truth(y_true, probs, fn, "y_prob"), probs, threshold, betas)
  elif task == "multi-class":
    if probs.ndim != 2:
      raise ValueError(f"multi-class task: y_prob must be (N, K), got {probs.shape}.")
    result = _multiclass_metrics(_checks.as_labels(y_true, "y_true", probs.shape[1]), probs, betas)
  elif task == "multi-label":
    positives = _checks.binary_truth(y_true, probs, fn, "y_prob")
    _checks.same_shape(y_true=positives, y_prob=probs)
    if probs.ndim != 2:
      raise ValueError(f"multi-label task: y_true and y_prob must be (N, K), got {probs.shape}.")
    result = _multilabel_metrics(positives, probs, threshold, betas)
  else:
    raise ValueError(f"task must be 'binary', 'multi-class' or 'multi-label', got {task!r}.")
  result["num_cases"] = float(num_cases)
  return result
