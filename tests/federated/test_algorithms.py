"""The round's math: FedAvg with one client and one step is SGD, FedProx's and SCAFFOLD's terms, the adaptive
servers, client-level DP clipping and noise, partial participation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import steps
from medjax.federated import algorithms, simulation
from medjax.train_state import TrainState


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    return nn.Dense(3)(x.reshape(x.shape[0], -1)), {}


def _objective(outputs, aux, batch):
  return optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])


def _setup(n=16):
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(n, 4, 4, 1), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 3, n), jnp.int32)
  model = Linear()
  variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)
  return model, variables, images, labels


def _client(model, variables, images, labels, algorithm="fedavg", steps_=1, batch=16, tx=None, **kw):
  tx = tx or optax.sgd(0.1)
  fn = functools.partial(algorithms.client_update, apply_fn=model.apply, objective=_objective, tx=tx,
                         algorithm=algorithm, max_steps=max(steps_, 1), batch_size=batch, **kw)
  return fn(variables, None, None, images, labels, jnp.int32(len(images)),
            jnp.int32(steps_), jax.random.PRNGKey(5))


def test_fedavg_with_one_client_and_one_step_is_centralised_sgd():
  model, variables, images, labels = _setup()
  result = _client(model, variables, images, labels)  # batch = all 16 examples: the sample is a permutation
  tx = algorithms.server_optimizer("fedavg", server_lr=1.0)
  state = algorithms.init_state(variables, tx, jax.random.PRNGKey(1), "fedavg", 1)
  stacked = jax.tree.map(lambda x: x[None], result)
  state = algorithms.server_update(state, algorithms.weighted_sums(stacked, jnp.ones(1)), 1, 1, tx=tx)
  central = TrainState.create(variables=variables, tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0), use_ema=False)
  central, _ = steps.train_step(central, {"image": images, "label": labels}, apply_fn=model.apply,
                                objective=_objective, tx=optax.sgd(0.1))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(central.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(state.step) == 1


def test_fedprox_and_scaffold_terms_enter_the_local_gradient():
  grads = {"w": jnp.asarray([1.0, -2.0])}
  params = {"w": jnp.asarray([0.5, 0.5])}
  anchor = {"w": jnp.asarray([0.0, 1.0])}
  correction = {"w": jnp.asarray([0.25, 0.25])}
  tx = algorithms.client_terms(anchor, 0.1, correction)
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["w"], [1.0 + 0.05 + 0.25, -2.0 - 0.05 + 0.25])


def test_scaffold_control_update_follows_option_two():
  model, variables, images, labels = _setup()
  params = variables["params"]
  c = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  c_k = jax.tree.map(lambda p: jnp.full_like(p, -0.02), params)
  fn = functools.partial(algorithms.client_update, apply_fn=model.apply, objective=_objective, tx=optax.sgd(0.1),
                         algorithm="scaffold", max_steps=3, batch_size=8, client_lr=0.1)
  result = fn(variables, c, c_k, images, labels, jnp.int32(16), jnp.int32(3), jax.random.PRNGKey(5))
  # Delta c_k = -c + (x - y_k) / (K eta_l) with y_k - x = delta and K = 3.
  expected = jax.tree.map(lambda c_, d: -c_ - d / (3 * 0.1), c, result.delta)
  for a, b in zip(jax.tree.leaves(result.control_delta), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Each local gradient was corrected by c - c_k = 0.03: without it the update differs.
  plain = fn(variables, jax.tree.map(jnp.zeros_like, c), jax.tree.map(jnp.zeros_like, c), images, labels,
             jnp.int32(16), jnp.int32(3), jax.random.PRNGKey(5))
  assert not np.allclose(jax.tree.leaves(plain.delta)[0], jax.tree.leaves(result.delta)[0])
  controls = algorithms.scatter_controls(jax.tree.map(lambda p: jnp.zeros((4,) + p.shape), params),
                                         jnp.asarray([1, 3]), jax.tree.map(lambda d: jnp.stack([d, 2 * d]),
                                                                           result.control_delta))
  leaf = jax.tree.leaves(controls)[0]
  np.testing.assert_allclose(leaf[3], 2 * leaf[1])
  assert float(jnp.abs(leaf[0]).sum()) == 0.0


@pytest.mark.parametrize("name,reference", [("fedadam", optax.adam), ("fedyogi", optax.yogi)])
def test_adaptive_servers_apply_their_optimizer_to_the_negative_mean_update(name, reference):
  params = {"w": jnp.asarray([1.0, 2.0, 3.0])}
  tx = algorithms.server_optimizer(name, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
  state = algorithms.init_state({"params": params}, tx, jax.random.PRNGKey(0), name, 2)
  deltas = {"w": jnp.asarray([[0.1, -0.2, 0.3], [0.3, 0.0, -0.1]])}
  result = algorithms.ClientResult(delta=deltas, model_state={}, control_delta=None, loss=jnp.zeros(2))
  weights = jnp.asarray([1.0, 3.0])
  new = algorithms.server_update(state, algorithms.weighted_sums(result, weights), 2, 2, tx=tx)
  ref = reference(0.1, b1=0.9, b2=0.99, eps=1e-3)
  mean = (deltas["w"][0] * 1 + deltas["w"][1] * 3) / 4
  updates, _ = ref.update({"w": -mean}, ref.init(params), params)
  np.testing.assert_allclose(new.params["w"], params["w"] + updates["w"], rtol=1e-6)


def test_client_level_dp_clips_updates_and_the_server_adds_noise_of_sigma_s_over_m():
  update = {"a": jnp.full((100,), 3.0), "b": jnp.full((50,), -4.0)}
  clipped, norm = algorithms.clip_update(update, 2.0)
  assert float(norm) == pytest.approx(np.sqrt(100 * 9 + 50 * 16))
  assert float(optax.tree.norm(clipped)) == pytest.approx(2.0, rel=1e-6)
  small, _ = algorithms.clip_update({"a": jnp.full((4,), 0.1)}, 2.0)
  np.testing.assert_allclose(small["a"], 0.1)
  params = {"w": jnp.zeros((20000,))}
  tx = algorithms.server_optimizer("fedavg", server_lr=1.0)
  state = algorithms.init_state({"params": params}, tx, jax.random.PRNGKey(0), "fedavg", 8)
  inputs = algorithms.ServerInputs(delta_sum={"w": jnp.zeros(20000)}, weight_sum=jnp.float32(4.0),
                                   model_state_sum={}, control_delta_sum=None)
  new = algorithms.server_update(state, inputs, 4, 8, tx=tx, noise_stddev=1.5 * 2.0, expected_weight=4.0)
  assert np.std(np.asarray(new.params["w"])) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.05)


def test_partial_participation_is_deterministic_and_local_epochs_give_each_site_its_steps():
  a = simulation.select_clients(0, 7, 10, 3)
  assert a.tolist() == simulation.select_clients(0, 7, 10, 3).tolist()
  assert len(set(a.tolist())) == 3 and a.max() < 10
  rounds = {tuple(simulation.select_clients(0, r, 10, 3)) for r in range(20)}
  assert len(rounds) > 10
  assert simulation.select_clients(0, 1, 4, None).tolist() == [0, 1, 2, 3]
  opts = dict(local_steps=None, local_epochs=2)
  assert simulation.local_steps(opts, np.asarray([100, 33]), 32).tolist() == [7, 3]
  spread = simulation.site_spread({0: {"auc": 0.8}, 1: {"auc": 0.6}})
  assert spread["auc_mean"] == pytest.approx(0.7) and spread["auc_std"] == pytest.approx(0.1)
  assert spread["auc_min"] == 0.6 and spread["auc_max"] == 0.8


def test_sampled_batches_are_distinct_examples_of_the_site():
  index = algorithms.sample_indices(jax.random.PRNGKey(0), jnp.int32(10), 8, 32)
  assert len(set(np.asarray(index).tolist())) == 8
  assert int(index.max()) < 10
