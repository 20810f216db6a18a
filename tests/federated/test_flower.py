"""The Flower adapter over a real localhost federation: an embedded SuperLink (Fleet API over HTTPS, SuperNode
authentication) and two embedded SuperNodes in threads, on a two-site least-squares FedAvg problem
(tests/federated/flower_testing.py). Checks: the same weights as the same callables in a plain loop, bit for
bit; every message a site sends holds only model-shaped arrays and allowed scalar metrics; a key outside the
allowed list and a wrong CA are refused; a site refuses a server whose experiment fingerprint differs; and the
record conversions and checks on their own."""

from __future__ import annotations

import re
import threading

import numpy as np
import portpicker
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from medjax.federated import flower, flower_network
from tests.federated import flower_testing as ft


def _site_thread(outcome, k, app, port, pki, key=None, **kwargs):
  def target():
    try:
      outcome[k] = flower_network.run_site(app, f"localhost:{port}", ca_cert=kwargs.pop("ca_cert", pki["ca_cert"]),
                                   private_key=key or pki["sites"][k][0], **kwargs)
    except Exception as e:  # the test inspects it
      outcome[k] = e
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  return thread


def _server(pki, port):
  return flower_network.FleetServer(f"127.0.0.1:{port}", ca_cert=pki["ca_cert"], server_cert=pki["server_cert"],
                            server_key=pki["server_key"], allowed_keys=[pub for _, pub in pki["sites"]])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  return ft.make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def federation(pki, tmp_path_factory):
  """One federated run of NUM_ROUNDS rounds (with evaluation every round) over two sites whose every reply is
  recorded at the ClientApp boundary by a Flower mod; a stranger's key and a foreign CA tried first."""
  port = portpicker.pick_unused_port()
  sent = {0: [], 1: []}

  def spy(k):
    def mod(message, context, call_next):
      reply = call_next(message, context)
      sent[k].append((message.metadata.message_type, reply))
      return reply
    return mod
  rounds = []
  app = flower.server_app(ft.initial_weights, ft.aggregate, num_rounds=ft.NUM_ROUNDS, min_clients=2,
                          fingerprint=ft.FINGERPRINT, evaluate_every=1,
                          on_round=lambda r, w, m: rounds.append((r, {k: dict(v) for k, v in m.items()})))
  other = ft.make_pki(str(tmp_path_factory.mktemp("other_pki")), sites=1, ca_name="another CA")
  outcome = {}
  with _server(pki, port) as link:
    stranger = flower.client_app(ft.make_fit(0), lambda: ft.FINGERPRINT)
    _site_thread(outcome, "stranger", stranger, port, pki, key=pki["stranger"][0]).join(30)
    _site_thread(outcome, "foreign_ca", stranger, port, pki, key=pki["stranger"][0], ca_cert=other["ca_cert"],
                 connect_timeout_s=1.0).join(30)
    threads = [_site_thread(outcome, k, flower.client_app(ft.make_fit(k), lambda: ft.FINGERPRINT,
                                                          ft.make_evaluate(k), mods=[spy(k)]), port, pki)
               for k in range(2)]
    weights = link.run(app)
    site_order = list(link.node_ids)
  for thread in threads:
    thread.join(30)
  return dict(weights=weights, sent=sent, outcome=outcome, rounds=rounds, site_order=site_order)


def test_same_weights_as_a_plain_loop(federation):
  expected = ft.plain_loop()
  assert set(federation["weights"]) == set(expected)
  for name, value in expected.items():
    assert federation["weights"][name].dtype == value.dtype
    np.testing.assert_array_equal(federation["weights"][name], value)  # same order of sums: bit for bit
  assert not np.allclose(expected["dense/kernel"], 0)  # the run moved the weights


def test_sites_served_every_round_and_metrics_reach_the_server(federation):
  assert federation["outcome"][0] == federation["outcome"][1] == 2 * ft.NUM_ROUNDS + 1  # train, evaluate, stop
  assert [r for r, _ in federation["rounds"]] == list(range(ft.NUM_ROUNDS))
  for _, metrics in federation["rounds"]:
    assert list(metrics) == federation["site_order"]  # results in the order of the allowed keys
    assert [m["num_examples"] for m in metrics.values()] == [6, 8]
    assert all(set(m) == {"num_examples", "train_loss", "eval/eval_loss"} for m in metrics.values())


