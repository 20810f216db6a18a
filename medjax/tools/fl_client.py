r"""A hospital's side of a federation: train the experiment's model on this site's data when the coordinator asks.

  python -m medjax.tools.fl_client --config experiments/X.py:args --server coordinator.example.org:9092 \
      --site K --ca_cert ca.pem --private_key siteK.key [--connect_timeout_s 60]

The site's callables come from `medjax.federated.site.site_callables(config, K)` (its local update, evaluation
and experiment fingerprint, on site K's own data); `medjax.federated.flower` wraps them as a Flower ClientApp and
serves it as an embedded SuperNode (`flower_network.run_site`): HTTPS verified against `--ca_cert`, every request signed
with the EC key `--private_key` (its public key must be in the coordinator's `--allowed_keys`), and no code from
the server: the site never downloads the Flower app bundle; the server's round config is data, checked against
this site's experiment fingerprint and refused on a mismatch. Only the model update and scalar metrics leave
the site. The command returns when the coordinator ends the run.

A user's mistake (a missing certificate or key file, a malformed --server, a key the server does not allow, a
server that cannot be reached over TLS) prints one line `medjax.tools.fl_client: error: ...` and exits with
status 2 (tools/cli.py).
"""

from __future__ import annotations

from typing import Sequence

from absl import flags, logging

from medjax import config_lib
from medjax.federated import flower, flower_network
from medjax.tools import cli

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_CONFIG = flags.DEFINE_string("config", None, "Experiment: path.py[:arg], the same as the coordinator's.",
                              flag_values=_FLAGS)
_SERVER = flags.DEFINE_string("server", None, "The coordinator's Fleet API, HOST:PORT.", flag_values=_FLAGS)
_SITE = flags.DEFINE_integer("site", 0, "This site's index K (which data the experiment gives it).",
                             flag_values=_FLAGS)
_CA_CERT = flags.DEFINE_string("ca_cert", None, "CA certificate (PEM) that signed the server's certificate.",
                               flag_values=_FLAGS)
_PRIVATE_KEY = flags.DEFINE_string("private_key", None, "This site's EC private key (OpenSSH or PEM) for node "
                                   "authentication.", flag_values=_FLAGS)
_CONNECT_TIMEOUT = flags.DEFINE_float("connect_timeout_s", 60.0, "Seconds to keep trying to reach the server.",
                                      flag_values=_FLAGS)


def check_flags() -> dict:
  """The flags as run_site's arguments, after the checks that need no experiment: required flags, existing
  files (a UsageError naming the flag and path), HOST:PORT and a site index >= 0."""
  for name, flag in (("config", _CONFIG), ("server", _SERVER), ("ca_cert", _CA_CERT),
                     ("private_key", _PRIVATE_KEY)):
    if not flag.value:
      raise cli.UsageError(f"--{name} is required.")
  ca_cert = cli.check_exists(_CA_CERT.value, "--ca_cert")
  private_key = cli.check_exists(_PRIVATE_KEY.value, "--private_key")
  cli.check_exists(_CONFIG.value.split(":", 1)[0], "--config")
  flower_network.load_private_key(private_key)  # a wrong key format fails here, before any data loads
  if _SITE.value < 0:
    raise cli.UsageError(f"--site must be a site index >= 0, got {_SITE.value}.")
  if _CONNECT_TIMEOUT.value <= 0:
    raise cli.UsageError(f"--connect_timeout_s must be positive, got {_CONNECT_TIMEOUT.value}.")
  try:
    flower_network.parse_address(_SERVER.value, "--server")
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  return dict(server=_SERVER.value, ca_cert=ca_cert, private_key=private_key,
              connect_timeout_s=_CONNECT_TIMEOUT.value)


def main(argv) -> None:  # absl's app.run exits with main's return value
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  options = check_flags()
  config = config_lib.load_config(_CONFIG.value)
  from medjax.federated import site  # (the experiment's callables: loaded only to run)
  fit, evaluate, fingerprint = site.site_callables(config, _SITE.value)
  app = flower.client_app(fit, fingerprint, evaluate)
  try:
    answered = flower_network.run_site(app, log=logging.info, **options)
  except ConnectionError as e:
    raise cli.UsageError(str(e)) from e
  logging.info("Site %d answered %d messages; the coordinator ended the run.", _SITE.value, answered)


def call(argv: Sequence[str]) -> object:
  """The command line `argv` (program name first) in this process, as `cli.call` runs a tool: for tests."""
  return cli.call(main, _FLAGS, argv)


if __name__ == "__main__":
  cli.run(main, _FLAGS)
