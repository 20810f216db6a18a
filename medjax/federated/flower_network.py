"""The network half of the Flower adapter (`medjax.federated.flower` holds the apps): TLS material and node keys
read from paths with errors naming the flag, the coordinator's embedded SuperLink (`FleetServer`: Flower's Fleet API
only, the allowed node keys registered ahead, the ServerApp run in-process) and the site's embedded SuperNode
(`run_site`: signed Fleet API requests over HTTPS, each message handed to the site's own ClientApp, no app bundle
fetched from the server). It reaches into Flower 1.42's internals (link state, routers, HTTP client); a Flower
upgrade may move them. See `medjax.federated.flower` for the deployment and the commands.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from medjax.federated.flower import OBJECT_WAIT_S, REPLY_GRACE_S, SITE_ORDER, STOP, Refusal, Weights, from_record


# ------------------------------------------------------------------------------------------------ TLS and keys


def read_file(path: str, flag: str) -> bytes:
  """The bytes of `path`, or FileNotFoundError naming the flag (or argument) that gave it."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag} {os.path.abspath(path)} does not exist (or is not a file).")
  with open(path, "rb") as f:
    return f.read()


def load_private_key(path: str, flag: str = "--private_key"):
  """The EC private key in `path` (OpenSSH or PEM, unencrypted): a site's identity for node authentication."""
  from cryptography.hazmat.primitives import serialization  # (only deployments need it)
  from cryptography.hazmat.primitives.asymmetric import ec
  data = read_file(path, flag)
  try:
    key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH PRIVATE KEY" in data
           else serialization.load_pem_private_key(data, password=None))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{flag} {path} is not an unencrypted OpenSSH or PEM private key: {e}") from e
  if not isinstance(key, ec.EllipticCurvePrivateKey):
    raise ValueError(f"{flag} {path} holds a {type(key).__name__}; node authentication needs an EC key "
                     "(ssh-keygen -t ecdsa -b 384).")
  return key