def test_every_message_a_site_sends_holds_only_model_arrays_and_allowed_scalars(federation):
  model = {name: value.shape for name, value in ft.initial_weights().items()}
  for k, sent in federation["sent"].items():
    kinds = [kind for kind, _ in sent]
    assert kinds == ["train", "evaluate"] * ft.NUM_ROUNDS + [flower.STOP], k
    for kind, reply in sent:
      assert not reply.has_error()
      records = dict(reply.content.items())
      if kind == flower.STOP:
        assert records == {}
        continue
      expected = {"update", "client_values", "metrics"} if kind == "train" else {"metrics"}
      assert set(records) == expected
      for name, record in records.items():
        if name == "metrics":
          assert isinstance(record, MetricRecord)
          assert set(record) <= set(flower.ALLOWED_METRICS)
          assert all(isinstance(v, (int, float)) for v in record.values())  # scalars, not per-example lists
        else:
          assert isinstance(record, ArrayRecord) and not isinstance(record, ConfigRecord)
          shapes = {key: tuple(array.shape) for key, array in record.items()}
          assert all(model[key] == shape for key, shape in shapes.items())
          if name == "update":
            assert shapes == model


def test_a_key_outside_the_allowed_list_is_refused(federation, pki):
  error = federation["outcome"]["stranger"]
  assert isinstance(error, PermissionError)
  assert "refused this site" in str(error) and pki["stranger"][0] in str(error)
  assert federation["outcome"][0] == 2 * ft.NUM_ROUNDS + 1  # while the allowed sites were served


def test_a_server_certificate_from_another_ca_is_refused(federation):
  error = federation["outcome"]["foreign_ca"]
  assert isinstance(error, ConnectionError) and "over TLS" in str(error)
  assert "CERTIFICATE_VERIFY_FAILED" in str(error)


def test_partial_participation_trains_only_the_selected_sites(pki):
  """With `select`, each round's train messages go to the selected sites only (here site r mod 2), and the
  result is the plain loop's over the same selection, bit for bit; evaluation still reaches every site."""
  port = portpicker.pick_unused_port()
  select = lambda round_index, num_sites: [round_index % num_sites]
  rounds, outcome = [], {}
  app = flower.server_app(ft.initial_weights, ft.aggregate, num_rounds=ft.NUM_ROUNDS, min_clients=2,
                          fingerprint=ft.FINGERPRINT, select=select, evaluate_every=ft.NUM_ROUNDS,
                          on_round=lambda r, w, m: rounds.append({k: dict(v) for k, v in m.items()}))
  with _server(pki, port) as link:
    threads = [_site_thread(outcome, k, flower.client_app(ft.make_fit(k), lambda: ft.FINGERPRINT,
                                                          ft.make_evaluate(k)), port, pki) for k in range(2)]
    weights = link.run(app)
    order = list(link.node_ids)
  for thread in threads:
    thread.join(30)
  expected = ft.plain_loop(select=select)
  assert set(weights) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(weights[name], value)
  for r, metrics in enumerate(rounds):
    trained = {node for node, m in metrics.items() if "train_loss" in m}
    assert trained == {order[r % 2]}
  assert all("eval/eval_loss" in m for m in rounds[-1].values()) and len(rounds[-1]) == 2
  with pytest.raises(ValueError, match=r"Round 0: select returned positions \[0, 0\]"):
    flower._selected([11, 12], [0, 0], 0)


def _leaky_fit(weights, round_index, server_values):
  raise KeyError("/data/site0/patient_0042.nii.gz")  # an error whose text names a patient's file


@pytest.mark.parametrize("case", ["other_experiment", "fit_fails"])
def test_a_failing_site_stops_the_run_and_reports_only_a_refusal_text(pki, case):
  """A site refuses a server whose experiment fingerprint differs (the server's error says why, naming the
  round); a fit that fails for another reason reports only its exception type, not its message."""
  port = portpicker.pick_unused_port()
  outcome = {}
  fingerprint = "fedprox/other" if case == "other_experiment" else ft.FINGERPRINT
  app = flower.server_app(ft.initial_weights, ft.aggregate, num_rounds=1, min_clients=2, fingerprint=fingerprint)
  fits = [ft.make_fit(0), ft.make_fit(1)] if case == "other_experiment" else [_leaky_fit, ft.make_fit(1)]
  with _server(pki, port) as link:
    threads = [_site_thread(outcome, k, flower.client_app(fits[k], lambda: ft.FINGERPRINT), port, pki)
               for k in range(2)]
    with pytest.raises(RuntimeError) as error:
      link.run(app)
  for thread in threads:
    thread.join(30)
  if case == "other_experiment":
    assert re.match(r"Round 0: site \(node \d+\) failed: refused: Round 0: the server's experiment fingerprint "
                    r"'fedprox/other' differs from this site's 'fedavg/linear\(3->2\)/lsq'; the site refuses "
                    r"to train \(same config on both ends\?\)\.", str(error.value))
    assert all(isinstance(outcome[k], flower.Refusal) for k in range(2))
  else:
    assert re.match(r"Round 0: site \(node \d+\) failed: KeyError \(details in the site's log\)",
                    str(error.value))
    assert "patient" not in str(error.value)
    assert isinstance(outcome[0], KeyError)  # raised at the site, in full
    assert isinstance(outcome[1], ConnectionError)  # the other site learns the run is over


