"""A config's federated client and server as plain callables over flat dicts of numpy arrays: what the Flower
apps (`medjax.federated.flower`, the `fl_client` / `fl_server` tools) run at real sites.

The math is the simulation's (`algorithms.client_update`, `algorithms.server_update`), with the same keys: round
r, site j trains with fold_in(fold_in(rng, r), j + 2) from the run's initial state, and draws the same batches
from its own examples as the simulation draws from its padded copy. So a federation of these callables computes
what `simulation.run` computes for the same config (the test checks it against simulation="sequential").

What leaves a site (`fit`): the update of the global weights ("params/..." and "model_state/...", clipped under
client-level DP), SCAFFOLD's control update ("control/..."), the number of examples and the mean training loss.
A site keeps its own SCAFFOLD control variate. The server keeps its optimizer state and sends SCAFFOLD's c.

A site's data: split "site{j}_train" of config.data when the dataset has it (the simulated sites), else the
split "train" of the site's own config.data (a real site points config.data at its own files).
Partial participation (config.federated.clients_per_round) picks each round's sites as the simulation does
(`simulation.select_clients`, by position in the coordinator's site order, i.e. the order of its allowed keys).
Not over Flower: the simulated secure aggregation (`secure`), which has no network protocol here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medjax import build, evaluators, steps
from medjax.data import pipeline
from medjax.federated import algorithms, options as fed_options, simulation
from medjax.federated.secure_aggregation import flatten_update, unflatten_update

Weights = Dict[str, np.ndarray]
_FINGERPRINT_KEYS = ("model_name", "model", "loss", "optim", "lr", "seed", "total_steps", "federated", "compute_dtype")


def fingerprint(config) -> str:
  """A digest of what server and sites must agree on (model, loss, optimizer, rounds, federated options, seed);
  paths to each site's data are deliberately left out."""
  chosen = {k: config.get(k) for k in _FINGERPRINT_KEYS}
  chosen["batch_size"] = (config.get("input") or {}).get("batch_size")
  text = json.dumps(_plain(chosen), sort_keys=True, default=str)
  return f"medjax/{config.model_name}/{chosen['federated'].get('algorithm', 'fedavg')}/" + \
      hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


class _Parts:
  """Model, objective, optimizers and the run's initial state, built identically at the server and each site."""

  def __init__(self, config, example_image: np.ndarray):
    self.config = config
    self.options = fed_options.parse(config.federated, config)
    self.algorithm = self.options["algorithm"]
    self.model, self.objective = build.model(config), build.objective(config)
    self.client_tx = build.optimizer(config)[0]
    self.server_tx = algorithms.server_optimizer(
        self.algorithm, server_lr=float(self.options["server_lr"]), beta1=float(self.options["server_beta1"]),
        beta2=float(self.options["server_beta2"]), tau=float(self.options["server_tau"]))
    init_fn = build.init_state_fn(self.model, self.client_tx, example_image, use_ema=False)
    fresh = jax.jit(init_fn)(jax.random.PRNGKey(config.seed))
    self.initial = algorithms.init_state(fresh.variables(), self.server_tx, fresh.rng, self.algorithm, 1)
    dp = self.options["client_dp"]
    self.clip_norm = float(dp["clip_norm"]) if dp else None


def _weights(params, model_state) -> Weights:
  return flatten_update({"params": jax.device_get(params), "model_state": jax.device_get(model_state)})


def _split(weights: Mapping[str, np.ndarray]):
  tree = unflatten_update(weights)
  return tree.get("params", {}), tree.get("model_state", {})


def _like(reference, tree):
  """`tree` (nested dicts of numpy arrays) cast to `reference`'s structure and dtypes."""
  return jax.tree.map(lambda r, t: jnp.asarray(t, r.dtype), reference, tree)


def site_callables(config, site_index: int) -> Tuple[Callable, Callable, Callable[[], str]]:
  """(fit, evaluate, fingerprint) of site `site_index` for `config` (contract in medjax.federated.flower)."""
  dataset = build.dataset(config)
  if f"site{site_index}_train" in dataset.splits:
    images, labels, counts = simulation.site_arrays(dataset, [site_index])
  else:
    images, labels, counts = _own_arrays(dataset)
  parts = _Parts(config, images[0, 0])
  settings = build.settings(config)
  num_steps = int(simulation.local_steps(parts.options, counts, settings.batch_size)[0])
  local = simulation.sequential_client(
      apply_fn=parts.model.apply, objective=parts.objective, tx=parts.client_tx, algorithm=parts.algorithm,
      batch_size=settings.batch_size, proximal_mu=float(parts.options["proximal_mu"]), client_lr=float(config.lr),
      augment_fn=build.augment_fn(config), clip_norm=parts.clip_norm)
  site_data = (jnp.asarray(images[0]), jnp.asarray(labels[0]), jnp.int32(counts[0]), jnp.int32(num_steps))
  client = lambda variables, control, client_control, rng: local(variables, control, client_control, *site_data, rng)
  own = {"control": None if parts.algorithm != "scaffold" else
         jax.tree.map(jnp.zeros_like, parts.initial.params)}
  evaluator = build.evaluator(config, dataset.info)
  eval_step = jax.jit(lambda variables, batch: steps.eval_step(
      variables, batch, apply_fn=build.eval_apply_fn(parts.model, config), stats_fn=evaluator.stats_fn))
  eval_split = (f"site{site_index}_{settings.eval_split}" if f"site{site_index}_{settings.eval_split}"
                in dataset.splits else settings.eval_split)

  def fit(weights: Weights, round_index: int, server_values: Weights):
    params, model_state = _split(weights)
    variables = {"params": _like(parts.initial.params, params), **_like(parts.initial.model_state, model_state)}
    control = None
    if parts.algorithm == "scaffold":  # c from the server; zeros before the first aggregation
      sent = unflatten_update(server_values or {}).get("control")
      control = parts.initial.control if sent is None else _like(parts.initial.params, sent)
    key = jax.random.fold_in(jax.random.fold_in(parts.initial.rng, round_index), site_index + 2)
    result = client(variables, control, own["control"], key)
    client_values: Weights = {}
    if result.control_delta is not None:
      own["control"] = jax.tree.map(jnp.add, own["control"], result.control_delta)
      client_values = flatten_update({"control": jax.device_get(result.control_delta)})
    update = _weights(result.delta, result.model_state)
    return update, client_values, int(counts[0]), {"train_loss": float(result.loss)}

  def evaluate(weights: Weights) -> Dict[str, float]:
    params, model_state = _split(weights)
    variables = {"params": _like(parts.initial.params, params), **_like(parts.initial.model_state, model_state)}
    batches = pipeline.eval_batches(dataset.source(eval_split), global_batch_size=settings.eval_batch_size)
    metrics = evaluators.evaluate(evaluator, lambda b: eval_step(variables, b),
                                  ({k: jnp.asarray(v) for k, v in b.items()} for b in batches))
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}

  return fit, evaluate, lambda: fingerprint(config)


