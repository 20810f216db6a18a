r"""Flower adapter: the federated client update and server aggregation as a Flower ClientApp and ServerApp,
run over a real network with TLS and SuperNode (node) authentication.

Why an adapter: hospitals run the same client code as the one-machine simulation, but over an engine that
handles the network, so the algorithm (FedAvg, FedProx, FedAdam, SCAFFOLD, ...) is written once as two plain
callables over dicts of numpy arrays (`Weights`, flat "path/to/leaf" -> array, see `medjax.param_paths`):

  client  fit(weights, round_index, server_values) -> (update, client_values, num_examples, metrics)
          evaluate(weights) -> metrics                              (optional)
          fingerprint() -> str                                      (the experiment: algorithm, model, data shape)
  server  initial_weights() -> weights
          aggregate(round_index, weights, server_values, [(update, client_values, num_examples), ...])
              -> (new_weights, new_server_values)

`server_values` / `client_values` carry extra per-round state such as SCAFFOLD control variates (empty for
FedAvg). `client_app(...)` and `server_app(...)` wrap them as Flower 1.42 apps (Message API: ArrayRecord,
ConfigRecord, MetricRecord); `flower_network.run_site` and `flower_network.FleetServer` run them over the
network.

Deployment. Flower 1.42 deploys by SuperLink (coordinator) and SuperNodes (sites); its stock SuperNode installs
and executes the app bundle (FAB) that the SuperLink sends, i.e. code from the server. A site here executes no
code from the server: `run_site` is an embedded SuperNode that speaks Flower's Fleet API (HTTPS, with the
node's signed requests) and hands each message to the site's own ClientApp; it never fetches a FAB. The
coordinator's `FleetServer` is an embedded SuperLink that exposes only the Fleet API (no Control or Runtime API
to the untrusted network), holds the list of allowed node public keys, and runs the ServerApp in-process.
Commands (flags in the tools' docstrings):

  coordinator  python -m medjax.tools.fl_server --config experiments/X.py:args --address 0.0.0.0:9092 \
                   --ca_cert ca.pem --server_cert server.pem --server_key server.key \
                   --allowed_keys site0.pub,site1.pub
  site K       python -m medjax.tools.fl_client --config experiments/X.py:args --server coordinator:9092 \
                   --site K --ca_cert ca.pem --private_key siteK.key

TLS is not optional: the site verifies the server certificate against the CA certificate, and the server
refuses every node whose public key is not in `--allowed_keys` (Flower's SuperNode authentication: each request
carries the node's public key and an ECDSA signature of a fresh timestamp). Keys are EC keys (NIST curves,
e.g. `ssh-keygen -t ecdsa -b 384 -N "" -f site0`), private keys as OpenSSH or PEM, public keys as OpenSSH
`.pub` or PEM.

What crosses the network is data only. The server sends, per round, the weights, the server values and a
ConfigRecord of scalars (round, number of rounds, experiment fingerprint, optional round settings); the site
checks them against its own experiment and refuses a mismatch (`Refusal`, a ValueError naming the round and
key), never imports or evaluates them. A site sends only model-shaped arrays (the update and the client values, with the
model's names and shapes) and an allowed set of scalar metrics (`ALLOWED_METRICS`): no images, labels or
per-example values. `client_app` enforces this on every reply, before it leaves the site, and the server checks
the shapes again on receipt. When a site fails, the server learns the text of a `Refusal` (round and key names)
or else only the exception's type: another error's message may name a patient's file.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

Weights = Dict[str, np.ndarray]
FitFn = Callable[[Weights, int, Weights], Tuple[Weights, Weights, int, Dict[str, float]]]
AggregateFn = Callable[[int, Weights, Weights, List[Tuple[Weights, Weights, int]]], Tuple[Weights, Weights]]

# Scalars a site may report: counts and means over its whole local data, nothing per example.
ALLOWED_METRICS = ("num_examples", "train_loss", "eval_loss", "accuracy", "dice", "auc")
# Keys of the ConfigRecord the server sends each round; round settings are prefixed with SETTING.
CONFIG_KEYS = ("round", "num_rounds", "fingerprint")
SETTING = "setting."
STOP = "query.stop"  # the server's goodbye after the last round: the site replies empty and exits
OBJECT_WAIT_S = 300.0  # how long the server waits for the arrays of a reply it has the header of
REPLY_GRACE_S = 1.0  # how long a failing site stays online so that the server reads its reason
SITE_ORDER = "medjax.site_order"  # run_config key: node ids in the order of the allowed keys (aggregation order)


class Refusal(ValueError):
  """A site's check failed (the server's config, or what its own fit would send): the message names the round
  and key, never data, so it is the one error text a site reports to the server."""


# ------------------------------------------------------------------------------------------------ records


def to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
  """An ArrayRecord of `weights` (names kept, arrays copied as numpy with their dtype and shape)."""
  # np.array(order="C"), not np.ascontiguousarray, which turns a 0-d parameter into shape (1,).
  return ArrayRecord({name: Array(np.array(value, order="C")) for name, value in weights.items()})


def from_record(record: ArrayRecord) -> Weights:
  """The dict of numpy arrays an ArrayRecord holds, in its order."""
  return {name: array.numpy() for name, array in record.items()}


def _shapes(weights: Mapping[str, np.ndarray]) -> Dict[str, Tuple[int, ...]]:
  return {name: tuple(np.shape(value)) for name, value in weights.items()}


def check_model_shaped(values: Mapping[str, Any], model: Mapping[str, Any], what: str, *, complete: bool) -> None:
  """ValueError unless every array of `values` has a name and shape of the `model` arrays (all of them when
  `complete`), so that nothing but model-shaped arrays leaves a site."""
  shapes, model_shapes = _shapes(values), _shapes(model)
  unknown = sorted(set(shapes) - set(model_shapes))
  if unknown:
    raise Refusal(f"{what} has arrays that are not model parameters: {', '.join(unknown[:5])}.")
  missing = sorted(set(model_shapes) - set(shapes)) if complete else []
  if missing:
    raise Refusal(f"{what} lacks model parameters: {', '.join(missing[:5])}.")
  for name, shape in shapes.items():
    if shape != model_shapes[name]:
      raise Refusal(f"{what}: {name} has shape {shape}, the model's is {model_shapes[name]}.")


def check_metrics(metrics: Mapping[str, Any], allowed: Sequence[str], what: str) -> Dict[str, float]:
  """`metrics` as floats when each key is allowed and each value a finite scalar, else a ValueError."""
  out = {}
  for key, value in metrics.items():
    if key not in allowed:
      raise Refusal(f"{what}: metric {key!r} is not allowed to leave a site (allowed: {', '.join(allowed)}).")
    if np.ndim(value) != 0:  # the message names the shape, never the values
      raise Refusal(f"{what}: metric {key!r} must be one number, got an array of shape {np.shape(value)}.")
    if not math.isfinite(float(value)):
      raise Refusal(f"{what}: metric {key!r} is not finite.")
    out[key] = float(value)
  return out


# ------------------------------------------------------------------------------------------------ ClientApp


def _check_config(config: ConfigRecord, own_fingerprint: str, settings: Optional[Mapping[str, Any]]) -> int:
  """The round index the server asks for, after checking its ConfigRecord against this site's experiment."""
  keys = set(config.keys())
  unknown = sorted(k for k in keys if k not in CONFIG_KEYS and not k.startswith(SETTING))
  if unknown or not set(CONFIG_KEYS) <= keys:
    raise Refusal(f"The server's round config has keys {sorted(keys)}; expected {list(CONFIG_KEYS)} and "
                     f"'{SETTING}*' settings (unknown: {unknown}).")
  for key, value in config.items():
    if not isinstance(value, (bool, int, float, str)):
      raise Refusal(f"The server's round config {key!r} is not a scalar or string: {type(value).__name__}.")
  round_index, num_rounds = config["round"], config["num_rounds"]
  if not (isinstance(round_index, int) and isinstance(num_rounds, int) and 0 <= round_index < num_rounds):
    raise Refusal(f"The server's round config has round {round_index!r} of {num_rounds!r} rounds.")
  if config["fingerprint"] != own_fingerprint:
    raise Refusal(f"Round {round_index}: the server's experiment fingerprint {config['fingerprint']!r} differs "
                     f"from this site's {own_fingerprint!r}; the site refuses to train (same config on both ends?).")
  sent = {k[len(SETTING):]: v for k, v in config.items() if k.startswith(SETTING)}
  if settings is not None and sent != dict(settings):
    diff = sorted(k for k in set(sent) | set(settings) if sent.get(k) != settings.get(k))
    theirs, ours = [sent.get(k) for k in diff], [settings.get(k) for k in diff]
    raise Refusal(f"Round {round_index}: the server's round settings differ from this site's at "
                     f"{', '.join(diff)} (server {theirs}, site {ours}).")
  return round_index


