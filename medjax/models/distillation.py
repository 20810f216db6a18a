"""Knowledge distillation's model side: the student with a frozen teacher beside it, in one forward pass.

`Distilled(student, teacher)` computes the student's `(outputs, aux)` and, in training, the teacher's outputs
on the same (augmented) images, added to aux as "teacher_outputs" (and the teacher's aux features as
"teacher/<name>"), so that the distillation objective (`medjax.losses.distillation`) sees both inside the one
jitted step. The teacher runs in inference mode (`train=False`: its batch norms use their running statistics)
behind `stop_gradient`.

Where the teacher's weights live: in a collection of their own, "teacher" (`variables["teacher"]["variables"]`,
the teacher's whole `{"params": ..., "batch_stats": ...}`), so they travel in the train state's model_state: the
step receives them as an argument (arrays closed over by a jitted function are embedded in the program as
constants, about twice their size in HLO text), they are sharded and checkpointed with the run, and a resumed run
needs no teacher workdir. They are never differentiated (not "params"). `student_variables` takes the student
back out, which is what inference and export use.

Feature distillation (FitNets, Romero et al. 2015) on named aux features: `feature_keys` lists student aux names
whose teacher counterparts are matched; when the widths differ, a learned linear projection ("projection_<name>",
a Dense on the channel axis, i.e. a 1x1 convolution for maps) maps the student's features to the teacher's
width. The projections are trained with the student and dropped from `student_variables`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.base import submodule_variables

STUDENT = "student"
TEACHER_COLLECTION = "teacher"
TEACHER_OUTPUTS = "teacher_outputs"
TEACHER_PREFIX = "teacher/"
PROJECTED_PREFIX = "projected/"


class Distilled(nn.Module):
  """`student` trained against a frozen `teacher`; `__call__(x, *, train) -> (student outputs, aux)`.

  Attributes:
    student: the model being trained (any medjax model: `(outputs, aux)` from `(x, train=...)`).
    teacher: the teacher's model definition; its weights are the "teacher" collection (see the module doc).
    feature_keys: student aux names to match to the teacher's aux entries of the same name (feature
      distillation); empty for logit distillation only.
  In training, aux gains "teacher_outputs" (the teacher's outputs, float32, no gradient) and, per feature key k,
  "teacher/k" (the teacher's aux[k]) and "projected/k" (the student's aux[k] projected to the teacher's width).
  At evaluation (`train=False`, after init) the teacher does not run.
  """

  student: nn.Module
  teacher: nn.Module
  feature_keys: Sequence[str] = ()

  @nn.compact
  def __call__(self, x, *, train: bool) -> Tuple[Any, Dict[str, Any]]:
    outputs, aux = self.student(x, train=train)
    aux = dict(aux)
    # The teacher is applied as a separate (unbound) module on its own variables, not as a child: its
    # parameters must stay out of "params" (no gradient, no optimizer state).
    teacher = self.teacher.clone(parent=None)
    weights = self.variable(TEACHER_COLLECTION, "variables",
                            lambda: teacher.init(self.make_rng("params"), x, train=False))
    if not train and not self.is_initializing():  # the projections are created at init, which runs train=False
      return outputs, aux
    teacher_outputs, teacher_aux = teacher.apply(weights.value, x, train=False)
    aux[TEACHER_OUTPUTS] = jax.lax.stop_gradient(jnp.asarray(teacher_outputs, jnp.float32))
    for key in self.feature_keys:
      if key not in aux or key not in teacher_aux:
        raise KeyError(f"Distilled: feature {key!r} is missing from the "
                       f"{'student' if key not in aux else 'teacher'}'s aux (student aux: {sorted(aux)}, teacher "
                       f"aux: {sorted(teacher_aux)}).")
      target = jax.lax.stop_gradient(jnp.asarray(teacher_aux[key], jnp.float32))
      features = jnp.asarray(aux[key], jnp.float32)
      if features.shape[:-1] != target.shape[:-1]:
        raise ValueError(f"Distilled: feature {key!r} has shape {features.shape} in the student and {target.shape} "
                         "in the teacher; all axes but the channels must agree.")
      # Created even when the widths agree, so that the parameter tree does not depend on the teacher.
      projected = nn.Dense(target.shape[-1], name=f"projection_{key}")(features)
      aux[TEACHER_PREFIX + key] = target
      aux[PROJECTED_PREFIX + key] = projected
    return outputs, aux


def student_variables(variables: Mapping[str, Any]) -> Dict[str, Any]:
  """The student's own variables (`{"params": ..., "batch_stats": ...}` in its names) out of a Distilled's
  variables: no teacher, no feature projections. Raises ValueError when there is no params/student subtree."""
  return submodule_variables(variables, STUDENT, skip=TEACHER_COLLECTION, what="distillation student")


__all__ = ["PROJECTED_PREFIX", "STUDENT", "TEACHER_COLLECTION", "TEACHER_OUTPUTS", "TEACHER_PREFIX", "Distilled",
           "student_variables"]