def load_public_key(path: str, flag: str = "--allowed_keys") -> bytes:
  """The EC public key in `path` (OpenSSH `.pub` or PEM) as the PEM bytes Flower's SuperLink compares."""
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  data = read_file(path, flag)
  try:
    key = (serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----")
           else serialization.load_ssh_public_key(data.strip()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{flag} {path} is not an OpenSSH or PEM public key: {e}") from e
  if not isinstance(key, ec.EllipticCurvePublicKey):
    raise ValueError(f"{flag} {path} holds a {type(key).__name__}; node authentication needs an EC key.")
  return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_address(address: str, flag: str) -> Tuple[str, int]:
  """(host, port) of `address` "HOST:PORT" (IPv6 hosts in brackets), or a ValueError naming `flag`."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"{flag} {address!r} must be HOST:PORT.")
  return host.strip("[]"), int(port)


# ------------------------------------------------------------------------------------------------ coordinator


class FleetServer:
  """An embedded Flower SuperLink: the Fleet API over HTTPS at `address`, SuperNode authentication against
  `allowed_keys` (public key files, in site order), and `run(server_app)` to run a ServerApp on it in-process.

  Only Flower's Fleet routes are served (what SuperNodes call); the Control and Runtime APIs of a stock
  SuperLink, which start and drive runs, are not exposed. Use as a context manager:

    with FleetServer("0.0.0.0:9092", ca_cert=..., server_cert=..., server_key=..., allowed_keys=[...]) as link:
      final_weights = link.run(server_app(...))
  """

  def __init__(self, address: str, *, ca_cert: str, server_cert: str, server_key: str, allowed_keys: Sequence[str]):
    self.host, self.port = parse_address(address, "--address")
    for path, flag in ((ca_cert, "--ca_cert"), (server_cert, "--server_cert"), (server_key, "--server_key")):
      read_file(path, flag)
    if not allowed_keys:
      raise ValueError("--allowed_keys is empty: give the public key file of every site allowed to connect.")
    self.public_keys = [load_public_key(path) for path in allowed_keys]
    if len(set(self.public_keys)) != len(self.public_keys):
      raise ValueError(f"--allowed_keys lists the same public key twice: {', '.join(allowed_keys)}.")
    self.ca_cert, self.server_cert, self.server_key = ca_cert, server_cert, server_key
    self._server = self._thread = self._state = None
    self.node_ids: List[int] = []

  def __enter__(self) -> FleetServer:
    import uvicorn  # (Flower's own HTTP server)
    from fastapi import FastAPI
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.error import http_error_translator
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
    from flwr.superlink.routers.fleet.router import router as fleet_router
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    self.state_factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    self._state = self.state_factory.state()
    # Registered ahead: with authentication on, the Fleet API refuses nodes that register themselves.
    self.node_ids = [self._state.create_node("medjax", "medjax", key, 30.0) for key in self.public_keys]
    # The same middleware order as Flower's SuperLink app: errors translated outermost, node auth innermost.
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None,
                  middleware=[Middleware(BaseHTTPMiddleware, dispatch=http_error_translator),
                              Middleware(ProtobufTranslationMiddleware), Middleware(NodeAuthMiddleware)])
    app.state.linkstate_factory = self.state_factory
    app.state.enable_supernode_auth = True
    app.include_router(fleet_router)
    config = uvicorn.Config(app, host=self.host, port=self.port, ssl_certfile=self.server_cert,
                            ssl_keyfile=self.server_key, ssl_ca_certs=self.ca_cert, log_level="warning",
                            access_log=False, lifespan="off")
    self._server = uvicorn.Server(config)
    self._thread = threading.Thread(target=self._server.run, name="fleet-api", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 30.0
    while not self._server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise OSError(f"--address {self.host}:{self.port}: the Fleet API did not start (port in use?).")
      time.sleep(0.05)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._server is not None:
      self._server.should_exit = True
      self._thread.join(timeout=10.0)
      self._server = None

  def run(self, app: ServerApp, run_config: Optional[Mapping[str, Any]] = None) -> Weights:
    """Runs `app` to the end on this SuperLink and returns the weights it left in its context ("weights")."""
    from flwr.common.constant import SUPERLINK_NODE_ID, SubStatus
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.task_identity import TaskIdentity

    state = self._state
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, TaskType.SERVER_APP)
    run = state.get_run_info(run_ids=[run_id])[0]
    task_id = run.primary_task_id
    # The run must be RUNNING for the Fleet API to accept replies: this process is its ServerApp task.
    if state.claim_task(task_id) is None or not state.activate_task(task_id):
      raise RuntimeError(f"Could not start run {run_id} on the SuperLink.")
    # Flower stamps the sender of every new Message from this process-wide identity (the ServerApp task).
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, task_id, SUPERLINK_NODE_ID
    stop = threading.Event()

    def heartbeat() -> None:
      while not stop.wait(5.0):
        state.acknowledge_task_heartbeat(task_id)
    beat = threading.Thread(target=heartbeat, name="run-heartbeat", daemon=True)
    beat.start()
    grid = _link_grid(self.state_factory)
    grid.set_run(state.get_run_info(run_ids=[run_id])[0])
    config = {SITE_ORDER: ",".join(map(str, self.node_ids)), **(run_config or {})}
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    status, details = SubStatus.FAILED, ""
    try:
      app(grid, context)
      status = SubStatus.COMPLETED
    except BaseException as e:
      details = str(e)
      raise
    finally:
      stop.set()
      beat.join()
      state.finish_task(task_id, status, details)
    return from_record(context.state["weights"])


def _link_grid_class():
  from flwr.superlink.grid import InMemoryGrid

  class LinkGrid(InMemoryGrid):
    """A Grid on the SuperLink's own LinkState and ObjectStore, for a ServerApp in the SuperLink's process.
    Flower's InMemoryGrid serves the simulation engine, which reads message contents from the LinkState;
    SuperNodes pull them from the ObjectStore, so pushes and pulls go through it here."""

    def push_messages(self, messages):
      from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
      run_id, ids = self.run.run_id, []
      for message in messages:
        session = self.state.start_session(run_id)  # a session closes once its objects are all stored
        message.metadata.__dict__["_message_id"] = message.object_id  # Flower's convention: content hash
        self._check_message(message)
        stored, missing = self.state.store_message_and_object_tree(message, get_object_tree(message), session)
        objects = get_all_nested_objects(message)
        for object_id in missing:
          self.state.store_object(run_id, session, object_id, objects[object_id].deflate())
        if stored:
          ids.append(message.metadata.message_id)
      return ids

    def pull_messages(self, message_ids):
      from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
      from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
      replies = self.state.get_message_res(message_ids=set(message_ids), run_id=self.run.run_id)
      self.state.delete_messages(message_ins_ids={m.metadata.reply_to_message_id for m in replies})
      store, out = self.state.object_store, []
      for reply in replies:
        tree = store.get_object_tree(reply.metadata.message_id)
        ids = [t.object_id for t in iterate_object_tree(tree)]
        deadline = time.monotonic() + OBJECT_WAIT_S
        # The reply is listed as soon as its header is pushed; its arrays follow in separate requests.
        while not all((contents := {i: store.get(i) for i in ids}).values()):
          if time.monotonic() > deadline:
            raise TimeoutError(f"The reply of node {reply.metadata.src_node_id} lacks its arrays after "
                               f"{OBJECT_WAIT_S:.0f} s.")
          time.sleep(0.05)
        full = inflate_object_from_contents(reply.metadata.message_id, contents)
        full.metadata.__dict__.update(reply.metadata.__dict__)
        store.delete(reply.metadata.message_id)  # and its arrays: the store would otherwise grow every round
        out.append(full)
      return out

  return LinkGrid


def _link_grid(state_factory):
  """A LinkGrid (class built on first use: Flower's server side is imported only by a coordinator)."""
  return _link_grid_class()(state_factory)


# ------------------------------------------------------------------------------------------------ site


def run_site(app: ClientApp, server: str, *, ca_cert: str, private_key: str, connect_timeout_s: float = 60.0,
             poll_s: float = 0.2, log: Callable[[str], None] = lambda _: None) -> int:
  """Serves `app` to the SuperLink at `server` (HOST:PORT) until the server says goodbye; returns the number
  of messages answered. An embedded SuperNode: HTTPS verified against `ca_cert`, requests signed with the EC key
  in `private_key` (its public key must be in the server's allowed keys), and no app bundle fetched: only
  `app`, the site's own code, handles the messages.

  Raises FileNotFoundError for a missing file (naming its flag), PermissionError when the server refuses this
  site's key, ConnectionError when it cannot be reached over TLS within `connect_timeout_s` seconds, and the
  ClientApp's own error (after reporting it to the server) when the site refuses a round.
  """
  import httpx
  from flwr.app.message import remove_content_from_message
  from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, ErrorCode
  from flwr.common.serde import message_from_proto, message_to_proto
  from flwr.proto.fleet_pb2 import (
    ActivateNodeRequest, DeactivateNodeRequest, PullMessagesRequest, PushMessagesRequest)
  from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
  from flwr.proto.node_pb2 import Node
  from flwr.supercore.heartbeat import HeartbeatSender
  from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
  from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf, make_push_object_fn_protobuf)
  from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
  from flwr.supercore.primitives.asymmetric import public_key_to_bytes
  from flwr.supernode.fleet_http_client import FleetHttpClient
  from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

  parse_address(server, "--server")
  root_certificates = read_file(ca_cert, "--ca_cert")
  key = load_private_key(private_key)
  client = FleetHttpClient.from_server_address(server, False, root_certificates,
                                               interceptors=[NodeAuthHttpInterceptor(key, key.public_key())])
  with client:
    deadline = time.monotonic() + connect_timeout_s
    while True:
      try:
        node = Node(node_id=client.ActivateNode(ActivateNodeRequest(
          public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)).node_id)
        break
      except httpx.HTTPStatusError as e:
        raise PermissionError(f"The server {server} refused this site (HTTP {e.response.status_code}): the public "
                              f"key of --private_key {private_key} is not in the server's allowed keys.") from e
      except httpx.TransportError as e:  # not listening yet, or a TLS failure (wrong CA, wrong host name)
        if time.monotonic() > deadline:
          raise ConnectionError(f"Cannot reach the server {server} over TLS (CA --ca_cert {ca_cert}) within "
                                f"{connect_timeout_s:.0f} s: {e}") from e
        time.sleep(0.5)
    log(f"connected to {server} as node {node.node_id}")

    def beat() -> bool:
      try:
        return client.SendNodeHeartbeat(SendNodeHeartbeatRequest(
          node=node, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)).success
      except httpx.HTTPError:
        return False
    heartbeat = HeartbeatSender(beat)
    heartbeat.start()
    contexts: Dict[int, Context] = {}
    answered = 0
    try:
      while True:
        try:
          pulled = client.PullMessages(PullMessagesRequest(node=node))
        except httpx.TransportError as e:
          raise ConnectionError(f"Lost the connection to the server {server} (the run failed or the server "
                                f"stopped): {e}") from e
        except httpx.HTTPStatusError as e:
          raise ConnectionError(f"The server {server} rejected this site's request (HTTP "
                                f"{e.response.status_code}); was it restarted?") from e
        if not pulled.messages_list:
          time.sleep(poll_s)
          continue
        header, tree = message_from_proto(pulled.messages_list[0]), pulled.message_object_trees[0]
        run_id = header.metadata.run_id
        message = pull_and_inflate_object_from_tree(
          tree, make_pull_object_fn_protobuf(client.PullObject, node, run_id),
          make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
          return_type=Message)
        message.metadata.__dict__.update(header.metadata.__dict__)
        context = contexts.setdefault(run_id, Context(run_id=run_id, node_id=node.node_id, node_config={},
                                                      state=RecordDict(), run_config={}))
        started, failure = time.monotonic(), None
        try:
          reply = app(message, context)
        except Exception as e:  # reported to the server, then raised here: the site stops
          failure = e
          # Only a Refusal's text (round and key names) leaves the site: another error's message may name a
          # patient's file or hold values, so the server learns its type alone.
          reason = f"refused: {e}" if isinstance(e, Refusal) else f"{type(e).__name__} (details in the site's log)"
          reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = reply.object_id
        pushed = client.PushMessages(PushMessagesRequest(
          node=node, messages_list=[message_to_proto(remove_content_from_message(reply))],
          message_object_trees=[get_object_tree(reply)], clientapp_runtime_list=[time.monotonic() - started]))
        objects = get_all_nested_objects(reply)
        push = make_push_object_fn_protobuf(client.PushObject, node, run_id, pushed.session_id)
        for object_id in pushed.objects_to_push:
          push(object_id, objects[object_id].deflate())
        answered += 1
        if failure is not None:
          # Stay online a moment: the SuperLink drops a reply whose node went offline before the server pulled it
          # (it then reports the node as unavailable instead of the site's reason).
          time.sleep(REPLY_GRACE_S)
          raise failure
        if message.metadata.message_type == STOP:
          log(f"the server ended the run after {answered} messages")
          return answered
    finally:
      heartbeat.stop()
      with contextlib.suppress(httpx.HTTPError):  # the server may be gone already
        client.DeactivateNode(DeactivateNodeRequest(node_id=node.node_id))
