"""The federated tools' flags and refusal paths, none of which loads the experiment or its callables
(medjax.federated.site): required flags, missing certificate and key files named with their flag, unreadable
keys, repeated allowed keys, malformed addresses, each a one-line error with exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from medjax.tools import fl_client, fl_server
from tests.federated import flower_testing as ft

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("pki"))
  paths = ft.make_pki(folder)
  paths["config"] = os.path.join(folder, "experiment.py")
  with open(paths["config"], "w") as f:  # never loaded on these paths
    f.write("def get_config(arg=None):\n  raise AssertionError('loaded')\n")
  return paths


def _client_argv(pki, **changes):
  flags = {"config": pki["config"], "server": "localhost:9092", "site": "1", "ca_cert": pki["ca_cert"],
           "private_key": pki["sites"][1][0]}
  flags.update(changes)
  return ["fl_client"] + [f"--{k}={v}" for k, v in flags.items() if v is not None]


def _server_argv(pki, **changes):
  flags = {"config": pki["config"], "address": "127.0.0.1:9092", "ca_cert": pki["ca_cert"],
           "server_cert": pki["server_cert"], "server_key": pki["server_key"],
           "allowed_keys": ",".join(pub for _, pub in pki["sites"])}
  flags.update(changes)
  return ["fl_server"] + [f"--{k}={v}" for k, v in flags.items() if v is not None]


def _error(tool, argv, capsys) -> str:
  # Another test of the session may have imported the site module; the check below is about this call.
  sys.modules.pop("medjax.federated.site", None)
  with pytest.raises(SystemExit) as exit_info:
    tool.call(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "medjax.federated.site" not in sys.modules  # refused before the experiment's callables load
  return err


def test_client_refuses_a_missing_certificate_naming_the_flag_and_path(pki, tmp_path, capsys):
  missing = str(tmp_path / "ca.pem")
  assert _error(fl_client, _client_argv(pki, ca_cert=missing), capsys) == (
    f"medjax.tools.fl_client: error: --ca_cert {missing} does not exist.")
  missing_key = str(tmp_path / "site1.key")
  assert _error(fl_client, _client_argv(pki, private_key=missing_key), capsys) == (
    f"medjax.tools.fl_client: error: --private_key {missing_key} does not exist.")


def test_client_refuses_bad_flags(pki, capsys):
  assert _error(fl_client, _client_argv(pki, server=None), capsys) == (
    "medjax.tools.fl_client: error: --server is required.")
  assert _error(fl_client, _client_argv(pki, server="localhost"), capsys).endswith(
    "--server 'localhost' must be HOST:PORT.")
  assert _error(fl_client, _client_argv(pki, site="-1"), capsys).endswith("--site must be a site index >= 0, got -1.")
  err = _error(fl_client, _client_argv(pki, private_key=pki["sites"][1][1]), capsys)  # the public key by mistake
  assert f"--private_key {pki['sites'][1][1]} is not an unencrypted OpenSSH or PEM private key" in err
  assert _error(fl_client, _client_argv(pki) + ["extra"], capsys).endswith("Unexpected arguments: extra")


def test_server_refuses_missing_files_naming_the_flag_and_path(pki, tmp_path, capsys):
  for flag in ("ca_cert", "server_cert", "server_key"):
    missing = str(tmp_path / f"{flag}.pem")
    assert _error(fl_server, _server_argv(pki, **{flag: missing}), capsys) == (
      f"medjax.tools.fl_server: error: --{flag} {missing} does not exist.")
  missing = str(tmp_path / "site9.pub")
  err = _error(fl_server, _server_argv(pki, allowed_keys=f"{pki['sites'][0][1]},{missing}"), capsys)
  assert err == f"medjax.tools.fl_server: error: --allowed_keys {missing} does not exist."


def test_server_refuses_bad_flags(pki, capsys):
  assert _error(fl_server, _server_argv(pki, allowed_keys=None), capsys).endswith(
    "--allowed_keys is required: the public key file of every site allowed to connect.")
  twice = f"{pki['sites'][0][1]},{pki['sites'][0][1]}"
  assert "--allowed_keys lists the same public key twice" in _error(
    fl_server, _server_argv(pki, allowed_keys=twice), capsys)
  assert "is not an OpenSSH or PEM public key" in _error(
    fl_server, _server_argv(pki, allowed_keys=pki["sites"][0][0]), capsys)  # a private key by mistake
  assert _error(fl_server, _server_argv(pki, address="9092"), capsys).endswith("--address '9092' must be HOST:PORT.")
  assert _error(fl_server, _server_argv(pki, round_timeout_s="0"), capsys).endswith(
    "--round_timeout_s must be positive, got 0.0.")
  assert _error(fl_server, _server_argv(pki, config=None), capsys) == (
    "medjax.tools.fl_server: error: --config is required.")


def test_valid_flags_pass_the_checks(pki):
  fl_client._FLAGS(_client_argv(pki))
  options = fl_client.check_flags()
  assert options == dict(server="localhost:9092", ca_cert=pki["ca_cert"], private_key=pki["sites"][1][0],
                         connect_timeout_s=60.0)
  fl_server._FLAGS(_server_argv(pki))
  options = fl_server.check_flags()
  assert options["allowed_keys"] == [pub for _, pub in pki["sites"]] and options["address"] == "127.0.0.1:9092"


EXPERIMENT = """
import ml_collections as mlc


def get_config(arg=None):
  return mlc.ConfigDict(dict(num_rounds=int(arg or 2)))
"""


def _start(argv, log):
  return subprocess.Popen([sys.executable, "-m", "tests.federated.flower_site", *argv], cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # own process group


def test_the_tools_run_a_federation_as_three_processes(pki, tmp_path):
  """fl_server and two fl_client processes on localhost (the experiment's callables from a stand-in for
  medjax.federated.site): the saved final weights are the plain loop's; every process exits 0."""
  spec = str(tmp_path / "lsq_experiment.py")
  with open(spec, "w") as f:
    f.write(EXPERIMENT)
  port, output = portpicker.pick_unused_port(), str(tmp_path / "final.npz")
  argv = _server_argv(pki, config=f"{spec}:3", address=f"127.0.0.1:{port}", output=output, connect_timeout_s="60")
  procs, logs = [], []
  try:
    for k, tool_argv in enumerate([argv] + [_client_argv(pki, config=f"{spec}:3", server=f"localhost:{port}",
                                                         site=str(s), private_key=pki["sites"][s][0])
                                            for s in range(2)]):
      logs.append(open(tmp_path / f"log{k}.txt", "w+"))
      procs.append(_start(tool_argv, logs[-1]))
    codes = [proc.wait(timeout=60) for proc in procs]
    text = []
    for log in logs:
      log.seek(0)
      text.append(log.read())
    assert codes == [0, 0, 0], "\n\n".join(t[-2000:] for t in text)
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for log in logs:
      log.close()
  final, expected = np.load(output), ft.plain_loop(num_rounds=3)
  assert sorted(final.files) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(final[name], value)
