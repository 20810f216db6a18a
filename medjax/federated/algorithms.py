"""The math of one federated round: a client's local update and the server's aggregation, as pure functions.

A round (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"):
the server sends the global variables x; each selected client k trains K_k local steps from x on its own
data (`steps.train_step`, the same step as centralised training) and returns its update Delta_k = y_k - x;
the server averages the updates, treats -mean(Delta) as a pseudo-gradient and applies its optimizer.

- fedavg: server SGD with rate `server_lr` (1 = the plain average).
- fedprox (Li et al. 2020, MLSys): clients minimise loss + mu/2 ||w - x||^2, i.e. add mu (w - x) to each
  local gradient (`client_terms`).
- fedadam / fedyogi (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR): the server optimizer is
  Adam / Yogi with epsilon tau (optax's, with bias correction).
- scaffold (Karimireddy et al. 2020, ICML; written from the paper, option II): clients correct each local
  gradient by c - c_k and return Delta c_k = -c + (x - y_k) / (K_k eta_l); the server moves c by
  (|S| / N) mean(Delta c_k) and keeps every client's c_k.

Client-level DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
ICLR): each client clips its update to L2 norm S (`clip_update`, on the client); the server sums the clipped
updates with equal weights, adds N(0, sigma^2 S^2) and divides by the expected number of clients.

The functions are traced once and `vmap`ped over the selected clients (or run client by client); nothing
here reads a config.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from medjax import steps
from medjax.train_state import TrainState
from medjax.typing import Array, PyTree

ALGORITHMS = ("fedavg", "fedprox", "fedadam", "fedyogi", "scaffold")


@flax.struct.dataclass
class FederatedState:
  """Everything a federated simulation carries from round to round (saved at every checkpointed round).

  `params` and `model_state` are the global model's, under the names `checkpoint.load` reads, so a notebook
  restores a federated run's global model like any other run's.

  Attributes:
    step: int32, rounds completed.
    params, model_state: the global model's variables.
    server_opt_state: the server optimizer's state.
    control: SCAFFOLD's server control variate c (params-shaped; zeros otherwise unused).
    client_controls: SCAFFOLD's c_k of every site, stacked (num_sites, ...); None for other algorithms.
    rng: base key; round r uses fold_in(rng, r).
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  server_opt_state: PyTree
  control: Optional[PyTree]
  client_controls: Optional[PyTree]
  rng: jax.Array


def server_optimizer(algorithm: str, *, server_lr: float, beta1: float = 0.9, beta2: float = 0.99,
                     tau: float = 1e-3) -> optax.GradientTransformation:
  """The server's optimizer over pseudo-gradients -mean(Delta)."""
  if algorithm == "fedadam":
    return optax.adam(server_lr, b1=beta1, b2=beta2, eps=tau)
  if algorithm == "fedyogi":
    return optax.yogi(server_lr, b1=beta1, b2=beta2, eps=tau)
  if algorithm in ALGORITHMS:
    return optax.sgd(server_lr)
  raise ValueError(f"config.federated.algorithm: unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}.")


def client_terms(anchor: Optional[PyTree], mu: float, correction: Optional[PyTree]) -> optax.GradientTransformation:
  """Adds FedProx's mu (w - anchor) and SCAFFOLD's correction (c - c_k) to every local gradient."""

  def update(grads, state, params=None):
    if anchor is not None and mu:
      grads = jax.tree.map(lambda g, w, a: g + mu * (w - a), grads, params, anchor)
    if correction is not None:
      grads = jax.tree.map(jnp.add, grads, correction)
    return grads, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def sample_indices(rng: Array, count: Array, batch_size: int, capacity: int) -> Array:
  """`batch_size` distinct indices drawn uniformly from [0, count) (count traced, <= capacity); (batch_size,)
  int32. Steps draw independently (with replacement across steps), so "an epoch" is ceil(count / B) steps."""
  # Example i's key depends on (rng, i) only, not on the padding: a site holding only its own examples (a real
  # federation) draws exactly the batches its padded copy draws in the simulation.
  positions = jnp.arange(capacity)
  keys = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(positions)
  keys = jnp.where(positions < count, keys, -1.0)
  return jax.lax.top_k(keys, batch_size)[1]


def clip_update(update: PyTree, clip_norm: float) -> Tuple[PyTree, Array]:
  """`update` scaled to L2 norm at most `clip_norm` (client-level DP); returns (clipped, the norm before)."""
  norm = optax.tree.norm(update)
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda u: (u * factor).astype(u.dtype), update), norm


class ClientResult(NamedTuple):
  """What a client sends back (and nothing else leaves a site)."""

  delta: PyTree          # y_k - x for the params (clipped under client-level DP)
  model_state: PyTree    # the client's mutable collections after training (e.g. batch statistics)
  control_delta: Optional[PyTree]  # SCAFFOLD's Delta c_k; None otherwise
  loss: Array            # mean training loss over the local steps (scalar)


