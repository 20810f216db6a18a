"""Knowledge distillation: the softened KL against a numpy reference, the Distilled wrapper (student outputs
unchanged, teacher frozen and outside "params", features projected), and a distilled run end to end (teacher
weights in the state, bit-exact resume, `checkpoint.load` gives the student alone)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import build, checkpoint, config_lib, models, train
from medjax.compress import distillation
from medjax.losses.distillation import distillation_objective, feature_mse, softened_kl
from medjax.models.distillation import Distilled, student_variables
from tests.train_testing import run_straight_and_resumed

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_dp.py")


def _reference_kl(student, teacher, t):
  def log_softmax(z):
    z = z / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  p_t = np.exp(log_softmax(teacher))
  kl = (p_t * (log_softmax(teacher) - log_softmax(student))).sum(-1)
  return t * t * kl.reshape(kl.shape[0], -1).mean(1)


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 6, 4), (2, 3, 4, 5, 2)], ids=["classes", "2d_voxels", "3d_voxels"])
def test_softened_kl_matches_a_numpy_reference_per_example(shape):
  rng = np.random.default_rng(0)
  student = rng.normal(size=shape).astype(np.float32) * 3
  teacher = rng.normal(size=shape).astype(np.float32) * 3
  for t in (1.0, 4.0):
    np.testing.assert_allclose(softened_kl(jnp.asarray(student), jnp.asarray(teacher), t),
                               _reference_kl(student.astype(np.float64), teacher.astype(np.float64), t), rtol=2e-5,
                               atol=1e-6)
  np.testing.assert_allclose(softened_kl(jnp.asarray(teacher), jnp.asarray(teacher), 2.0), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="differ"):
    softened_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)
  with pytest.raises(ValueError, match="single channel"):
    softened_kl(jnp.zeros((2, 1)), jnp.zeros((2, 1)), 1.0)


def test_objective_mixes_task_kl_and_features():
  outputs = jnp.asarray([[2.0, -1.0], [0.5, 0.5]])
  aux = {"teacher_outputs": jnp.asarray([[1.0, 0.0], [0.0, 3.0]]),
         "projected/features": jnp.ones((2, 3)), "teacher/features": jnp.zeros((2, 3))}
  task = lambda o, a, b: jnp.asarray([1.0, 2.0])
  objective = distillation_objective(task, temperature=2.0, alpha=0.25, feature_keys=("features",),
                                     feature_weight=0.5)
  expected = 0.75 * np.asarray([1.0, 2.0]) + 0.25 * _reference_kl(np.asarray(outputs), np.asarray(
      aux["teacher_outputs"]), 2.0) + 0.5 * 1.0
  np.testing.assert_allclose(objective(outputs, aux, {}), expected, rtol=1e-6)
  np.testing.assert_allclose(feature_mse(jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))), [1.0, 1.0])
  with pytest.raises(KeyError, match="teacher_outputs"):
    distillation_objective(task)(outputs, {}, {})


def _tiny(width, stages=(1, 1, 1, 1)):
  return models.build_model("resnet18", dict(num_classes=3, width=width, stage_sizes=stages, norm="group",
                                             small_input=True))


def test_distilled_keeps_the_student_and_freezes_the_teacher():
  student, teacher = _tiny(4), _tiny(8)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 12, 10, 1))
  wrapped = Distilled(student=student, teacher=teacher, feature_keys=("features",))
  variables = wrapped.init({"params": jax.random.PRNGKey(0)}, x, train=False)
  assert set(variables) == {"params", "teacher"}
  assert set(variables["params"]) == {"student", "projection_features"}
  alone = student_variables(variables)
  np.testing.assert_array_equal(wrapped.apply(variables, x, train=False)[0], student.apply(alone, x, train=False)[0])
  outputs, aux = wrapped.apply(variables, x, train=True, mutable=["teacher"])[0]
  teacher_out, teacher_aux = teacher.apply(variables["teacher"]["variables"], x, train=False)
  np.testing.assert_array_equal(aux["teacher_outputs"], teacher_out)
  assert aux["projected/features"].shape == teacher_aux["features"].shape == (3, 64)
  np.testing.assert_array_equal(outputs, student.apply(alone, x, train=True)[0])
  assert "teacher_outputs" not in wrapped.apply(variables, x, train=False)[1]  # evaluation skips the teacher

  def loss(params):
    out, a = wrapped.apply({**variables, "params": params}, x, train=True, mutable=["teacher"])[0]
    return jnp.sum(out) + jnp.sum(a["teacher_outputs"])  # the teacher term carries no gradient
  grads = jax.grad(loss)(variables["params"])
  reference = jax.grad(lambda p: jnp.sum(student.apply({"params": p}, x, train=True)[0]))(alone["params"])
  for a, b in zip(jax.tree.leaves(grads["student"]), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(KeyError, match="'bottleneck' is missing from the student"):
    Distilled(student=student, teacher=teacher, feature_keys=("bottleneck",)).init(jax.random.PRNGKey(0), x,
                                                                                   train=False)


def test_options_name_the_key(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.distillation.teacher is required"):
    distillation.parse({})
  with pytest.raises(config_lib.ConfigError, match="unknown key 'temperatur'. Did you mean 'temperature'"):
    distillation.parse(dict(teacher="x", temperatur=2.0))
  with pytest.raises(config_lib.ConfigError, match="alpha must lie in"):
    distillation.parse(dict(teacher="x", alpha=1.5))
  with pytest.raises(config_lib.ConfigError, match=r"is not a run workdir \(no .*config.json\)"):
    distillation.teacher_config(distillation.parse(dict(teacher=str(tmp_path))))
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=8")
  config.distillation = dict(teacher=str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="cannot be combined with config.privacy"):
    build.validate(config)


def _config(eps_quick_width):
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=0")
  config.mesh = (("data", 1),)
  config.model.width = eps_quick_width
  return config


@pytest.mark.slow
def test_distilled_run_carries_the_teacher_resumes_exactly_and_loads_as_the_student(tmp_path, monkeypatch):
  teacher_dir = str(tmp_path / "teacher")
  train.main(_config(8), teacher_dir)
  config = _config(4)
  config.distillation = dict(teacher=teacher_dir, temperature=2.0, alpha=0.5)
  straight, resumed = run_straight_and_resumed(config, tmp_path, monkeypatch, at_step=2)
  assert (json.load(open(os.path.join(straight, "results.json")))["final"]
          == json.load(open(os.path.join(resumed, "results.json")))["final"])
  teacher = checkpoint.load(teacher_dir)
  ckpt = checkpoint.for_run(straight, read_only=True)
  try:
    kept = ckpt.restore_fields(("model_state",), step=4)["model_state"]["teacher"]["variables"]
  finally:
    ckpt.close()
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(teacher.variables)):  # unchanged by training
    np.testing.assert_array_equal(a, b)
  student = checkpoint.load(straight)
  assert type(student.model).__name__ == "ResNet18" and set(student.variables) == {"params"}
  assert student.model.width == 4 and not student.config.get("distillation")
  x = np.zeros((2, 16, 16, 1), np.float32)
  assert student.model.apply(student.variables, x, train=False)[0].shape == (2, 3)
