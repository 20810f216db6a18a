"""A stand-in for `medjax.federated.site` (the lead's module, which turns a config into the federated callables)
over the least-squares problem of flower_testing, so that the fl_server / fl_client tools run end to end in
tests. `run_tool` is the command a test starts as a subprocess: it registers this module as
`medjax.federated.site` and runs the tool named by its first argument with the rest of the command line."""

from __future__ import annotations

import sys

from tests.federated import flower_testing as ft


def fingerprint(config) -> str:
  return f"{ft.FINGERPRINT}/rounds={config.num_rounds}"


def site_callables(config, site_index: int):
  return ft.make_fit(site_index), ft.make_evaluate(site_index), lambda: fingerprint(config)


def server_callables(config):
  return ft.initial_weights, ft.aggregate, config.num_rounds, 2, None


def run_tool(argv) -> None:
  from medjax.tools import cli, fl_client, fl_server
  sys.modules["medjax.federated.site"] = sys.modules[__name__]
  tool = {"fl_client": fl_client, "fl_server": fl_server}[argv[0]]
  sys.argv[:] = argv
  cli.run(tool.main, tool._FLAGS)


if __name__ == "__main__":
  run_tool(sys.argv[1:])