def _local_tx(global_params: PyTree, control: Optional[PyTree], client_control: Optional[PyTree],
              tx: optax.GradientTransformation, algorithm: str, proximal_mu: float) -> optax.GradientTransformation:
  """The client's optimizer: the algorithm's gradient terms, then `tx`."""
  correction = None
  if algorithm == "scaffold":
    correction = jax.tree.map(jnp.subtract, control, client_control)
  anchor = global_params if algorithm == "fedprox" else None
  return optax.chain(client_terms(anchor, proximal_mu, correction), tx)


def client_start(variables: PyTree, control: Optional[PyTree], client_control: Optional[PyTree], rng: Array, *,
                 tx: optax.GradientTransformation, algorithm: str, proximal_mu: float = 0.0):
  """(the client's TrainState at the global `variables` with a fresh optimizer state, its batch key)."""
  variables = dict(variables)
  local_tx = _local_tx(variables["params"], control, client_control, tx, algorithm, proximal_mu)
  batch_rng, state_rng = jax.random.split(rng)
  return TrainState.create(variables=variables, tx=local_tx, rng=state_rng, use_ema=False), batch_rng


def client_step(state: TrainState, global_params: PyTree, control: Optional[PyTree], client_control: Optional[PyTree],
                images: Array, labels: Array, count: Array, num_steps: Array, batch_rng: Array, k: Array, *,
                apply_fn: Callable, objective: Callable, tx: optax.GradientTransformation, algorithm: str,
                batch_size: int, proximal_mu: float = 0.0, augment_fn: Optional[Callable] = None,
                batch_constraint: Optional[Callable] = None) -> Tuple[TrainState, Array]:
  """Local step k (0-based) of a client: one `steps.train_step` on a batch drawn from its examples; a step
  k >= num_steps leaves the state as it is (clients with fewer local steps idle). Returns (state, loss or 0)."""
  local_tx = _local_tx(global_params, control, client_control, tx, algorithm, proximal_mu)
  index = sample_indices(jax.random.fold_in(batch_rng, k), count, batch_size, images.shape[0])
  batch = {"image": images[index], "label": labels[index]}
  if batch_constraint is not None:
    batch = batch_constraint(batch)
  new_state, metrics = steps.train_step(state, batch, apply_fn=apply_fn, objective=objective, tx=local_tx,
                                        augment_fn=augment_fn)
  active = k < num_steps
  state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_state, state)
  return state, jnp.where(active, metrics["loss"], 0.0)


def client_finish(state: TrainState, global_params: PyTree, control: Optional[PyTree], num_steps: Array,
                  loss_sum: Array, *, algorithm: str, client_lr: float = 1.0,
                  clip_norm: Optional[float] = None) -> ClientResult:
  """The client's result after its local steps: the update (clipped under client-level DP), SCAFFOLD's
  control update, the mean loss."""
  steps_taken = jnp.maximum(num_steps, 1).astype(jnp.float32)
  delta = jax.tree.map(jnp.subtract, state.params, global_params)
  control_delta = None
  if algorithm == "scaffold":
    # Option II of the paper: c_k+ = c_k - c + (x - y_k) / (K eta_l); Delta c_k = c_k+ - c_k.
    control_delta = jax.tree.map(lambda c, d: -c - d / (steps_taken * client_lr), control, delta)
  if clip_norm is not None:
    delta, _ = clip_update(delta, clip_norm)
  return ClientResult(delta=delta, model_state=state.model_state, control_delta=control_delta,
                      loss=loss_sum / steps_taken)


def client_update(variables: PyTree, control: Optional[PyTree], client_control: Optional[PyTree], images: Array,
                  labels: Array, count: Array, num_steps: Array, rng: Array, *, apply_fn: Callable,
                  objective: Callable, tx: optax.GradientTransformation, algorithm: str, max_steps: int,
                  batch_size: int, proximal_mu: float = 0.0, client_lr: float = 1.0,
                  augment_fn: Optional[Callable] = None, clip_norm: Optional[float] = None,
                  batch_constraint: Optional[Callable] = None) -> ClientResult:
  """One client's local training from the global `variables`, in one traced function (`client_start`, a
  `lax.scan` of `client_step`, `client_finish`), so that it can be `vmap`ped over clients.

  Args:
    variables: the global model's {"params": ..., **model_state}.
    control, client_control: SCAFFOLD's c and c_k (None for other algorithms).
    images: (capacity, *spatial, C) the client's training images, padded past `count`.
    labels: (capacity, ...) their labels.
    count: int32 scalar, the client's number of examples.
    num_steps: int32 scalar <= max_steps, this client's local steps (local epochs give each client its own).
    rng: the client's key for this round (batches, dropout, augmentation).
    apply_fn, objective, tx, augment_fn: as for `steps.train_step`; tx is the client optimizer (fresh state
      every round).
    algorithm: one of ALGORITHMS; max_steps: static bound of the local loop; batch_size: local batch.
    proximal_mu: FedProx's mu; client_lr: eta_l for SCAFFOLD's control update (the client's SGD rate).
    clip_norm: clip the update to this L2 norm (client-level DP); None: no clipping.
    batch_constraint: applied to each local batch (sharding constraint in sequential mode).
  Returns:
    ClientResult.
  """
  global_params = dict(variables)["params"]
  state, batch_rng = client_start(variables, control, client_control, rng, tx=tx, algorithm=algorithm,
                                  proximal_mu=proximal_mu)

  def body(state, k):
    return client_step(state, global_params, control, client_control, images, labels, count, num_steps, batch_rng,
                       k, apply_fn=apply_fn, objective=objective, tx=tx, algorithm=algorithm, batch_size=batch_size,
                       proximal_mu=proximal_mu, augment_fn=augment_fn, batch_constraint=batch_constraint)

  state, losses = jax.lax.scan(body, state, jnp.arange(max_steps))
  return client_finish(state, global_params, control, num_steps, jnp.sum(losses), algorithm=algorithm,
                       client_lr=client_lr, clip_norm=clip_norm)


