"""Classification evaluator: accuracy and ROC-AUC (binary, or one-vs-rest macro)."""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from medjax import metrics
from medjax.evaluators.base import EVALUATORS
from medjax.typing import Metrics


@EVALUATORS.register("classification")
class ClassificationEvaluator:
  """Metric names: "accuracy", "auc"."""

  def __init__(self, info):
    self.num_classes = int(info.num_classes)

  def stats_fn(self, outputs, aux, batch) -> Dict[str, jax.Array]:
    del aux
    return {"probs": jax.nn.softmax(outputs.astype(jnp.float32), axis=-1), "label": batch["label"]}

  def summarize(self, stats) -> Metrics:
    probs, labels = stats["probs"], stats["label"]
    return {"accuracy": metrics.accuracy(probs, labels), "auc": metrics.roc_auc_ovr(probs, labels),
            "num_cases": float(len(labels))}
