r"""The coordinator of a federation: an embedded Flower SuperLink that runs the experiment's rounds over the sites.

  python -m medjax.tools.fl_server --config experiments/X.py:args --address 0.0.0.0:9092 \
      --ca_cert ca.pem --server_cert server.pem --server_key server.key \
      --allowed_keys site0.pub,site1.pub [--output final_weights.npz] [--round_timeout_s 3600] \
      [--connect_timeout_s 600]

Then each site runs `python -m medjax.tools.fl_client ... --server HOST:9092 --site K` (see fl_client).
The aggregation comes from `medjax.federated.site.server_callables(config)` (initial weights, aggregation,
number of rounds, sites per round); `medjax.federated.flower` wraps it as a Flower ServerApp and runs it on a
`FleetServer`: the Fleet API over HTTPS with the server certificate and key (signed by the CA the sites trust;
its subject alternative names must include the host name or IP address the sites dial), and SuperNode
authentication: only sites whose public key (OpenSSH `.pub` or PEM) is in `--allowed_keys` may
connect. Every round goes to every connected site once at least the experiment's sites per round are there;
results are aggregated in the order of `--allowed_keys`, so a run is reproducible. The final weights are saved
to `--output` (numpy .npz, names as `medjax.param_paths` writes them) when given.

A user's mistake (a missing certificate, key or public key file, a malformed --address, a repeated key, fewer
allowed keys than sites per round) prints one line `medjax.tools.fl_server: error: ...` and exits with status 2.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import flags, logging

from medjax import config_lib
from medjax.federated import flower, flower_network
from medjax.tools import cli

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_CONFIG = flags.DEFINE_string("config", None, "Experiment: path.py[:arg], the same as the sites'.", flag_values=_FLAGS)
_ADDRESS = flags.DEFINE_string("address", "0.0.0.0:9092", "Where the Fleet API listens, HOST:PORT.",
                               flag_values=_FLAGS)
_CA_CERT = flags.DEFINE_string("ca_cert", None, "CA certificate (PEM) that signed --server_cert.", flag_values=_FLAGS)
_SERVER_CERT = flags.DEFINE_string("server_cert", None, "Server TLS certificate (PEM).", flag_values=_FLAGS)
_SERVER_KEY = flags.DEFINE_string("server_key", None, "Server TLS private key (PEM).", flag_values=_FLAGS)
_ALLOWED_KEYS = flags.DEFINE_list("allowed_keys", [], "Public keys of the allowed sites, comma separated, in site "
                                  "order.", flag_values=_FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Where to save the final weights (.npz).", flag_values=_FLAGS)
_ROUND_TIMEOUT = flags.DEFINE_float("round_timeout_s", 3600.0, "Seconds to wait for the sites' replies of a round.",
                                    flag_values=_FLAGS)
_CONNECT_TIMEOUT = flags.DEFINE_float("connect_timeout_s", 600.0, "Seconds to wait for enough sites to connect.",
                                      flag_values=_FLAGS)


def check_flags() -> dict:
  """FleetServer's arguments from the flags, after the checks that need no experiment: required flags, existing
  files (a UsageError naming the flag and path), readable public keys and HOST:PORT."""
  for name, flag in (("config", _CONFIG), ("ca_cert", _CA_CERT), ("server_cert", _SERVER_CERT),
                     ("server_key", _SERVER_KEY)):
    if not flag.value:
      raise cli.UsageError(f"--{name} is required.")
  if not _ALLOWED_KEYS.value:
    raise cli.UsageError("--allowed_keys is required: the public key file of every site allowed to connect.")
  files = {flag: cli.check_exists(value, flag) for flag, value in (
    ("--ca_cert", _CA_CERT.value), ("--server_cert", _SERVER_CERT.value), ("--server_key", _SERVER_KEY.value))}
  keys = [cli.check_exists(path, "--allowed_keys") for path in _ALLOWED_KEYS.value]
  cli.check_exists(_CONFIG.value.split(":", 1)[0], "--config")
  if len({flower_network.load_public_key(k) for k in keys}) != len(keys):
    raise cli.UsageError(f"--allowed_keys lists the same public key twice: {','.join(_ALLOWED_KEYS.value)}.")
  for flag in (_ROUND_TIMEOUT, _CONNECT_TIMEOUT):
    if flag.value <= 0:
      raise cli.UsageError(f"--{flag.name} must be positive, got {flag.value}.")
  try:
    flower_network.parse_address(_ADDRESS.value, "--address")
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  return dict(address=_ADDRESS.value, ca_cert=files["--ca_cert"], server_cert=files["--server_cert"],
              server_key=files["--server_key"], allowed_keys=keys)


def main(argv) -> None:  # absl's app.run exits with main's return value
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  options = check_flags()
  config = config_lib.load_config(_CONFIG.value)
  from medjax.federated import site  # (the experiment's callables: loaded only to run)
  initial_weights, aggregate, num_rounds, num_sites, select = site.server_callables(config)
  if num_sites > len(options["allowed_keys"]):
    raise cli.UsageError(f"The experiment has {num_sites} sites; --allowed_keys has only "
                         f"{len(options['allowed_keys'])}.")
  fingerprint = site.fingerprint(config) if hasattr(site, "fingerprint") else site.site_callables(config, 0)[2]()

  def on_round(round_index, weights, metrics):
    logging.info("Round %d/%d: %s", round_index + 1, num_rounds, metrics)
  app = flower.server_app(initial_weights, aggregate, num_rounds=num_rounds, min_clients=num_sites,
                          fingerprint=fingerprint, round_timeout_s=_ROUND_TIMEOUT.value,
                          connect_timeout_s=_CONNECT_TIMEOUT.value, on_round=on_round, select=select)
  with flower_network.FleetServer(**options) as link:
    logging.info("Fleet API on https://%s; waiting for %d sites.", _ADDRESS.value, num_sites)
    weights = link.run(app)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    np.savez(_OUTPUT.value, **weights)
    logging.info("Final weights: %s", os.path.abspath(_OUTPUT.value))


def call(argv: Sequence[str]) -> object:
  """The command line `argv` (program name first) in this process, as `cli.call` runs a tool: for tests."""
  return cli.call(main, _FLAGS, argv)


if __name__ == "__main__":
  cli.run(main, _FLAGS)