class ServerInputs(NamedTuple):
  """The round's aggregate as the server receives it (from a plain or a secure sum)."""

  delta_sum: PyTree        # sum_k w_k Delta_k
  weight_sum: Array        # sum_k w_k (examples, or clients under client-level DP)
  model_state_sum: PyTree  # sum_k w_k model_state_k (batch statistics); {} when the model has none
  control_delta_sum: Optional[PyTree]  # sum_k Delta c_k (SCAFFOLD)


def weighted_sums(results: ClientResult, weights: Array) -> ServerInputs:
  """The plain sums of stacked client results (leading axis: clients), weighted by `weights` (clients,)."""
  wsum = lambda tree: jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)
  control = None if results.control_delta is None else jax.tree.map(lambda x: jnp.sum(x, 0), results.control_delta)
  return ServerInputs(delta_sum=wsum(results.delta), weight_sum=jnp.sum(weights),
                      model_state_sum=wsum(results.model_state), control_delta_sum=control)


def server_update(state: FederatedState, inputs: ServerInputs, num_selected: int, num_sites: int, *,
                  tx: optax.GradientTransformation, noise_stddev: float = 0.0,
                  expected_weight: Optional[float] = None) -> FederatedState:
  """Applies one round's aggregate to the global state.

  Args:
    state: the state before the round (its step is the round index r, 0-based).
    inputs: the round's sums (ServerInputs).
    num_selected: |S|, clients that took part; num_sites: N.
    tx: the server optimizer (`server_optimizer`).
    noise_stddev: client-level DP: standard deviation of the Gaussian noise added to the sum of clipped
      updates (sigma S); the noise key is fold_in(fold_in(rng, r), 1).
    expected_weight: divide the sum by this instead of the weight sum (client-level DP divides by the expected
      number of clients, so one client's presence changes the mean by at most S / m).
  """
  round_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
  delta_sum = inputs.delta_sum
  if noise_stddev:
    leaves, treedef = jax.tree.flatten(delta_sum)
    keys = jax.random.split(round_rng, len(leaves))
    leaves = [x + noise_stddev * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    delta_sum = jax.tree.unflatten(treedef, leaves)
  denominator = inputs.weight_sum if expected_weight is None else jnp.float32(expected_weight)
  mean_delta = jax.tree.map(lambda d: d / denominator, delta_sum)
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = tx.update(pseudo_grad, state.server_opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  model_state = jax.tree.map(lambda s: (s / inputs.weight_sum).astype(s.dtype), inputs.model_state_sum)
  control = state.control
  if inputs.control_delta_sum is not None:
    control = jax.tree.map(lambda c, d: c + d / num_sites, control, inputs.control_delta_sum)
  return state.replace(step=state.step + 1, params=params, model_state=model_state, server_opt_state=opt_state,
                       control=control)


def scatter_controls(client_controls: PyTree, selected: Array, control_delta: PyTree) -> PyTree:
  """SCAFFOLD: c_k += Delta c_k for the selected sites (indices (|S|,)), in the stacked (N, ...) controls."""
  return jax.tree.map(lambda all_c, d: all_c.at[selected].add(d), client_controls, control_delta)


def init_state(variables: PyTree, tx: optax.GradientTransformation, rng: Array, algorithm: str,
               num_sites: int) -> FederatedState:
  """Round 0's state from freshly initialised (or pretrained) model `variables`."""
  variables = dict(variables)
  params = variables.pop("params")
  control = client_controls = None
  if algorithm == "scaffold":
    control = jax.tree.map(jnp.zeros_like, params)
    client_controls = jax.tree.map(lambda p: jnp.zeros((num_sites,) + p.shape, p.dtype), params)
  return FederatedState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                        server_opt_state=tx.init(params), control=control, client_controls=client_controls,
                        rng=rng)


__all__ = [
  "ALGORITHMS",
  "ClientResult",
  "FederatedState",
  "ServerInputs",
  "client_terms",
  "client_update",
  "clip_update",
  "init_state",
  "sample_indices",
  "scatter_controls",
  "server_optimizer",
  "server_update",
  "weighted_sums",
]
