"""Contrastive losses (medjax.losses.contrastive): NT-Xent (a hand-computed value, invariances, 1 and 8 devices),
InfoNCE and BYOL (hand values, no gradient into the targets)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.losses.contrastive import byol_loss, info_nce, nt_xent


def _by_hand(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n, b = len(z), len(z1)
  terms = []
  for i in range(n):
    p = (i + b) % n
    denominator = sum(math.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
    terms.append(-math.log(math.exp(z[i] @ z[p] / t) / denominator))
  return np.array([(terms[i] + terms[i + b]) / 2 for i in range(b)])


def test_equals_the_hand_computed_value_on_a_tiny_batch():
  z1 = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  z2 = np.array([[3.0, 1.0], [-1.0, 1.0]], np.float32)
  value = np.asarray(nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=0.5))
  np.testing.assert_allclose(value, _by_hand(z1, z2, 0.5), rtol=1e-6)
  # Spelled out for example 0: cos(z1[0], z2[0]) = 3/sqrt(10). Anchor z1[0]: negatives z1[1] (cos 0) and z2[1]
  # (cos -1/sqrt 2); anchor z2[0]: negatives z1[1] (cos 1/sqrt 10) and z2[1] (cos -1/sqrt 5).
  c, t = 3 / math.sqrt(10), 0.5
  first = -math.log(math.exp(c / t) / (math.exp(c / t) + math.exp(0) + math.exp(-1 / math.sqrt(2) / t)))
  second = -math.log(math.exp(c / t) / (math.exp(c / t) + math.exp(1 / math.sqrt(10) / t)
                                        + math.exp(-1 / math.sqrt(5) / t)))
  assert value[0] == pytest.approx((first + second) / 2, rel=1e-6)


def test_scale_and_view_order_do_not_matter_and_aligned_views_score_lower():
  rng = np.random.default_rng(0)
  z1, z2 = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(2))
  base = nt_xent(z1, z2)
  np.testing.assert_allclose(nt_xent(3.0 * z1, 0.5 * z2), base, rtol=1e-5)
  np.testing.assert_allclose(nt_xent(z2, z1), base, rtol=1e-5)
  assert float(nt_xent(z1, z1 + 1e-3 * z2).mean()) < float(base.mean())


def test_one_and_eight_devices_give_the_same_value():
  rng = np.random.default_rng(1)
  z1, z2 = (jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(2))
  single = jax.jit(nt_xent)(z1, z2)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  sharded = jax.jit(nt_xent, out_shardings=sharding)(jax.device_put(z1, sharding), jax.device_put(z2, sharding))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(single), _by_hand(np.asarray(z1), np.asarray(z2), 0.1), rtol=1e-5)


@pytest.mark.parametrize("z1,z2,t,message", [
    (np.ones((4, 3)), np.ones((4, 2)), 0.1, "nt_xent: both inputs must be \\(B, D\\)"),
    (np.ones((1, 3)), np.ones((1, 3)), 0.1, "has no negatives"),
    (np.ones((4, 3)), np.ones((4, 3)), 0.0, "temperature must be > 0"),
])
def test_bad_inputs(z1, z2, t, message):
  with pytest.raises(ValueError, match=message):
    nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=t)


def test_info_nce_equals_a_hand_computation_and_keys_get_no_gradient():
  q = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]], np.float32)
  k = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  t = 0.2
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = qn @ kn.T / t
  expected = [2 * t * (math.log(np.exp(logits[i]).sum()) - logits[i, i]) for i in range(3)]
  value = info_nce(jnp.asarray(q), jnp.asarray(k), temperature=t)
  np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-5)
  grad_k = jax.grad(lambda kk: jnp.sum(info_nce(jnp.asarray(q), kk, temperature=t)))(jnp.asarray(k))
  np.testing.assert_array_equal(grad_k, np.zeros_like(k))


def test_byol_loss_is_two_minus_twice_the_cosine():
  p = jnp.array([[3.0, 4.0], [1.0, 0.0]])
  t = jnp.array([[4.0, 3.0], [-2.0, 0.0]])
  np.testing.assert_allclose(np.asarray(byol_loss(p, t)), [2 - 2 * 24 / 25, 4.0], rtol=1e-6)
  grad_t = jax.grad(lambda tt: jnp.sum(byol_loss(p, tt)))(t)
  np.testing.assert_array_equal(grad_t, np.zeros_like(t))
  with pytest.raises(ValueError, match="byol_loss"):
    byol_loss(p, t[:1])