def client_app(fit: FitFn, fingerprint: Callable[[], str], evaluate: Optional[Callable[[Weights], Dict]] = None, *,
               settings: Optional[Mapping[str, Any]] = None, allowed_metrics: Sequence[str] = ALLOWED_METRICS,
               mods: Sequence[Callable] = ()) -> ClientApp:
  """A Flower ClientApp running `fit` on "train" messages and `evaluate` (when given) on "evaluate" messages.

  Receives: content "weights" and "server_values" (ArrayRecords) and "config" (ConfigRecord: round, num_rounds,
  fingerprint, and `setting.<key>` round settings, checked against `fingerprint()` and `settings`).
  Replies: "update" (ArrayRecord with exactly the weights' names and shapes), "client_values" (ArrayRecord of
  weight-shaped arrays), "metrics" (MetricRecord: num_examples, an int > 0, plus `allowed_metrics` scalars).
  A reply that would carry anything else raises ValueError at the site instead of being sent. `mods` are Flower
  mods (`mod(message, context, call_next) -> reply`), wrapped around every handler (e.g. to audit replies).
  """
  app = ClientApp(mods=list(mods))
  own = fingerprint()

  @app.train()
  def train(message: Message, context: Context) -> Message:  # (Flower's handler signature)
    content = message.content
    round_index = _check_config(content["config"], own, settings)
    weights, server_values = from_record(content["weights"]), from_record(content["server_values"])
    check_model_shaped(server_values, weights, f"Round {round_index}: the server values", complete=False)
    update, client_values, num_examples, metrics = fit(weights, round_index, server_values)
    what = f"Round {round_index}: fit's"
    check_model_shaped(update, weights, f"{what} update", complete=True)
    check_model_shaped(client_values, weights, f"{what} client values", complete=False)
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
      raise Refusal(f"{what} num_examples must be a positive integer, got {num_examples!r}.")
    metrics = check_metrics(metrics, allowed_metrics, f"{what} metrics")
    metrics["num_examples"] = int(num_examples)
    reply = RecordDict({"update": to_record(update), "client_values": to_record(client_values),
                        "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=message)

  @app.evaluate()
  def evaluate_handler(message: Message, context: Context) -> Message:
    content = message.content
    round_index = _check_config(content["config"], own, settings)
    if evaluate is None:
      raise Refusal(f"Round {round_index}: the server asked for an evaluation; this site has no evaluate.")
    metrics = check_metrics(evaluate(from_record(content["weights"])), allowed_metrics,
                            f"Round {round_index}: evaluate's metrics")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

  @app.query("stop")
  def stop(message: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=message)

  return app


# ------------------------------------------------------------------------------------------------ ServerApp


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> List[int]:
  deadline = time.monotonic() + timeout_s
  while len(nodes := sorted(grid.get_node_ids())) < count:
    if time.monotonic() > deadline:
      raise TimeoutError(f"Only {len(nodes)} of the {count} sites needed connected within {timeout_s:.0f} s.")
    time.sleep(0.2)
  return nodes


def _ordered(nodes: Sequence[int], context: Context) -> List[int]:
  """`nodes` in the site order of the run (the allowed keys' order), the rest by node id: a fixed order of
  results makes the aggregation's floating-point sums reproducible."""
  order = [int(n) for n in str(context.run_config.get(SITE_ORDER, "")).split(",") if n]
  rank = {node: i for i, node in enumerate(order)}
  return sorted(nodes, key=lambda n: (rank.get(n, len(rank)), n))


def _replies(grid: Grid, messages: List[Message], timeout_s: float, what: str) -> Dict[int, Message]:
  """The replies to `messages` by destination node id, or an error naming every site that failed (its own
  report first, then errors the SuperLink wrote for it, e.g. a node that went offline) or did not answer."""
  replies = list(grid.send_and_receive(messages, timeout=timeout_s))
  node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set by the push
  by_node, failures = {}, []
  for reply in replies:
    node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    by_node[node] = reply
    if reply.has_error():
      from_site = reply.metadata.src_node_id == node
      failures.append((not from_site, f"site (node {node}) failed: {reply.error.reason}"))
  if failures:
    raise RuntimeError(f"{what}: " + "; ".join(text for _, text in sorted(failures)))
  missing = sorted(node for node in node_of.values() if node not in by_node)
  if missing:
    raise TimeoutError(f"{what}: no reply from the sites with node ids {missing} within {timeout_s:.0f} s.")
  return by_node


def _selected(nodes: Sequence[int], positions: Sequence[int], round_index: int) -> List[int]:
  positions = [int(p) for p in positions]
  if not positions or len(set(positions)) != len(positions) or not all(0 <= p < len(nodes) for p in positions):
    raise ValueError(f"Round {round_index}: select returned positions {positions}; expected distinct positions "
                     f"into the {len(nodes)} connected sites.")
  return [nodes[p] for p in sorted(positions)]


def server_app(initial_weights: Callable[[], Weights], aggregate: AggregateFn, *, num_rounds: int, min_clients: int,
               fingerprint: str, settings: Optional[Mapping[str, Any]] = None, evaluate_every: int = 0,
               round_timeout_s: float = 3600.0, connect_timeout_s: float = 600.0,
               on_round: Optional[Callable[[int, Weights, Dict[int, Dict[str, float]]], None]] = None,
               select: Optional[Callable[[int, int], Sequence[int]]] = None) -> ServerApp:
  """A Flower ServerApp running `num_rounds` rounds over the connected sites (at least `min_clients`).

  Each round sends the weights, the server values and the round config (round, num_rounds, `fingerprint`,
  `settings` as `setting.<key>` scalars) to the round's sites, collects (update, client_values, num_examples)
  in the run's site order and calls `aggregate`. The round's sites are every connected site, or, with
  `select(round_index, num_connected)`, those at the positions it returns in the run's site order (partial
  participation; e.g. `simulation.select_clients`, so that the same sites train as in the simulation). With
  `evaluate_every` = k > 0, every k-th round (and the last) also sends "evaluate" messages to every site.
  `on_round(round_index, new_weights, {node_id: metrics})` sees each round's result
  (metrics of evaluation rounds under "eval/<name>"). The final weights are left in the context's state under
  "weights" (an ArrayRecord). A site's error or silence stops the run with an error naming its node id.
  """
  if num_rounds < 1 or min_clients < 1:
    raise ValueError(f"server_app needs num_rounds >= 1 and min_clients >= 1, got {num_rounds} and {min_clients}.")
  settings = dict(settings or {})
  for key, value in settings.items():
    if not isinstance(value, (bool, int, float, str)):
      raise ValueError(f"Round setting {key!r} must be a scalar or string (sent as data), got {type(value).__name__}.")
  app = ServerApp()

  @app.main()
  def main(grid: Grid, context: Context) -> None:
    weights, server_values = initial_weights(), {}
    for round_index in range(num_rounds):
      everyone = _ordered(_wait_for_nodes(grid, min_clients, connect_timeout_s), context)
      nodes = everyone if select is None else _selected(everyone, select(round_index, len(everyone)), round_index)
      config = {"round": round_index, "num_rounds": num_rounds, "fingerprint": fingerprint,
                **{SETTING + k: v for k, v in settings.items()}}

      def messages(kind: str, content: Dict[str, Any], to: Sequence[int]) -> List[Message]:
        return [Message(RecordDict({**content, "config": ConfigRecord(dict(config))}), dst_node_id=node,
                        message_type=kind, group_id=str(round_index)) for node in to]
      replies = _replies(grid, messages("train", {"weights": to_record(weights),
                                                  "server_values": to_record(server_values)}, nodes),
                         round_timeout_s, f"Round {round_index}")
      results, metrics = [], {}
      for node in nodes:
        content = replies[node].content
        update, client_values = from_record(content["update"]), from_record(content["client_values"])
        # The server trusts no site either: a reply must be model-shaped before it reaches `aggregate`.
        check_model_shaped(update, weights, f"Round {round_index}: the update of node {node}", complete=True)
        check_model_shaped(client_values, weights, f"Round {round_index}: the client values of node {node}",
                           complete=False)
        node_metrics = dict(content["metrics"])
        results.append((update, client_values, int(node_metrics["num_examples"])))
        metrics[node] = node_metrics
      weights, server_values = aggregate(round_index, weights, server_values, results)
      last = round_index == num_rounds - 1
      if evaluate_every and ((round_index + 1) % evaluate_every == 0 or last):
        evals = _replies(grid, messages("evaluate", {"weights": to_record(weights)}, everyone), round_timeout_s,
                         f"Evaluation after round {round_index}")
        for node, reply in evals.items():
          metrics.setdefault(node, {}).update({f"eval/{k}": v for k, v in reply.content["metrics"].items()})
      if on_round is not None:
        on_round(round_index, weights, metrics)
    context.state["weights"] = to_record(weights)
    goodbyes = [Message(RecordDict(), dst_node_id=node, message_type=STOP) for node in grid.get_node_ids()]
    grid.send_and_receive(goodbyes, timeout=30.0)  # sites that miss it keep polling until they are stopped

  return app
