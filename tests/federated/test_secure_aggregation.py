"""Simulated secure aggregation (medjax/federated/secure_aggregation.py)."""

import numpy as np
import pytest

from medjax.federated import secure_aggregation as sa_lib

NUM_CLIENTS = 5


def _updates(n=NUM_CLIENTS, seed=0):
  rng = np.random.default_rng(seed)
  return [{"conv": {"kernel": rng.normal(0, 0.5, (3, 2, 4)).astype(np.float32), "bias": rng.normal(0, 0.5, 4)},
           "head": rng.normal(0, 2.0, (7,))} for _ in range(n)]


@pytest.mark.parametrize("dropped", [[], [2], [0, 4]])
def test_secure_sum_equals_the_plain_fixed_point_sum_with_and_without_dropouts(dropped):
  updates = _updates()
  sa = sa_lib.SecureAggregation(NUM_CLIENTS, threshold=3, seed=(11, 0))
  masked = {u: sa.client(u).mask(updates[u]) for u in range(NUM_CLIENTS)}  # everyone masks, some never send
  arrived = {u: m for u, m in masked.items() if u not in dropped}
  survivors = [updates[u] for u in range(NUM_CLIENTS) if u not in dropped]
  fixed = sa.server.aggregate_fixed_point(arrived, dropped=dropped)
  plain = sa.plain_fixed_point_sum(survivors)
  assert sorted(fixed) == ["conv/bias", "conv/kernel", "head"]
  for name in plain:
    assert fixed[name].dtype == np.uint32
    np.testing.assert_array_equal(fixed[name], plain[name])  # bitwise: the masks cancel exactly
  total = sa_lib.unflatten_update(sa.server.aggregate(arrived, dropped=dropped))
  step = 2.0 ** -sa.scale_bits
  for got, want in ((total["conv"]["kernel"], sum(u["conv"]["kernel"] for u in survivors)),
                    (total["conv"]["bias"], sum(u["conv"]["bias"] for u in survivors)),
                    (total["head"], sum(u["head"] for u in survivors))):
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= len(survivors) * step / 2 + 1e-6


def test_dropped_defaults_to_the_clients_that_sent_nothing():
  updates = _updates()
  sa = sa_lib.SecureAggregation(NUM_CLIENTS, threshold=2, seed=3)
  arrived = {u: sa.client(u).mask(updates[u]) for u in (0, 3)}
  np.testing.assert_array_equal(sa.server.aggregate_fixed_point(arrived)["head"],
                                sa.plain_fixed_point_sum([updates[0], updates[3]])["head"])


def test_a_single_masked_update_reveals_nothing_obvious():
  updates = _updates(seed=1)
  sa = sa_lib.SecureAggregation(NUM_CLIENTS, threshold=3, seed=5)
  masked = sa.client(1).mask(updates[1])
  seen = sa_lib.decode(masked["head"], sa.scale_bits)
  plain = updates[1]["head"]
  assert np.abs(seen - plain).min() > 1.0  # nowhere near the update
  flat_masked = np.concatenate([sa_lib.decode(masked[k], sa.scale_bits).ravel() for k in sorted(masked)])
  flat_plain = np.concatenate([np.ravel(v) for _, v in sorted(sa_lib.flatten_update(updates[1]).items())])
  assert abs(np.corrcoef(flat_masked, flat_plain)[0, 1]) < 0.5
  # Masked values spread over the whole ring, unlike the update's few quantisation steps around zero.
  assert np.abs(flat_masked).mean() > 1000 * np.abs(flat_plain).mean()
  # Two rounds (seeds) mask the same update differently.
  other = sa_lib.SecureAggregation(NUM_CLIENTS, threshold=3, seed=6).client(1).mask(updates[1])
  assert not np.array_equal(other["head"], masked["head"])


def test_below_threshold_and_inconsistent_client_lists_are_errors():
  updates = _updates()
  sa = sa_lib.SecureAggregation(NUM_CLIENTS, threshold=4, seed=0)
  masked = {u: sa.client(u).mask(updates[u]) for u in range(NUM_CLIENTS)}
  with pytest.raises(ValueError, match=r"only 3 of 5 clients survived \(\[0, 1, 2\]\), fewer than threshold=4"):
    sa.server.aggregate({u: masked[u] for u in (0, 1, 2)}, dropped=[3, 4])
  with pytest.raises(ValueError, match=r"dropped=\[3\] but the clients without a masked update are \[3, 4\]"):
    sa.server.aggregate({u: masked[u] for u in (0, 1, 2)}, dropped=[3])
  with pytest.raises(ValueError, match=r"clients \[1\] are named both surviving and dropped"):
    sa.client(0).unmask_shares([0, 1], [1])
  bad = {**masked, 1: dict(masked[1], head=masked[1]["head"][:3])}
  with pytest.raises(ValueError, match=r"client 1's update has names/shapes different from client 0's"):
    sa.server.aggregate(bad)
  with pytest.raises(ValueError, match=r"threshold must be an int in \[1, num_clients=5\], got 6"):
    sa_lib.SecureAggregation(NUM_CLIENTS, threshold=6, seed=0)
  with pytest.raises(ValueError, match=r"clip must be in \(0, 6553.6\] so that the sum of 5 clients fits int32"):
    sa_lib.SecureAggregation(NUM_CLIENTS, threshold=2, seed=0, clip=1e6)
  with pytest.raises(ValueError, match="NaN or inf"):
    sa.client(0).mask({"w": np.array([np.nan])})


def test_fixed_point_encoding_round_trips_and_wraps():
  x = np.array([-3.25, 0.0, 1e-6, 2.5, 100.0])
  q = sa_lib.encode(x, scale_bits=16)
  assert q.dtype == np.uint32
  np.testing.assert_allclose(sa_lib.decode(q, 16), x, atol=2.0**-17)
  np.testing.assert_array_equal(sa_lib.decode(sa_lib.encode(x, 16, clip=2.0), 16), [-2.0, 0.0, 0.0, 2.0, 2.0])
  with pytest.raises(ValueError, match="does not fit int32 at scale_bits=16"):
    sa_lib.encode(np.array([40000.0]), 16)
  # Adding a ring element and taking it away is exact, whatever wraps around in between.
  mask = sa_lib.prg(12345, 2, 5)
  np.testing.assert_array_equal((q + mask) - mask, q)


def test_shamir_threshold_shares_reconstruct_and_fewer_do_not():
  rng = np.random.default_rng(0)
  secret = 2**300 + 17
  shares = sa_lib.shamir_share(secret, threshold=3, num_shares=5, rng=rng)
  assert sa_lib.shamir_reconstruct(shares[:3]) == secret
  assert sa_lib.shamir_reconstruct([shares[4], shares[1], shares[2]]) == secret
  assert sa_lib.shamir_reconstruct(shares[:2]) != secret


def test_flatten_and_unflatten_are_inverses():
  tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros((1, 3))}}, "e": np.arange(3)}
  flat = sa_lib.flatten_update(tree)
  assert sorted(flat) == ["a/b", "a/c/d", "e"]
  back = sa_lib.unflatten_update(flat)
  np.testing.assert_array_equal(back["a"]["c"]["d"], tree["a"]["c"]["d"])
  with pytest.raises(ValueError, match="contains the separator"):
    sa_lib.flatten_update({"a/b": np.ones(1)})
