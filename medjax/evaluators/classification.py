"""Classification evaluator: binary, multi-class and multi-label (ChestMNIST-style) tasks."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics
from medjax.metrics.calibration import confidence_and_correct
from medjax.evaluators import reporting
from medjax.evaluators.base import EVALUATORS, check_shapes, input_checks, raise_on_bad_input
from medjax.typing import Metrics

TASKS = ("binary", "multi-class", "multi-label")
_WHAT = "classification evaluator"


@EVALUATORS.register("classification")
class ClassificationEvaluator:
  """Summary metrics of `metrics.classification_metrics`: accuracy, balanced_accuracy, sensitivity,
  specificity, precision, f1, npv, fpr, fnr, fdr, informedness, markedness, mcc, auc (macro one-vs-rest
  beyond two classes), pr_auc, ece, num_cases, per task kappa / auc_micro / auc_weighted / subset_accuracy,
  and "f<beta>" for each of `betas`.

  The task follows the labels unless `task` is given: labels (B,) with 2 classes -> "binary" (threshold on
  the class-1 probability), (B,) with more -> "multi-class" (argmax), (B, K) 0/1 -> "multi-label" (one
  sigmoid per label, as ChestMNIST's 14 findings). Outputs are logits (B, K) with K = info.num_classes.

  Args:
    info: the dataset's `DatasetInfo`.
    task: None (from the labels) or one of TASKS.
    threshold: decision threshold on the positive probability for binary and multi-label tasks.
    betas: F-beta scores to report ("f2" for beta 2; positive class, or macro), e.g. (2.0,) for screening,
      where a miss costs more than a false alarm.
  """

  def __init__(self, info, task: Optional[str] = None, threshold: float = 0.5, betas: Sequence[float] = ()):
    if task is not None and task not in TASKS:
      raise ValueError(f"{_WHAT}: task must be one of {TASKS} or None (from the labels), got {task!r}.")
    if not 0.0 < float(threshold) < 1.0:
      raise ValueError(f"{_WHAT}: threshold must lie in (0, 1), got {threshold}.")
    self.num_classes = int(info.num_classes)
    self.class_names = tuple(info.class_names)
    self.task = task
    self.threshold = float(threshold)
    self.betas = tuple(float(beta) for beta in betas)
    if any(not 0.0 < beta < np.inf for beta in self.betas):
      raise ValueError(f"{_WHAT}: every beta must be a positive number, got {tuple(betas)}.")
    if task == "binary" and self.num_classes != 2:
      raise ValueError(f"{_WHAT}: task 'binary' needs num_classes == 2, the dataset has {self.num_classes}.")

  def task_for(self, label_ndim: int) -> str:
    """The task given labels of rank `label_ndim` including the batch axis (1: class index, 2: multi-hot)."""
    if self.task is not None:
      return self.task
    if label_ndim == 2:
      return "multi-label"
    return "binary" if self.num_classes == 2 else "multi-class"

  # ---------------------------------------------------------------------------------------- device

  def stats_fn(self, outputs, aux, batch) -> Dict[str, jax.Array]:
    """outputs (B, K) logits -> "probs" (B, K) float32 (softmax, or sigmoid per label) and "label"."""
    del aux
    labels = batch["label"]
    task = self.task_for(labels.ndim)
    k = self.num_classes
    if task == "multi-label":
      check_shapes(outputs.shape, labels.shape, f"logits (B, {k}) and multi-hot labels (B, {k})", _WHAT,
                   outputs.shape == labels.shape and outputs.shape[-1] == k)
      probs = jax.nn.sigmoid(outputs.astype(jnp.float32))
    else:
      check_shapes(outputs.shape, labels.shape, f"logits (B, {k}) and class labels (B,)", _WHAT,
                   outputs.ndim == 2 and outputs.shape[-1] == k and labels.shape == outputs.shape[:1])
      probs = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
    range_limit = 2 if task == "multi-label" else k
    return {"probs": probs, "label": labels, **input_checks(outputs, labels, range_limit)}

  # ---------------------------------------------------------------------------------------- host

  def _checked(self, stats, ids=None):
    probs, labels = np.asarray(stats["probs"], np.float64), np.asarray(stats["label"])
    task = self.task_for(labels.ndim)
    raise_on_bad_input(stats, _WHAT, 2 if task == "multi-label" else self.num_classes, ids)
    if probs.ndim != 2 or probs.shape[1] != self.num_classes or len(probs) != len(labels):
      raise ValueError(f"{_WHAT}: probs must be (N, {self.num_classes}) with one row per label, got probs "
                       f"{probs.shape} and labels {labels.shape}.")
    if not np.all(np.isfinite(probs)):
      bad = ~np.all(np.isfinite(probs), axis=1)
      raise ValueError(f"{_WHAT}: {int(bad.sum())} of {len(bad)} cases have NaN/inf probabilities "
                       f"(first at position {int(np.argmax(bad))}).")
    return probs, labels, task

  def _summarize(self, probs, labels, task) -> Metrics:
    return metrics.classification_metrics(labels, probs, task=task, threshold=self.threshold, betas=self.betas)

  def summarize(self, stats) -> Metrics:
    probs, labels, task = self._checked(stats)
    return self._summarize(probs, labels, task)

  def curves(self, probs: np.ndarray, labels: np.ndarray, task: str) -> dict:
    """Plot data: "roc" / "pr" {curve name: arrays + area}, "calibration", "confusion_matrix"."""
    if task == "binary":
      columns = {self.class_names[1]: (probs[:, 1], labels == 1)}
      confidence, correct = confidence_and_correct(labels, probs[:, 1])
      ece = metrics.expected_calibration_error(labels, probs[:, 1])
    elif task == "multi-class":
      columns = {name: (probs[:, k], labels == k) for k, name in enumerate(self.class_names)}
      confidence, correct = confidence_and_correct(labels, probs)
      ece = metrics.expected_calibration_error(labels, probs)
    else:  # every (case, label) decision pooled for calibration
      columns = {name: (probs[:, k], labels[:, k] == 1) for k, name in enumerate(self.class_names)}
      confidence, correct = confidence_and_correct(labels.ravel(), probs.ravel())
      ece = metrics.expected_calibration_error(labels.ravel(), probs.ravel())
    roc, pr = {}, {}
    for name, (scores, positives) in columns.items():
      fpr, tpr, thresholds = metrics.roc_curve(positives, scores)
      roc[name] = {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "auc": metrics.roc_auc(positives, scores)}
      precision, recall, thresholds = metrics.pr_curve(positives, scores)
      pr[name] = {"precision": precision, "recall": recall, "thresholds": thresholds,
                  "average_precision": metrics.average_precision(positives, scores)}
    bin_confidence, bin_accuracy, bin_count = metrics.calibration_curve(correct, confidence)
    if task == "multi-label":
      predicted = probs >= self.threshold
      confusion = {"rows": list(self.class_names), "columns": ["TN", "FP", "FN", "TP"],
                   "matrix": [metrics.confusion_matrix(labels[:, k], predicted[:, k], 2).ravel()
                              for k in range(self.num_classes)]}
    else:
      confusion = {"rows": list(self.class_names), "columns": list(self.class_names),
                   "matrix": metrics.confusion_matrix(labels, self.predictions(probs, task), self.num_classes)}
    return {"roc": roc, "pr": pr, "confusion_matrix": confusion,
            "calibration": {"confidence": bin_confidence, "accuracy": bin_accuracy, "count": bin_count,
                            "ece": ece}}

  def predictions(self, probs: np.ndarray, task: str) -> np.ndarray:
    """Predicted class (N,) (binary: class-1 probability >= threshold), or multi-hot (N, K)."""
    if task == "multi-class":
      return probs.argmax(axis=1)
    if task == "binary":
      return (probs[:, 1] >= self.threshold).astype(np.int64)
    return (probs >= self.threshold).astype(np.int64)

  def report(self, stats, ids: Sequence, metadata=None, *, num_samples: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> dict:
    """Metrics with bootstrap CIs, per-case table (label, prediction, probabilities), subgroups and the
    curve data; see `reporting.build_report`."""
    probs, labels, task = self._checked(stats, ids)
    predicted = self.predictions(probs, task)
    columns = {"label": labels, "prediction": predicted}
    columns.update({f"prob/{name}": probs[:, k] for k, name in enumerate(self.class_names)})
    columns["correct"] = (np.all(predicted == labels, axis=1) if task == "multi-label" else predicted == labels)
    report = reporting.build_report(
        task="classification", summarize=lambda p, y: self._summarize(p, y, task), arrays=(probs, labels),
        ids=ids, case_columns=columns, metadata=metadata, curves=self.curves(probs, labels, task),
        num_samples=num_samples, seed=seed, alpha=alpha, skip_ci=("num_cases",))
    report["classification_task"] = task
    report["threshold"] = self.threshold
    report["class_names"] = list(self.class_names)
    return report
