"""Simulated secure aggregation: the server learns the sum of the clients' updates and nothing else.

This follows the protocol of Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS), simulated in one process with numpy and Python integers, so that a federated run can check
that secure aggregation changes nothing but the server's view, and that it survives clients dropping out.

Protocol (one instance per round; give every round its own seed, e.g. `seed=(run_seed, round)`, because
reusing masks across rounds would reveal the difference of a client's updates):

  0. Setup. Client u draws a key-agreement secret sk_u with public key pk_u = g^sk_u mod P, and a self-mask
     seed b_u. Public keys are broadcast.
  1. Share keys. Client u splits sk_u and b_u into n Shamir shares (threshold t, over the prime field Z_P)
     and gives share v of each to client v (in the paper encrypted, and relayed by the server).
  2. Masked input. Client u agrees a pairwise seed s_uv = pk_v^sk_u = g^(sk_u sk_v) mod P with every v
     (Diffie-Hellman: both ends compute the same value). Its update x_u is encoded in fixed point in the ring
     Z_{2^32} (`encode`) and sent as
        y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)   (mod 2^32).
     Summed over all clients the pairwise masks cancel exactly, since each pair adds and subtracts one mask.
  3. Unmasking. The server names the survivors (whose y_u arrived) and the dropped clients. Each survivor
     returns its shares of b_v for every survivor v and of sk_u for every dropped u, never both for one
     client (a client refuses), so the server never learns both secrets of anyone. With at least t survivors
     the server reconstructs them, removes each survivor's self mask and the pairwise masks between survivors
     and dropped clients, and decodes the sum. Fewer than t survivors: the round fails (ValueError).

Sharing sk_u, as the paper does, gives the server the dropped clients' pairwise seeds s_uv with every survivor.
Here P = 2^521 - 1 (a Mersenne prime) and g = 3, which make the algebra real but are no cryptographic choice:
this is a simulation of the protocol's arithmetic, not a secure implementation.

Fixed point: x -> round(x * 2^scale_bits) as a two's-complement int32. The sum of n clients must stay in
int32, so values are clipped to |x| <= clip with n * clip * 2^scale_bits < 2^31 (the default clip is the
largest such value). The decoded sum equals the sum of the encoded updates exactly, hence the float sum
within n / 2 quantisation steps 2^-scale_bits.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

PRIME = 2**521 - 1  # Shamir field and (toy) Diffie-Hellman group
GENERATOR = 3
RING = 2**32
_SECRET_BYTES = 66  # 528 bits, reduced mod P
_SELF_MASK, _PAIR_MASK = 1, 2  # PRG domain tags

Seed = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------------- updates


def flatten_update(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, np.ndarray]:
  """Nested dicts of arrays (e.g. Flax params) -> flat dict "a/b/kernel" -> np.ndarray."""
  flat: Dict[str, np.ndarray] = {}

  def walk(node: Any, prefix: str):
    if isinstance(node, Mapping):
      for key, value in node.items():
        if sep in str(key):
          raise ValueError(f"flatten_update: key {key!r} at {prefix or 'the root'} contains the separator {sep!r}.")
        walk(value, f"{prefix}{sep}{key}" if prefix else str(key))
    else:
      flat[prefix] = np.asarray(node)

  walk(tree, "")
  return flat


def unflatten_update(flat: Mapping[str, np.ndarray], sep: str = "/") -> Dict[str, Any]:
  """The inverse of `flatten_update`: flat "a/b/kernel" keys -> nested dicts."""
  tree: Dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def max_clip(num_clients: int, scale_bits: int) -> float:
  """Largest |x| whose fixed-point sum over `num_clients` clients cannot leave int32."""
  return (2**31 - 1) / (2.0**scale_bits * num_clients)


def encode(x: np.ndarray, scale_bits: int = 16, clip: Optional[float] = None) -> np.ndarray:
  """float array -> uint32 array of round(x * 2^scale_bits) mod 2^32 (two's complement).

  Args:
    x: float array (any shape).
    scale_bits: fractional bits; the quantisation step is 2^-scale_bits.
    clip: values are clipped to [-clip, clip] first; None = no clipping, and a value beyond int32 raises.
  Raises ValueError for non-finite values or values that do not fit.
  """
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError("encode: the update holds NaN or inf; secure aggregation needs finite values.")
  if clip is not None:
    x = np.clip(x, -clip, clip)
  q = np.rint(x * 2.0**scale_bits)
  if q.size and (q.min() < -(2**31) or q.max() >= 2**31):
    raise ValueError(f"encode: |x| up to {np.abs(x).max():.4g} does not fit int32 at scale_bits={scale_bits}; "
                     "pass clip or lower scale_bits.")
  return q.astype(np.int64).astype(np.uint32)


def decode(q: np.ndarray, scale_bits: int = 16) -> np.ndarray:
  """uint32 fixed-point values (two's complement) -> float64 values."""
  signed = np.asarray(q, np.uint32).astype(np.int64)
  signed = np.where(signed >= 2**31, signed - RING, signed)
  return signed / 2.0**scale_bits


# ------------------------------------------------------------------------------------------- cryptography


def _random_secret(rng: np.random.Generator) -> int:
  return int.from_bytes(rng.bytes(_SECRET_BYTES), "little") % (PRIME - 1) + 1


def shamir_share(secret: int, threshold: int, num_shares: int, rng: np.random.Generator) -> List[Tuple[int, int]]:
  """Shamir t-of-n shares (x, f(x)) of `secret` in Z_P, x = 1..num_shares, f of degree threshold - 1."""
  if not 0 <= secret < PRIME:
    raise ValueError("shamir_share: the secret must lie in [0, P).")
  coefficients = [secret] + [_random_secret(rng) for _ in range(threshold - 1)]
  shares = []
  for x in range(1, num_shares + 1):
    y = 0
    for c in reversed(coefficients):  # Horner
      y = (y * x + c) % PRIME
    shares.append((x, y))
  return shares


def shamir_reconstruct(shares: Sequence[Tuple[int, int]]) -> int:
  """The secret f(0) from at least t shares (x, f(x)), by Lagrange interpolation in Z_P."""
  xs = [x for x, _ in shares]
  if len(set(xs)) != len(xs):
    raise ValueError(f"shamir_reconstruct: repeated share indices {xs}.")
  secret = 0
  for i, (x_i, y_i) in enumerate(shares):
    num, den = 1, 1
    for j, x_j in enumerate(xs):
      if j != i:
        num = num * (-x_j) % PRIME
        den = den * (x_i - x_j) % PRIME
    secret = (secret + y_i * num * pow(den, -1, PRIME)) % PRIME
  return secret


def prg(seed: int, tag: int, size: int) -> np.ndarray:
  """uint32 (size,) pseudo-random ring elements expanded from a shared secret (PCG64 over SeedSequence)."""
  raw = np.random.Generator(np.random.PCG64(np.random.SeedSequence([tag, seed]))).bit_generator.random_raw(size)
  return (raw & np.uint64(0xFFFFFFFF)).astype(np.uint32)


# ------------------------------------------------------------------------------------------------ protocol


class Layout:
  """The flat vector layout of an update: names in sorted order, with shapes."""

  def __init__(self, flat: Mapping[str, np.ndarray]):
    self.names = sorted(flat)
    self.shapes = [tuple(np.shape(flat[n])) for n in self.names]
    self.size = int(sum(int(np.prod(s)) for s in self.shapes))

  def same_as(self, other: Layout) -> bool:
    return (self.names, self.shapes) == (other.names, other.shapes)

  def split(self, vector: np.ndarray) -> Dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in zip(self.names, self.shapes):
      n = int(np.prod(shape))
      out[name] = vector[start:start + n].reshape(shape)
      start += n
    return out

  def join(self, flat: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(flat[n]).reshape(-1) for n in self.names]) if self.names else np.zeros(0)


class Client:
  """One client's side of the protocol: its secrets, the shares it holds of the others', and its masking."""

  def __init__(self, index: int, protocol: SecureAggregation, secret_key: int, self_seed: int):
    self.index = index
    self.protocol = protocol
    self._secret_key = secret_key
    self._self_seed = self_seed
    self.public_key = pow(GENERATOR, secret_key, PRIME)
    self.shares_of_key: Dict[int, Tuple[int, int]] = {}  # v -> this client's share of sk_v
    self.shares_of_seed: Dict[int, Tuple[int, int]] = {}  # v -> this client's share of b_v

  def mask(self, update: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Step 2: the masked update, a dict name -> uint32 array (shapes of `update`, nested dicts flattened
    with "/"). It looks uniformly random on its own; only the sum over clients means anything."""
    p = self.protocol
    flat = flatten_update(update)
    layout = Layout(flat)
    y = encode(layout.join(flat), p.scale_bits, p.clip)
    y = y + prg(self._self_seed, _SELF_MASK, layout.size)  # uint32 arithmetic wraps mod 2^32
    for v, other in enumerate(p.clients):
      if v == self.index:
        continue
      pairwise = prg(pow(other.public_key, self._secret_key, PRIME), _PAIR_MASK, layout.size)
      y = y + pairwise if v > self.index else y - pairwise
    return layout.split(y)

  def unmask_shares(self, survivors: Iterable[int], dropped: Iterable[int]) -> Dict[str, Dict[int, Tuple[int, int]]]:
    """Step 3: shares of b_v for each survivor v and of sk_u for each dropped u. Refuses a client named in
    both lists, since the two secrets together would unmask that client's own update."""
    survivors, dropped = set(survivors), set(dropped)
    both = sorted(survivors & dropped)
    if both:
      raise ValueError(f"client {self.index}: clients {both} are named both surviving and dropped; refusing to "
                       "reveal both secrets of a client.")
    return {"seed": {v: self.shares_of_seed[v] for v in sorted(survivors)},
            "key": {u: self.shares_of_key[u] for u in sorted(dropped)}}


class Server:
  """The server's side: sums masked updates and removes the masks it can reconstruct."""

  def __init__(self, protocol: SecureAggregation):
    self.protocol = protocol

  def aggregate_fixed_point(self, masked: Mapping[int, Mapping[str, np.ndarray]],
                            dropped: Optional[Iterable[int]] = None) -> Dict[str, np.ndarray]:
    """The sum of the survivors' encoded updates, uint32 (mod 2^32), as dict name -> array.

    Args:
      masked: client index -> its masked update (the survivors: every client whose update arrived).
      dropped: the clients whose update did not arrive; None = every client not in `masked`. Given, it must
        be exactly those clients.
    Raises ValueError when fewer than `threshold` clients survive, or on inconsistent client lists/layouts.
    """
    p = self.protocol
    survivors = sorted(int(u) for u in masked)
    everyone = set(range(p.num_clients))
    unknown = sorted(set(survivors) - everyone)
    if unknown:
      raise ValueError(f"secure aggregation: masked updates from unknown clients {unknown} "
                       f"(clients are 0..{p.num_clients - 1}).")
    missing = sorted(everyone - set(survivors))
    if dropped is not None:
      dropped = sorted(int(u) for u in dropped)
      if dropped != missing:
        raise ValueError(f"secure aggregation: dropped={dropped} but the clients without a masked update are "
                         f"{missing}; every client must either send its masked update or be listed as dropped.")
    dropped = missing
    if len(survivors) < p.threshold:
      raise ValueError(f"secure aggregation: only {len(survivors)} of {p.num_clients} clients survived "
                       f"({survivors}), fewer than threshold={p.threshold}; the round cannot be unmasked.")
    layout = Layout(masked[survivors[0]])
    for u in survivors[1:]:
      if not Layout(masked[u]).same_as(layout):
        raise ValueError(f"secure aggregation: client {u}'s update has names/shapes different from client "
                         f"{survivors[0]}'s.")
    total = np.zeros(layout.size, np.uint32)
    for u in survivors:
      total = total + layout.join(masked[u]).astype(np.uint32)

    # Any t survivors' shares suffice; ask the first t.
    answers = [p.clients[v].unmask_shares(survivors, dropped) for v in survivors[:p.threshold]]
    for v in survivors:
      b_v = shamir_reconstruct([a["seed"][v] for a in answers])
      total = total - prg(b_v, _SELF_MASK, layout.size)
    for u in dropped:
      sk_u = shamir_reconstruct([a["key"][u] for a in answers])
      for v in survivors:
        pairwise = prg(pow(p.clients[v].public_key, sk_u, PRIME), _PAIR_MASK, layout.size)
        # Survivor v added +PRG(s_vu) if u > v and -PRG(s_vu) if u < v; take it back out.
        total = total - pairwise if u > v else total + pairwise
    return layout.split(total)

  def aggregate(self, masked: Mapping[int, Mapping[str, np.ndarray]],
                dropped: Optional[Iterable[int]] = None) -> Dict[str, np.ndarray]:
    """The sum of the survivors' updates as float64 arrays (dict name -> array; nested names joined by
    "/", see `unflatten_update`). Arguments and errors as in `aggregate_fixed_point`."""
    fixed = self.aggregate_fixed_point(masked, dropped)
    return {name: decode(q, self.protocol.scale_bits) for name, q in fixed.items()}


class SecureAggregation:
  """One round of simulated secure aggregation among `num_clients` clients (module docstring).

  Usage:
    sa = SecureAggregation(num_clients=5, threshold=3, seed=(run_seed, round_index))
    masked = {u: sa.client(u).mask(update[u]) for u in arrived}
    total = sa.server.aggregate(masked, dropped=[u for u in range(5) if u not in arrived])

  Args:
    num_clients: n >= 2.
    threshold: t in [1, n], the survivors needed to unmask (t - 1 colluding clients learn nothing of another
      client's secrets).
    seed: int or sequence of ints; seeds every client's secrets (a simulation of their private randomness).
    scale_bits: fixed-point fractional bits.
    clip: |value| bound applied before encoding; default `max_clip(n, scale_bits)`, the largest safe one.
  """

  def __init__(self, num_clients: int, threshold: int, seed: Seed, scale_bits: int = 16,
               clip: Optional[float] = None):
    if not isinstance(num_clients, int) or num_clients < 2:
      raise ValueError(f"SecureAggregation: num_clients must be an int >= 2, got {num_clients!r}.")
    if not isinstance(threshold, int) or not 1 <= threshold <= num_clients:
      raise ValueError(f"SecureAggregation: threshold must be an int in [1, num_clients={num_clients}], got "
                       f"{threshold!r}.")
    if not isinstance(scale_bits, int) or not 0 <= scale_bits <= 30:
      raise ValueError(f"SecureAggregation: scale_bits must be an int in [0, 30], got {scale_bits!r}.")
    limit = max_clip(num_clients, scale_bits)
    if clip is not None and not 0 < clip <= limit:
      raise ValueError(f"SecureAggregation: clip must be in (0, {limit:.6g}] so that the sum of "
                       f"{num_clients} clients fits int32 at scale_bits={scale_bits}, got {clip!r}.")
    self.num_clients, self.threshold, self.scale_bits = num_clients, threshold, scale_bits
    self.clip = float(limit if clip is None else clip)
    entropy = [int(s) for s in np.atleast_1d(seed)]
    rngs = [np.random.default_rng(np.random.SeedSequence(entropy + [u])) for u in range(num_clients)]
    # Step 0: each client's private randomness and public key.
    self.clients = [Client(u, self, _random_secret(rngs[u]), _random_secret(rngs[u])) for u in range(num_clients)]
    # Step 1: every client shares both secrets; share v goes to client v.
    for u, client in enumerate(self.clients):
      key_shares = shamir_share(client._secret_key, threshold, num_clients, rngs[u])
      seed_shares = shamir_share(client._self_seed, threshold, num_clients, rngs[u])
      for v, holder in enumerate(self.clients):
        holder.shares_of_key[u], holder.shares_of_seed[u] = key_shares[v], seed_shares[v]
    self.server = Server(self)

  def client(self, index: int) -> Client:
    if not 0 <= index < self.num_clients:
      raise ValueError(f"SecureAggregation: client index {index} out of range [0, {self.num_clients}).")
    return self.clients[index]

  def plain_fixed_point_sum(self, updates: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
    """The unmasked reference: sum of the encoded updates (uint32, mod 2^32), for checks."""
    layout = Layout(flatten_update(updates[0]))
    total = np.zeros(layout.size, np.uint32)
    for update in updates:
      total = total + encode(layout.join(flatten_update(update)), self.scale_bits, self.clip)
    return layout.split(total)
