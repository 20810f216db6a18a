"""A round's sums through simulated secure aggregation (`secure_aggregation`), with clients dropping out.

Each client k of the round sends, masked, the vector (w_k Delta_k, w_k, w_k model_state_k, Delta c_k) that the
plain aggregation sums (`algorithms.weighted_sums`); the server learns only the sum over the clients whose
masked update arrived. With `dropout_rate` > 0, each client independently drops out after masking with that
probability (drawn from (seed, round)); its update is lost, the survivors' shares remove its masks, and the
round aggregates the survivors only. Fixed-point encoding quantises the sum to n / 2^(scale_bits + 1).
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medjax.federated.algorithms import ClientResult, ServerInputs
from medjax.federated.secure_aggregation import SecureAggregation, unflatten_update

_DROPOUT_STREAM = 0xD0


def dropped_clients(seed: int, round_index: int, num_clients: int, rate: float) -> np.ndarray:
  """Positions of the round's clients that drop out after masking, sorted."""
  if not rate:
    return np.zeros(0, np.int64)
  draws = np.random.default_rng([seed, round_index, _DROPOUT_STREAM]).random(num_clients)
  return np.flatnonzero(draws < rate)


def secure_sums(results: ClientResult, weights: np.ndarray, options: Mapping[str, Any], *, seed: int,
                round_index: int) -> Tuple[ServerInputs, np.ndarray]:
  """(ServerInputs summed by secure aggregation, positions of the surviving clients).

  Args:
    results: the round's client results stacked on a leading client axis.
    weights: (clients,) each client's weight w_k.
    options: config.federated.secure_aggregation (threshold: survivors needed, default a majority;
      dropout_rate; scale_bits).
    seed, round_index: the run seed and the round; the masks of every round differ.
  Raises ValueError naming the round when fewer than `threshold` clients survive.
  """
  host = jax.device_get(results)
  num = len(weights)
  threshold = int(options.get("threshold") or num // 2 + 1)
  protocol = SecureAggregation(num, threshold, seed=(seed, round_index), scale_bits=int(options.get("scale_bits", 16)))
  dropped = dropped_clients(seed, round_index, num, float(options.get("dropout_rate", 0.0)))
  survivors = np.setdiff1d(np.arange(num), dropped)
  masked = {}
  for k in survivors:
    w = float(weights[k])
    update = {"delta": jax.tree.map(lambda d: np.asarray(d[k]) * w, host.delta),
              "weight": np.asarray([w]),
              "model_state": jax.tree.map(lambda s: np.asarray(s[k], np.float64) * w, host.model_state)}
    if host.control_delta is not None:
      update["control"] = jax.tree.map(lambda c: np.asarray(c[k]), host.control_delta)
    masked[int(k)] = protocol.client(int(k)).mask(update)
  try:
    total = unflatten_update(protocol.server.aggregate(masked, dropped=dropped.tolist()))
  except ValueError as e:
    raise ValueError(f"config.federated.secure_aggregation, round {round_index + 1}: {e}") from None
  like = lambda reference, summed: jax.tree.map(lambda r, s: jnp.asarray(s, r.dtype), reference, summed)
  first = jax.tree.map(lambda x: x[0], host)
  inputs = ServerInputs(
      delta_sum=like(first.delta, total["delta"]),
      weight_sum=jnp.float32(total["weight"][0]),
      model_state_sum=like(first.model_state, total.get("model_state", {})),
      control_delta_sum=None if host.control_delta is None else like(first.control_delta, total["control"]))
  return inputs, survivors

