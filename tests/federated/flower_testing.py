"""Test helpers for the Flower adapter: a tiny PKI (CA, localhost server certificate, EC site keys) made with
`cryptography`, and a two-site least-squares federation (FedAvg of a few local gradient steps) as plain
numpy callables in the contract of medjax.federated.flower."""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Dict, List, Tuple

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FINGERPRINT = "fedavg/linear(3->2)/lsq"
NUM_ROUNDS, LOCAL_STEPS, LR = 3, 4, 0.1


def _name(common_name: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: str, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return path


def make_pki(folder: str, sites: int = 2, ca_name: str = "medjax test CA") -> Dict[str, object]:
  """ca.pem, server.pem / server.key (for localhost and 127.0.0.1), and siteK.key (PEM) / siteK.pub (OpenSSH)
  for K < sites, plus an unlisted stranger.key / stranger.pub; the paths by name."""
  os.makedirs(folder, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256()))
  server_key = ec.generate_private_key(ec.SECP256R1())
  alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
  server = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(alt, critical=False).sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  paths: Dict[str, object] = {
    "ca_cert": _write(os.path.join(folder, "ca.pem"), ca.public_bytes(pem)),
    "server_cert": _write(os.path.join(folder, "server.pem"), server.public_bytes(pem)),
    "server_key": _write(os.path.join(folder, "server.key"), server_key.private_bytes(
      pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
  }
  keys: List[Tuple[str, str]] = []
  for name in [f"site{k}" for k in range(sites)] + ["stranger"]:
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write(os.path.join(folder, f"{name}.key"), key.private_bytes(
      pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public = _write(os.path.join(folder, f"{name}.pub"), key.public_key().public_bytes(
      serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    keys.append((private, public))
  paths["sites"], paths["stranger"] = keys[:-1], keys[-1]
  return paths


# ------------------------------------------------------------------------------------------------ problem


def site_data(site: int) -> Tuple[np.ndarray, np.ndarray]:
  """Site `site`'s least-squares data: x (n, 3) float32, y (n, 2) float32, n = 6 + 2 * site (unequal sizes)."""
  rng = np.random.default_rng(100 + site)
  x = rng.normal(size=(6 + 2 * site, 3)).astype(np.float32)
  w_true = np.arange(6, dtype=np.float32).reshape(3, 2) / 5 + site  # different optimum per site
  return x, (x @ w_true + 0.01 * rng.normal(size=(len(x), 2))).astype(np.float32)


def initial_weights() -> Dict[str, np.ndarray]:
  return {"dense/kernel": np.zeros((3, 2), np.float32), "dense/bias": np.zeros((2,), np.float32)}


def make_fit(site: int):
  """fit(weights, round_index, server_values) for site `site`: LOCAL_STEPS full-batch gradient steps on the
  mean squared error; returns the weight delta as the update and the mean loss over its steps."""
  x, y = site_data(site)

  def fit(weights, round_index, server_values):
    del round_index, server_values
    kernel, bias = weights["dense/kernel"].copy(), weights["dense/bias"].copy()
    losses = []
    for _ in range(LOCAL_STEPS):
      err = x @ kernel + bias - y
      losses.append(float(np.mean(err ** 2)))
      kernel -= LR * (2 / err.size) * x.T @ err
      bias -= LR * (2 / err.size) * err.sum(0)
    update = {"dense/kernel": kernel - weights["dense/kernel"], "dense/bias": bias - weights["dense/bias"]}
    return update, {}, len(x), {"train_loss": float(np.mean(losses))}
  return fit


def make_evaluate(site: int):
  x, y = site_data(site)

  def evaluate(weights):
    return {"eval_loss": float(np.mean((x @ weights["dense/kernel"] + weights["dense/bias"] - y) ** 2))}
  return evaluate


def aggregate(round_index, weights, server_values, results):
  """FedAvg (McMahan et al. 2017): weights plus the example-weighted mean of the updates."""
  del round_index
  total = sum(n for _, _, n in results)
  new = {name: value + sum(n / total * update[name] for update, _, n in results) for name, value in weights.items()}
  return new, server_values


def plain_loop(num_rounds: int = NUM_ROUNDS, sites: int = 2, select=None) -> Dict[str, np.ndarray]:
  """The same federation as a plain Python loop over the same callables: the reference result. `select(round,
  sites)`: the positions of the sites that train in a round (all by default)."""
  fits, weights, server_values = [make_fit(k) for k in range(sites)], initial_weights(), {}
  for round_index in range(num_rounds):
    results = []
    chosen = range(sites) if select is None else sorted(select(round_index, sites))
    for fit in [fits[k] for k in chosen]:
      update, client_values, n, _ = fit(weights, round_index, server_values)
      results.append((update, client_values, n))
    weights, server_values = aggregate(round_index, weights, server_values, results)
  return weights
