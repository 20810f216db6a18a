"""A federated simulation end to end on synthetic sites: it resumes bit for bit after a kill, vmap and
sequential clients agree, secure aggregation (with a dropout) changes the result only by its quantisation,
the global model loads like any run's, and bad configurations name their key."""

import json
import os

import jax
import numpy as np
import pytest

from medjax import checkpoint, config_lib
from medjax.federated import options, simulation
from tests.train_testing import Preempted, preempt_after_save

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_federated.py")


def _config(**federated):
  config = config_lib.load_config(EXPERIMENT + ":quick=true")
  config.total_steps = 3
  config.eval_every_steps, config.checkpoint_every_steps = 3, 1
  config.checkpoint = dict(max_to_keep=3, keep_best=0, async_save=False)
  config.federated.update(federated)
  return config


def _params(workdir):
  loaded = checkpoint.load(workdir)
  return jax.tree.leaves(loaded.variables["params"])


@pytest.mark.slow
def test_killed_simulation_resumes_bit_for_bit_and_loads_as_a_run(tmp_path, monkeypatch):
  config = _config(algorithm="scaffold", clients_per_round=3, simulation="vmap")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  simulation.run(config, straight)
  original = preempt_after_save(monkeypatch, at_step=2)
  with pytest.raises(Preempted):
    simulation.run(config, resumed)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
  out = simulation.run(config, resumed)
  for a, b in zip(_params(straight), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  results = json.load(open(os.path.join(resumed, "results.json")))
  assert results["resumed_from_step"] == 2 and results["step"] == 3
  assert out["step"] == 3
  # per-site evaluation and the spread across sites are reported
  sites = results["sites"]
  assert all(f"test_site{j}/auc" in results["test"] for j in sites)
  assert results["test"]["test_sites/auc_min"] <= results["test"]["test_sites/auc_mean"]
  assert "| mean ± sd over sites |" in open(os.path.join(resumed, simulation.REPORT_FILE)).read()


@pytest.mark.slow
def test_sequential_clients_and_secure_aggregation_agree_with_vmap(tmp_path):
  # One round of one local step: float32 rounding differences between the vmapped and the one-client programs
  # (~1e-7) grow with training (2e-5 after two steps of this tiny GroupNorm net).
  runs = {"vmap": dict(simulation="vmap"), "seq": dict(simulation="sequential"),
          "secure": dict(simulation="vmap", secure_aggregation=dict(threshold=3, dropout_rate=0.0))}
  for name, extra in runs.items():
    config = _config(algorithm="fedprox", local_steps=1, **extra)
    config.total_steps, config.eval_every_steps = 1, 1
    simulation.run(config, str(tmp_path / name))
  for a, b, c in zip(_params(tmp_path / "vmap"), _params(tmp_path / "seq"), _params(tmp_path / "secure")):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)  # fixed point: 2^-16 per weighted sum / ~96 examples


def test_bad_federated_configs_name_the_key():
  config = _config()
  with pytest.raises(ValueError, match=r"config.federated.algorithm: unknown algorithm 'fedsgd'.*fedavg"):
    options.parse(dict(algorithm="fedsgd", local_steps=1), config)
  with pytest.raises(ValueError, match="config.federated: unknown key 'local_step'. Did you mean 'local_steps'"):
    options.parse(dict(local_step=1))
  with pytest.raises(ValueError, match="exactly one of local_steps and local_epochs"):
    options.parse(dict(local_steps=1, local_epochs=1))
  with pytest.raises(ValueError, match="client_dp with algorithm 'scaffold'"):
    options.parse(dict(algorithm="scaffold", local_steps=1, client_dp=dict(clip_norm=1.0, noise_multiplier=1.0)))
  config.schedule = dict(decay="cosine")
  with pytest.raises(ValueError, match="config.schedule"):
    options.parse(dict(local_steps=1), config)


def test_more_sites_than_examples_is_refused(tmp_path):
  config = _config()
  config.data.num_sites = 500
  with pytest.raises(ValueError, match="num_sites"):
    simulation.run(config, str(tmp_path / "w"))
  config = _config(num_sites=3)  # the real-federation key, contradicting the simulated sites
  with pytest.raises(ValueError, match=r"config.federated.num_sites = 3, but config.data has 4 training sites"):
    simulation.run(config, str(tmp_path / "w2"))
  with pytest.raises(ValueError, match="config.federated.num_sites must be >= 1"):
    options.parse(dict(local_steps=1, num_sites=0))


def test_secure_sums_equal_plain_sums_of_the_survivors_with_a_dropout():
  import jax.numpy as jnp
  from medjax.federated import algorithms, secure
  rng = np.random.RandomState(0)
  results = algorithms.ClientResult(delta={"w": jnp.asarray(rng.randn(4, 30) * 0.01, jnp.float32)},
                                    model_state={}, control_delta={"w": jnp.asarray(rng.randn(4, 30), jnp.float32)},
                                    loss=jnp.zeros(4))
  weights = np.asarray([10.0, 20.0, 30.0, 40.0], np.float32)
  seed, round_index = 0, next(r for r in range(100) if len(secure.dropped_clients(0, r, 4, 0.3)) == 1)
  inputs, survivors = secure.secure_sums(results, weights, dict(threshold=2, dropout_rate=0.3), seed=seed,
                                         round_index=round_index)
  assert len(survivors) == 3
  kept = jax.tree.map(lambda x: x[survivors], results)
  plain = algorithms.weighted_sums(kept, jnp.asarray(weights[survivors]))
  assert float(inputs.weight_sum) == float(plain.weight_sum)
  np.testing.assert_allclose(inputs.delta_sum["w"], plain.delta_sum["w"], atol=3 * 2.0**-16)
  np.testing.assert_allclose(inputs.control_delta_sum["w"], plain.control_delta_sum["w"], atol=3 * 2.0**-16)
  with pytest.raises(ValueError, match="secure_aggregation, round"):
    secure.secure_sums(results, weights, dict(threshold=4, dropout_rate=0.3), seed=seed, round_index=round_index)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["scaffold"])
def test_site_callables_compute_what_the_simulation_computes(tmp_path, algorithm):
  """The callables the Flower apps run, driven by a plain loop, against simulation.run (sequential clients)."""
  from medjax.federated import site
  config = _config(algorithm=algorithm, local_steps=1, simulation="sequential")
  config.total_steps, config.eval_every_steps = 2, 2
  simulation.run(config, str(tmp_path / "sim"))
  initial_weights, aggregate, rounds, num_sites, select = site.server_callables(config)
  clients = [site.site_callables(config, j) for j in range(4)]
  assert rounds == 2 and num_sites == 4 and list(select(0, 4)) == [0, 1, 2, 3]
  assert len({fingerprint() for _, _, fingerprint in clients} | {site.fingerprint(config)}) == 1
  weights, server_values = initial_weights(), {}
  for r in range(rounds):
    results = []
    for fit, _, _ in clients:
      update, values, n, metrics = fit(weights, r, server_values)
      assert set(metrics) == {"train_loss"} and n > 0
      assert set(values) == ({f"control/{k[7:]}" for k in weights if k.startswith("params/")}
                             if algorithm == "scaffold" else set())
      results.append((update, values, n))
    weights, server_values = aggregate(r, weights, server_values, results)
  simulated = checkpoint.load(str(tmp_path / "sim")).variables["params"]
  from medjax.federated.secure_aggregation import flatten_update
  for name, value in flatten_update({"params": jax.device_get(simulated)}).items():
    np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  metrics = clients[0][1](weights)
  assert 0.0 <= metrics["auc"] <= 1.0
