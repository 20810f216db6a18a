"""Knowledge distillation losses: softened-softmax KL to a teacher (Hinton, Vinyals & Dean 2015), per example for
classification and per voxel for segmentation, and feature matching (FitNets, Romero et al. 2015).

The teacher's outputs and features arrive in aux (`medjax.models.distillation.Distilled` puts them there), so the
objective keeps the house signature `objective(outputs, aux, batch) -> (B,)`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from medjax.losses.objective import Objective
from medjax.typing import Array, Batch

TEACHER_OUTPUTS = "teacher_outputs"  # the aux names of medjax.models.distillation (losses import no models)
TEACHER_PREFIX = "teacher/"
PROJECTED_PREFIX = "projected/"


def softened_kl(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
  """T^2 KL(softmax(teacher / T) || softmax(student / T)) over the class axis (last), averaged over any spatial
  axes: `(B, [*spatial,] K)` logits -> `(B,)` float32 nats. The T^2 factor keeps the gradient's scale
  independent of T (Hinton et al. 2015, section 2). Raises ValueError for shape mismatches or K = 1."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"softened_kl: student outputs {student_logits.shape} and teacher outputs "
                     f"{teacher_logits.shape} differ; distillation needs the same classes (and, per voxel, the "
                     "same spatial shape).")
  if student_logits.shape[-1] < 2:
    raise ValueError("softened_kl: outputs have a single channel; distillation here needs softmax logits over "
                     ">= 2 classes.")
  if not temperature > 0:
    raise ValueError(f"softened_kl: temperature must be > 0, got {temperature}.")
  t = jnp.float32(temperature)
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return t * t * jnp.mean(kl.reshape(kl.shape[0], -1), axis=1)


def feature_mse(projected: Array, target: Array) -> Array:
  """Mean squared difference of the student's projected features and the teacher's, over every axis but the
  batch: `(B, ...)` -> `(B,)` float32."""
  diff = projected.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)


def distillation_objective(task_objective: Objective, *, temperature: float = 4.0, alpha: float = 0.9,
                           feature_keys: Sequence[str] = (), feature_weight: float = 1.0) -> Objective:
  """`objective(outputs, aux, batch) -> (B,)` float32:
  (1 - alpha) task + alpha softened_kl(outputs, aux["teacher_outputs"], T) + feature_weight * sum_k
  feature_mse(aux["projected/k"], aux["teacher/k"]).

  alpha = 0.9 and T = 4 are the knowledge-distillation baseline of Tian et al. 2020 (CRD); alpha = 0 trains
  on the task alone (with the teacher still run). Raises KeyError naming the missing aux entry (the model must
  be wrapped in `Distilled`)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distillation_objective: alpha must lie in [0, 1], got {alpha}.")
  if not feature_weight >= 0.0:
    raise ValueError(f"distillation_objective: feature_weight must be >= 0, got {feature_weight}.")
  keys = tuple(feature_keys)

  def objective(outputs: Any, aux: Mapping[str, Any], batch: Batch) -> Array:
    if TEACHER_OUTPUTS not in aux:
      raise KeyError(f"aux has no {TEACHER_OUTPUTS!r}: distillation needs the model wrapped in "
                     "medjax.models.distillation.Distilled (config.distillation).")
    task = jnp.asarray(task_objective(outputs, aux, batch), jnp.float32)
    total = (1.0 - jnp.float32(alpha)) * task + jnp.float32(alpha) * softened_kl(outputs, aux[TEACHER_OUTPUTS],
                                                                                 temperature)
    for key in keys:
      missing = [name for name in (PROJECTED_PREFIX + key, TEACHER_PREFIX + key) if name not in aux]
      if missing:
        raise KeyError(f"aux has no {missing[0]!r}: feature distillation of {key!r} needs Distilled(feature_keys="
                       f"(..., {key!r})).")
      total = total + jnp.float32(feature_weight) * feature_mse(aux[PROJECTED_PREFIX + key], aux[TEACHER_PREFIX + key])
    return total

  return objective


__all__ = ["distillation_objective", "feature_mse", "softened_kl"]
