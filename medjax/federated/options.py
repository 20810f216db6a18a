"""`config.federated`: the simulation's settings, checked with errors that name the key.

  config.total_steps = 50                          # rounds (a federated run's steps are rounds)
  config.federated = dict(algorithm="fedprox", proximal_mu=0.01, local_steps=20, clients_per_round=None)
  config.data = dict(name="sites", base=dict(name="medmnist", ...), num_sites=4, split="dirichlet", alpha=0.5)

The client optimizer is config.optim at the constant rate config.lr, restarted every round (no schedule);
config.input.batch_size is the local batch. Evaluation and checkpoints follow config.eval_every_steps and
config.checkpoint_every_steps, counted in rounds.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, Mapping

from medjax.federated.algorithms import ALGORITHMS
from medjax.registry import merge_options

DEFAULTS = dict(
    algorithm="fedavg",        # fedavg | fedprox | fedadam | fedyogi | scaffold
    local_steps=None,          # local optimizer steps per round; or
    local_epochs=None,         # local passes over each site's data per round (ceil(epochs * n_k / B) steps)
    clients_per_round=None,    # sites sampled each round (None = all: full participation)
    server_lr=1.0,             # the server optimizer's rate (1 with fedavg = the plain average)
    server_beta1=0.9,          # fedadam / fedyogi
    server_beta2=0.99,
    server_tau=1e-3,           # fedadam / fedyogi epsilon (Reddi et al. 2021)
    proximal_mu=0.01,          # fedprox
    client_dp=None,            # dict(clip_norm, noise_multiplier | target_epsilon, delta, accountant)
    secure_aggregation=None,   # dict(threshold=None, dropout_rate=0.0, scale_bits=16)
    simulation="vmap",         # "vmap" (clients in parallel on one device) or "sequential" (one at a time, mesh)
    eval_sites=True,           # evaluate the global model on every site's eval split each evaluation
    num_sites=None,            # sites of a real federation (Flower); a simulation counts config.data's sites
)
SIMULATIONS = ("vmap", "sequential")
CLIENT_DP_KEYS = ("clip_norm", "noise_multiplier", "target_epsilon", "delta", "accountant")
SECURE_KEYS = ("threshold", "dropout_rate", "scale_bits")


def parse(federated: Mapping[str, Any], config: Any = None) -> Dict[str, Any]:
  """`config.federated` merged over DEFAULTS and checked (and, given `config`, checked against it)."""
  options = merge_options(federated, DEFAULTS, "config.federated")
  if options["algorithm"] not in ALGORITHMS:
    close = difflib.get_close_matches(str(options["algorithm"]), ALGORITHMS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"config.federated.algorithm: unknown algorithm {options['algorithm']!r}.{hint} "
                     f"Choose one of {', '.join(ALGORITHMS)}.")
  if (options["local_steps"] is None) == (options["local_epochs"] is None):
    raise ValueError("config.federated: give exactly one of local_steps and local_epochs.")
  for key in ("local_steps", "local_epochs"):
    if options[key] is not None and not options[key] > 0:
      raise ValueError(f"config.federated.{key} must be > 0, got {options[key]}.")
  if options["clients_per_round"] is not None and int(options["clients_per_round"]) < 1:
    raise ValueError(f"config.federated.clients_per_round must be >= 1, got {options['clients_per_round']}.")
  if options["num_sites"] is not None and int(options["num_sites"]) < 1:
    raise ValueError(f"config.federated.num_sites must be >= 1, got {options['num_sites']}.")
  if options["simulation"] not in SIMULATIONS:
    raise ValueError(f"config.federated.simulation must be one of {SIMULATIONS}, got {options['simulation']!r}.")
  if not options["server_lr"] > 0:
    raise ValueError(f"config.federated.server_lr must be > 0, got {options['server_lr']}.")
  if options["algorithm"] == "fedprox" and not options["proximal_mu"] >= 0:
    raise ValueError(f"config.federated.proximal_mu must be >= 0, got {options['proximal_mu']}.")
  dp = options["client_dp"]
  if dp:
    dp = dict(dp)
    merge_options(dp, dict.fromkeys(CLIENT_DP_KEYS), "config.federated.client_dp")
    if not float(dp.get("clip_norm", 0)) > 0:
      raise ValueError("config.federated.client_dp.clip_norm must be given and > 0 (the L2 bound of an update).")
    if ("noise_multiplier" in dp) == ("target_epsilon" in dp):
      raise ValueError("config.federated.client_dp: give exactly one of noise_multiplier and target_epsilon.")
    if options["algorithm"] == "scaffold":
      raise ValueError("config.federated.client_dp with algorithm 'scaffold': the control variates would leave "
                       "the sites unprotected; use fedavg, fedprox, fedadam or fedyogi.")
    options["client_dp"] = dp
  secure = options["secure_aggregation"]
  if secure:
    secure = {} if secure is True else dict(secure)
    merge_options(secure, dict.fromkeys(SECURE_KEYS), "config.federated.secure_aggregation")
    rate = float(secure.get("dropout_rate", 0.0))
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"config.federated.secure_aggregation.dropout_rate must lie in [0, 1), got {rate}.")
    options["secure_aggregation"] = secure
  if config is not None:
    if config.get("schedule"):
      raise ValueError("config.schedule: a federated run's client optimizer restarts every round at the constant "
                       "rate config.lr; remove config.schedule.")
    for key in ("pretext", "privacy"):
      if config.get(key):
        raise ValueError(f"config.{key} cannot be combined with config.federated (client-level DP is "
                         "config.federated.client_dp).")
    from medjax import build  # the run-level defaults live there
    if build.settings(config).grad_accum_steps != 1:
      raise ValueError("config.grad_accum_steps must be 1 in a federated run.")
  return options


__all__ = ["CLIENT_DP_KEYS", "DEFAULTS", "SECURE_KEYS", "SIMULATIONS", "parse"]