def test_records_round_trip_names_dtypes_and_shapes():
  weights = {"a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(3, np.int32),
             "c": np.zeros((0, 4), np.float16)}
  back = flower.from_record(flower.to_record(weights))
  assert list(back) == list(weights)
  for name, value in weights.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape
    np.testing.assert_array_equal(back[name], value)


def test_checks_of_what_may_leave_a_site():
  model = ft.initial_weights()
  flower.check_model_shaped({"dense/bias": np.ones(2)}, model, "values", complete=False)
  with pytest.raises(ValueError, match=r"^update has arrays that are not model parameters: images\.$"):
    flower.check_model_shaped({**model, "images": np.ones((2, 3))}, model, "update", complete=True)
  with pytest.raises(ValueError, match=r"^update lacks model parameters: dense/bias\.$"):
    flower.check_model_shaped({"dense/kernel": model["dense/kernel"]}, model, "update", complete=True)
  with pytest.raises(ValueError, match=r"^update: dense/bias has shape \(3,\), the model's is \(2,\)\.$"):
    flower.check_model_shaped({**model, "dense/bias": np.ones(3)}, model, "update", complete=True)
  assert flower.check_metrics({"train_loss": np.float32(0.5)}, flower.ALLOWED_METRICS, "m") == {"train_loss": 0.5}
  with pytest.raises(ValueError, match="metric 'labels' is not allowed to leave a site"):
    flower.check_metrics({"labels": 1.0}, flower.ALLOWED_METRICS, "m")
  with pytest.raises(flower.Refusal, match=r"^m: metric 'train_loss' must be one number, got an array of shape "
                                           r"\(2,\)\.$"):  # per-example values, not repeated in the message
    flower.check_metrics({"train_loss": [0.1, 0.2]}, flower.ALLOWED_METRICS, "m")
  with pytest.raises(flower.Refusal, match=r"^m: metric 'train_loss' is not finite\.$"):
    flower.check_metrics({"train_loss": float("nan")}, flower.ALLOWED_METRICS, "m")


def _config(**changes):
  config = {"round": 1, "num_rounds": 3, "fingerprint": ft.FINGERPRINT, "setting.local_steps": 4}
  config.update(changes)
  return ConfigRecord({k: v for k, v in config.items() if v is not None})


def test_the_round_config_is_checked_as_data():
  assert flower._check_config(_config(), ft.FINGERPRINT, {"local_steps": 4}) == 1
  assert flower._check_config(_config(), ft.FINGERPRINT, None) == 1  # settings unchecked when the site has none
  with pytest.raises(ValueError, match=r"round settings differ from this site's at local_steps \(server \[4\], "
                                       r"site \[5\]\)"):
    flower._check_config(_config(), ft.FINGERPRINT, {"local_steps": 5})
  with pytest.raises(ValueError, match=r"unknown: \['code'\]"):
    flower._check_config(_config(code="import os"), ft.FINGERPRINT, None)
  with pytest.raises(ValueError, match="has round 3 of 3 rounds"):
    flower._check_config(_config(round=3), ft.FINGERPRINT, None)
  with pytest.raises(ValueError, match="expected \\['round', 'num_rounds', 'fingerprint'\\]"):
    flower._check_config(_config(fingerprint=None), ft.FINGERPRINT, None)


def test_server_app_refuses_bad_arguments():
  with pytest.raises(ValueError, match="num_rounds >= 1 and min_clients >= 1, got 0 and 2"):
    flower.server_app(ft.initial_weights, ft.aggregate, num_rounds=0, min_clients=2, fingerprint="f")
  with pytest.raises(ValueError, match="Round setting 'lr' must be a scalar or string"):
    flower.server_app(ft.initial_weights, ft.aggregate, num_rounds=1, min_clients=1, fingerprint="f",
                      settings={"lr": [0.1]})


def test_key_and_address_errors_name_the_flag(tmp_path, pki):
  with pytest.raises(FileNotFoundError, match=rf"^--private_key {tmp_path}/missing.key does not exist"):
    flower_network.load_private_key(str(tmp_path / "missing.key"))
  with pytest.raises(ValueError, match="is not an unencrypted OpenSSH or PEM private key"):
    flower_network.load_private_key(pki["ca_cert"])
  with pytest.raises(ValueError, match="is not an OpenSSH or PEM public key"):
    flower_network.load_public_key(pki["sites"][0][0])
  assert flower_network.load_public_key(pki["sites"][0][1]).startswith(b"-----BEGIN PUBLIC KEY-----")
  with pytest.raises(ValueError, match=r"^--server 'localhost' must be HOST:PORT\.$"):
    flower_network.parse_address("localhost", "--server")
  assert flower_network.parse_address("[::1]:9092", "--address") == ("::1", 9092)