def _own_arrays(dataset):
  """A real site's training examples (its own "train" split) as (images (1, n, ...), labels (1, n), counts (1,))."""
  source = dataset.source("train")
  examples = [source[i] for i in range(len(source))]
  images = np.stack([e["image"] for e in examples]).astype(np.float32)[None]
  labels = np.stack([np.asarray(e["label"]) for e in examples])[None]
  return images, labels, np.asarray([len(examples)], np.int32)


def server_callables(config) -> Tuple[Callable[[], Weights], Callable, int, int, Callable[[int, int], np.ndarray]]:
  """(initial_weights, aggregate, num_rounds, num_sites, select) of the coordinator for `config`: `select(round,
  num_connected)` gives the positions of the round's sites in the site order (all of them without
  config.federated.clients_per_round). num_sites: the dataset's simulated sites, else config.federated.num_sites
  (a real federation); ValueError naming that key when neither is known."""
  dataset = build.dataset(config)
  example = dataset.source(dataset.splits[0])[0]["image"]
  parts = _Parts(config, np.asarray(example, np.float32))
  if any(s.endswith("_train") and s.startswith("site") for s in dataset.splits):
    num_sites = len(simulation.training_sites(dataset))
  elif parts.options["num_sites"] is not None:
    num_sites = int(parts.options["num_sites"])
  else:
    raise ValueError("config.federated.num_sites: the data has no simulated sites (site{j}_train splits), so give "
                     "the number of sites of the real federation (the coordinator's --allowed_keys).")
  per_round = min(int(parts.options["clients_per_round"] or num_sites), num_sites)
  dp = parts.options["client_dp"]
  noise = 0.0
  if dp:
    noise = simulation._client_dp(parts.options, num_sites, per_round, int(config.total_steps))["noise_multiplier"]
    noise *= parts.clip_norm
  server = jax.jit(lambda state, inputs, selected, sites: algorithms.server_update(
      state, inputs, selected, sites, tx=parts.server_tx, noise_stddev=noise,
      expected_weight=per_round if dp else None), static_argnums=(2, 3))
  holder = {"state": parts.initial.replace(client_controls=None)}

  def initial_weights() -> Weights:
    return _weights(parts.initial.params, parts.initial.model_state)

  def aggregate(round_index: int, weights: Weights, server_values: Weights,
                results: List[Tuple[Weights, Weights, int]]) -> Tuple[Weights, Weights]:
    state = holder["state"]
    params, model_state = _split(weights)
    state = state.replace(step=jnp.int32(round_index), params=_like(state.params, params),
                          model_state=_like(state.model_state, model_state))
    deltas = [_split(update) for update, _, _ in results]
    weights_k = jnp.asarray([1.0 if dp else float(n) for _, _, n in results], jnp.float32)
    stacked = algorithms.ClientResult(
        delta=_like(state.params, jax.tree.map(lambda *x: np.stack(x), *[d for d, _ in deltas])),
        model_state=_like(state.model_state, jax.tree.map(lambda *x: np.stack(x), *[m for _, m in deltas]))
        if state.model_state else {},
        control_delta=None if parts.algorithm != "scaffold" else _like(
            state.params, jax.tree.map(lambda *x: np.stack(x),
                                       *[unflatten_update(values)["control"] for _, values, _ in results])),
        loss=jnp.zeros(len(results)))
    new = server(state, algorithms.weighted_sums(stacked, weights_k), len(results), num_sites)
    holder["state"] = new
    values = flatten_update({"control": jax.device_get(new.control)}) if parts.algorithm == "scaffold" else {}
    return _weights(new.params, new.model_state), values

  def select(round_index: int, num_connected: int) -> np.ndarray:
    return simulation.select_clients(int(config.seed), round_index, num_connected, per_round)

  return initial_weights, aggregate, int(config.total_steps), num_sites, select
