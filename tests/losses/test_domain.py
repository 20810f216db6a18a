"""Tests for medjax.losses.domain: the DANN objective's value, its errors, out-of-range ids under jit, and the
domain accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.losses.domain import (check_domain_ids, domain_accuracy, domain_adversarial_objective,
                                  domain_cross_entropy)

LOGITS = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0], [-2.0, 1.0, 1.0], [0.3, 0.2, 0.1]], np.float32)
SITES = np.array([0, 1, 2, 0], np.int32)


def _task(outputs, aux, batch):
  return jnp.asarray([1.0, 2.0, 3.0, 4.0], jnp.float32) * outputs


def _xent(logits, ids):
  logits = logits.astype(np.float64)
  log_z = np.log(np.exp(logits).sum(-1))
  return log_z - logits[np.arange(len(ids)), ids]


@pytest.mark.parametrize("weight", [1.0, 0.3, 0.0])
def test_objective_is_task_plus_weighted_domain_cross_entropy(weight):
  objective = domain_adversarial_objective(_task, weight=weight, num_domains=3)
  outputs = jnp.full((4,), 0.5)
  loss = objective(outputs, {"domain_logits": jnp.asarray(LOGITS)}, {"site": jnp.asarray(SITES)})
  assert loss.shape == (4,) and loss.dtype == jnp.float32
  expected = np.array([0.5, 1.0, 1.5, 2.0]) + weight * _xent(LOGITS, SITES)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Known value: a uniform guess over 3 domains costs log 3 nats.
  uniform = domain_cross_entropy({"domain_logits": jnp.zeros((4, 3))}, {"site": jnp.asarray(SITES)},
                                 num_domains=3)
  np.testing.assert_allclose(uniform, np.log(3.0), rtol=1e-6)


def test_custom_domain_key_and_jit():
  objective = domain_adversarial_objective(_task, domain_key="scanner", num_domains=3)
  fn = jax.jit(lambda logits, ids: objective(jnp.zeros((4,)), {"domain_logits": logits}, {"scanner": ids}))
  np.testing.assert_allclose(fn(LOGITS, SITES), _xent(LOGITS, SITES), rtol=1e-6)


def test_missing_keys_are_named():
  objective = domain_adversarial_objective(_task, num_domains=3)
  with pytest.raises(KeyError, match=r"batch has no 'site'.*batch keys: \['image', 'label'\]"):
    objective(jnp.zeros((4,)), {"domain_logits": LOGITS}, {"image": 0, "label": 0})
  with pytest.raises(KeyError, match=r"aux has no 'domain_logits'.*DomainAdversarial.*\['features'\]"):
    objective(jnp.zeros((4,)), {"features": 0}, {"site": SITES})
  with pytest.raises(KeyError, match="'hospital'"):
    domain_adversarial_objective(_task, domain_key="hospital", num_domains=3)(
        jnp.zeros((4,)), {"domain_logits": LOGITS}, {"site": SITES})
  with pytest.raises(KeyError, match="aux has no 'domain_logits'"):
    domain_accuracy({}, {"site": SITES})


def test_shape_dtype_and_argument_errors():
  objective = domain_adversarial_objective(_task, num_domains=2)
  with pytest.raises(ValueError, match=r"aux\['domain_logits'\] must be \(B, 2\) for num_domains=2, got \(4, 3\)"):
    objective(jnp.zeros((4,)), {"domain_logits": LOGITS}, {"site": SITES})
  objective = domain_adversarial_objective(_task, num_domains=3)
  with pytest.raises(ValueError, match=r"batch\['site'\] must be \(4,\) domain ids.*got shape \(4, 1\)"):
    objective(jnp.zeros((4,)), {"domain_logits": LOGITS}, {"site": SITES[:, None]})
  with pytest.raises(ValueError, match=r"batch\['site'\]: domain ids must be integers, got dtype float32"):
    objective(jnp.zeros((4,)), {"domain_logits": LOGITS}, {"site": SITES.astype(np.float32)})
  with pytest.raises(ValueError, match="num_domains must be at least 2, got 1"):
    domain_adversarial_objective(_task, num_domains=1)
  with pytest.raises(ValueError, match="weight must be >= 0, got -1.0"):
    domain_adversarial_objective(_task, weight=-1.0, num_domains=3)


def test_out_of_range_ids_raise_on_host_and_are_nan_under_jit():
  bad = np.array([0, 3, 2, -1], np.int32)
  objective = domain_adversarial_objective(_task, num_domains=3)
  with pytest.raises(ValueError, match=r"batch\['site'\]: domain ids must lie in 0..2 \(num_domains=3\); got "
                                       r"\[-1, 3\] in 2 examples"):
    objective(jnp.zeros((4,)), {"domain_logits": LOGITS}, {"site": bad})
  with pytest.raises(ValueError, match=r"batch\['site'\]: domain ids must lie in 0..2"):
    check_domain_ids(bad, 3)
  check_domain_ids(SITES, 3)  # in range: no error

  def mean_loss(logits, ids):
    return jnp.mean(objective(jnp.zeros((4,)), {"domain_logits": logits}, {"site": ids}))

  per_example = jax.jit(lambda logits, ids: objective(jnp.zeros((4,)), {"domain_logits": logits},
                                                      {"site": ids}))(LOGITS, bad)
  per_example = np.asarray(per_example)
  assert np.isnan(per_example[[1, 3]]).all()
  np.testing.assert_allclose(per_example[[0, 2]], _xent(LOGITS, SITES)[[0, 2]], rtol=1e-6)
  # The mean is NaN: the train step sees a non-finite step instead of training on a clipped id.
  assert np.isnan(jax.jit(mean_loss)(LOGITS, bad))
  # Valid ids keep finite gradients through the same jnp.where formulation.
  grads = jax.jit(jax.grad(mean_loss))(LOGITS, SITES)
  assert np.isfinite(grads).all()


def test_domain_accuracy():
  acc = domain_accuracy({"domain_logits": jnp.asarray(LOGITS)}, {"site": jnp.asarray(SITES)})
  # argmax per row: 0, 2, 1 (first of the tie), 0
  np.testing.assert_array_equal(acc, [1.0, 0.0, 0.0, 1.0])
  assert acc.dtype == jnp.float32
  acc = jax.jit(lambda logits, ids: domain_accuracy({"domain_logits": logits}, {"scan": ids}, "scan"))(
      LOGITS, np.array([0, 2, 1, 1], np.int32))
  np.testing.assert_array_equal(acc, [1.0, 1.0, 1.0, 0.0])
