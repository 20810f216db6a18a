"""Tests for medjax.models.domain_adversarial: gradient reversal, the schedule, the step counter, the sign of
the gradients each part receives (against a hand computation), real models in 2D and 3D, and a short DANN
training run on a toy problem whose domain is visible in the input."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import models
from medjax.losses.domain import domain_accuracy, domain_adversarial_objective
from medjax.models import domain_adversarial as dann
from medjax.models.domain_adversarial import DomainAdversarial, gradient_reversal, reversal_coefficient
from tests.models.zoo_testing import host_variables

KEY = jax.random.PRNGKey(0)


class TinyEncoder(nn.Module):
  """Flatten -> Dense(F, no bias) as the features -> Dense(classes) as the outputs."""
  num_features: int = 3
  num_classes: int = 2
  hidden_act: bool = False

  @nn.compact
  def __call__(self, x, *, train):
    h = nn.Dense(self.num_features, use_bias=False, name="enc")(x.reshape(x.shape[0], -1))
    if self.hidden_act:
      h = nn.tanh(h)
    return nn.Dense(self.num_classes, name="cls")(h), {"features": h}


class NoFeatures(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    return nn.Dense(2)(x.reshape(x.shape[0], -1)), {"tokens": x}


def _zero_task(outputs, aux, batch):
  return jnp.zeros(outputs.shape[:1], jnp.float32)


# ------------------------------------------------------------------------------------ gradient reversal

@pytest.mark.parametrize("coefficient", [1.0, 0.25, 3.0])
def test_gradient_reversal_is_identity_forward_and_negates_scaled_gradient(coefficient):
  x = jnp.array([[1.5, -2.0, 0.5], [0.0, 4.0, -1.0]], jnp.float32)
  w = jnp.array([[2.0, -1.0, 3.0], [0.5, 1.0, -4.0]], jnp.float32)
  np.testing.assert_array_equal(gradient_reversal(x, jnp.float32(coefficient)), x)

  def f(x, c):
    return jnp.sum(w * gradient_reversal(x, c) ** 2)

  gx, gc = jax.jit(jax.grad(f, argnums=(0, 1)))(x, jnp.float32(coefficient))  # traced coefficient
  np.testing.assert_allclose(gx, -coefficient * 2.0 * w * x, rtol=1e-6)
  assert float(gc) == 0.0


def test_gradient_reversal_keeps_dtype():
  x = jnp.ones((2, 3), jnp.bfloat16)
  g = jax.grad(lambda x: jnp.sum(gradient_reversal(x, jnp.float32(0.5)).astype(jnp.float32)))(x)
  assert g.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(g, np.float32), -0.5)


# ------------------------------------------------------------------------------------ schedule

@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (50, 2.0 / (1.0 + math.exp(-5.0)) - 1.0), (100, 2.0 / (1.0 + math.exp(-10.0)) - 1.0),
    (250, 2.0 / (1.0 + math.exp(-10.0)) - 1.0)])  # past total_steps: p is clipped to 1
def test_ganin_schedule_values(step, expected):
  assert expected == pytest.approx({0: 0.0, 50: 0.9866143, 100: 0.9999092, 250: 0.9999092}[step], abs=1e-6)
  value = reversal_coefficient(jnp.int32(step), 100, schedule="ganin", coefficient=1.0)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(reversal_coefficient(step, 100, coefficient=0.3), 0.3 * expected, rtol=1e-6, atol=1e-7)


def test_constant_schedule_and_bad_schedule():
  for step in (0, 7, 10_000):
    np.testing.assert_allclose(reversal_coefficient(step, 10, schedule="constant", coefficient=0.7), 0.7)
  with pytest.raises(ValueError, match=r"schedule must be one of \('ganin', 'constant'\), got 'linear'"):
    reversal_coefficient(0, 10, schedule="linear")
  model = DomainAdversarial(TinyEncoder(), num_domains=2, total_steps=0)
  with pytest.raises(ValueError, match="total_steps must be positive"):
    model.init(KEY, jnp.ones((2, 4)), train=False)


# ------------------------------------------------------------------------------------ counter and structure

def test_counter_advances_in_train_mode_only():
  model = DomainAdversarial(TinyEncoder(), num_domains=3, total_steps=10, hidden_features=4, dropout_rate=0.5)
  x = jnp.ones((2, 4, 1))
  variables = model.init(KEY, x, train=True)  # init must not count, even with train=True
  assert set(variables) == {"params", dann.STEP_COLLECTION}
  assert set(variables["params"]) == {"model", "domain_classifier"}
  assert set(variables["params"]["model"]) == {"enc", "cls"}
  assert int(variables[dann.STEP_COLLECTION]["step"]) == 0
  assert variables[dann.STEP_COLLECTION]["step"].dtype == jnp.int32

  _, state = model.apply(variables, x, train=False, mutable=[dann.STEP_COLLECTION])
  assert int(state[dann.STEP_COLLECTION]["step"]) == 0
  rngs = {"dropout": jax.random.PRNGKey(1)}
  for expected in (1, 2, 3):
    (_, aux), state = model.apply({**variables, **state}, x, train=True, rngs=rngs, mutable=[dann.STEP_COLLECTION])
    assert int(state[dann.STEP_COLLECTION]["step"]) == expected
  chex.assert_shape(aux["domain_logits"], (2, 3))
  assert aux["domain_logits"].dtype == jnp.float32 and set(aux) == {"features", "domain_logits"}
  # Evaluation without a mutable collection works; a training pass that cannot count says so.
  model.apply(variables, x, train=False)
  with pytest.raises(ValueError, match="apply with mutable including 'domain_adversarial'"):
    model.apply(variables, x, train=True, rngs=rngs)


def test_task_model_variables_strip_the_wrapper():
  model = DomainAdversarial(TinyEncoder(), num_domains=2, total_steps=10)
  variables = model.init(KEY, jnp.ones((2, 4)), train=False)
  own = dann.task_model_variables(variables)
  assert set(own) == {"params"}
  chex.assert_trees_all_equal(own["params"], variables["params"]["model"])
  # The extracted variables run the bare task model and give the wrapper's outputs.
  bare, _ = TinyEncoder().apply(own, jnp.ones((2, 4)), train=False)
  wrapped, _ = model.apply(variables, jnp.ones((2, 4)), train=False)
  np.testing.assert_array_equal(bare, wrapped)
  with pytest.raises(ValueError, match="no params/model subtree"):
    dann.task_model_variables({"params": {"encoder": {}}})


def test_model_without_features_or_bottleneck_is_named():
  model = DomainAdversarial(NoFeatures(), num_domains=2, total_steps=10)
  with pytest.raises(ValueError, match=r"DomainAdversarial over NoFeatures needs pooled aux\['features'\].*'tokens'"):
    model.init(KEY, jnp.ones((2, 4, 1)), train=False)


# ------------------------------------------------------------------------------------ gradient signs

@pytest.mark.parametrize("schedule,step,lam", [
    ("constant", 0, 0.5), ("ganin", 5, 0.5 * (2.0 / (1.0 + math.exp(-5.0)) - 1.0))])
def test_encoder_gets_negated_domain_gradient_and_head_the_positive_one(schedule, step, lam):
  """Linear head on features h = x We: d CE / d Wd = h^T (p - y) / B (head, as plain training) and the encoder
  gets -lambda x^T ((p - y) Wd^T) / B, the negated and scaled gradient of the same domain loss."""
  model = DomainAdversarial(TinyEncoder(), num_domains=3, total_steps=10, hidden_features=0, schedule=schedule,
                            coefficient=0.5)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  sites = jnp.array([0, 2, 1, 2], jnp.int32)
  variables = model.init(KEY, x, train=False)
  variables = {**variables, dann.STEP_COLLECTION: {"step": jnp.int32(step)}}
  objective = domain_adversarial_objective(_zero_task, num_domains=3)

  def loss(params):
    (outputs, aux), state = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=[dann.STEP_COLLECTION])
    return jnp.mean(objective(outputs, aux, {"image": x, "site": sites})), state

  grads, state = jax.grad(loss, has_aux=True)(variables["params"])
  assert int(state[dann.STEP_COLLECTION]["step"]) == step + 1

  p = variables["params"]
  we = np.asarray(p["model"]["enc"]["kernel"], np.float64)
  wd = np.asarray(p["domain_classifier"]["out"]["kernel"], np.float64)
  bd = np.asarray(p["domain_classifier"]["out"]["bias"], np.float64)
  xs = np.asarray(x, np.float64)
  h = xs @ we
  logits = h @ wd + bd
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  dlogits = (prob - np.eye(3)[np.asarray(sites)]) / len(xs)
  np.testing.assert_allclose(grads["domain_classifier"]["out"]["kernel"], h.T @ dlogits, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads["domain_classifier"]["out"]["bias"], dlogits.sum(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads["model"]["enc"]["kernel"], -lam * xs.T @ (dlogits @ wd.T), rtol=1e-5,
                             atol=1e-7)
  # The task head is not on the domain loss's path at all.
  np.testing.assert_array_equal(grads["model"]["cls"]["kernel"], 0.0)


# ------------------------------------------------------------------------------------ real models

@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet18", dict(num_classes=3, width=8, norm="group", small_input=True), (2, 16, 16, 1)),
    ("unet", dict(spatial_dims=3, num_classes=2, features=(4, 8)), (2, 4, 6, 8, 1)),
], ids=["resnet18_2d", "unet_3d"])
def test_wraps_zoo_models(name, kwargs, shape):
  task_model = models.build_model(name, kwargs)
  model = DomainAdversarial(task_model, num_domains=2, total_steps=4, hidden_features=8)
  x = jax.random.normal(KEY, shape)
  # Shapes by tracing, numbers on the host: a compiled init costs as much as the train step on 2 CPU cores.
  shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)
  assert set(shapes["params"]) == {"model", "domain_classifier"}
  bare = jax.eval_shape(lambda x: task_model.init(KEY, x, train=False), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes["params"]["model"], bare["params"])
  variables = {**host_variables(shapes), dann.STEP_COLLECTION: {"step": jnp.int32(0)}}

  batch = {"image": x, "site": jnp.array([0, 1], jnp.int32)}
  objective = domain_adversarial_objective(_zero_task, num_domains=2)
  mutable = [c for c in variables if c != "params"]

  def loss(params):
    (outputs, aux), state = model.apply({**variables, "params": params}, x, train=True, mutable=mutable,
                                        rngs={"dropout": KEY})
    return jnp.mean(objective(outputs, aux, batch)), (outputs, aux, state)

  (value, (outputs, aux, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  chex.assert_shape(aux["domain_logits"], (2, 2))
  assert aux["domain_logits"].dtype == jnp.float32
  assert outputs.shape[0] == 2 and np.isfinite(float(value))
  assert int(state[dann.STEP_COLLECTION]["step"]) == 1
  # Step 0 of the "ganin" schedule: the reversal coefficient is 0, so the task model gets no domain gradient
  # yet while the domain head does.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["model"]))
  assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["domain_classifier"]))


# ------------------------------------------------------------------------------------ training demo

def _toy(key, n):
  """x (n, 8, 1): task label = [x0 > x1] (invariant to the domain), domain = a +2.5 shift of every input."""
  kx, kd = jax.random.split(key)
  site = jax.random.bernoulli(kd, 0.5, (n,)).astype(jnp.int32)
  x = jax.random.normal(kx, (n, 8)) + 2.5 * site[:, None]
  return {"image": x[..., None], "label": (x[:, 0] > x[:, 1]).astype(jnp.int32), "site": site}


def _train(coefficient, steps=200):
  """Full-batch SGD of a linear encoder (8 features), its task head and a DANN domain head (16 hidden units).
  Plain SGD as in the paper: Adam's per-parameter normalisation keeps the reversed step large and makes the
  minimax oscillate on a problem this small. Returns (task accuracy, adversary's domain accuracy, feature shift
  between the domains, counter), all on a held-out set."""
  model = DomainAdversarial(TinyEncoder(num_features=8), num_domains=2, total_steps=steps, hidden_features=16,
                            schedule="ganin", coefficient=coefficient)
  train, test = _toy(jax.random.PRNGKey(1), 512), _toy(jax.random.PRNGKey(2), 512)
  variables = model.init(KEY, train["image"], train=False)
  task = lambda outputs, aux, batch: optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])
  objective = domain_adversarial_objective(task, num_domains=2)
  tx = optax.sgd(0.1)

  def step(carry, _):
    params, state, opt_state = carry

    def loss(params):
      (outputs, aux), new_state = model.apply({"params": params, **state}, train["image"], train=True,
                                              mutable=[dann.STEP_COLLECTION])
      return jnp.mean(objective(outputs, aux, train)), new_state

    (_, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_state, opt_state), None

  state = {dann.STEP_COLLECTION: variables[dann.STEP_COLLECTION]}
  init = (variables["params"], state, tx.init(variables["params"]))
  (params, state, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(init)
  outputs, aux = model.apply({"params": params, **state}, test["image"], train=False)
  task_acc = float(jnp.mean(jnp.argmax(outputs, -1) == test["label"]))
  site = np.asarray(test["site"]) == 1
  features = np.asarray(aux["features"])
  shift = np.linalg.norm(features[site].mean(0) - features[~site].mean(0)) / np.linalg.norm(features.std(0))
  return (task_acc, float(jnp.mean(domain_accuracy(aux, test))), float(shift),
          int(state[dann.STEP_COLLECTION]["step"]))


def test_dann_training_removes_domain_information_but_learns_the_task():
  # Coefficient 0: the same network and losses without reversal; the adversary reads the shift from the features.
  plain_task, plain_domain, plain_shift, _ = _train(0.0)
  dann_task, dann_domain, dann_shift, steps = _train(1.0)
  assert steps == 200
  assert plain_task > 0.95 and dann_task > 0.95, (plain_task, dann_task)
  assert plain_domain > 0.95, plain_domain
  assert dann_domain < 0.65, dann_domain  # chance is about 0.5 (balanced domains)
  assert dann_shift < 0.25 * plain_shift, (dann_shift, plain_shift)
