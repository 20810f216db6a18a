"""Privacy accounting for DP-SGD and client-level DP-FedAvg, through Google's `dp-accounting` library.

Every noisy step is the Poisson-subsampled Gaussian mechanism: each example (or client) takes part with
probability `sample_rate` q, the clipped sum gets Gaussian noise of standard deviation `noise_multiplier` x C.
`T` such steps compose to `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)`; the
accountant turns that event into epsilon at a given delta:

- "rdp": Renyi DP (Mironov 2017; the subsampled-Gaussian bound of Mironov, Talwar & Zhang 2019), the
  accountant Opacus and TF Privacy default to. Epsilon depends on the orders searched: with Opacus's orders
  [2, 5, 10, 20, 100], q = 0.01, sigma = 1, 300 steps and delta = 1e-5 it is 2.39 (at order 5); with
  dp-accounting's default orders (1 to 512, finer), 1.45.
- "pld": privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), tighter (1.07 for the
  same setting).

The accounting assumes Poisson sampling. Training with shuffled fixed-size batches and reporting the Poisson
epsilon overstates the privacy (Chua et al. 2024, "How Private are DP-SGD Implementations?", ICML); medjax's DP
training samples Poisson batches (`config.privacy.sampling="poisson"`, the default) and says so in its logs
when told to shuffle instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Sequence

import dp_accounting
from absl import logging

ACCOUNTANTS = ("rdp", "pld")
MAX_NOISE_MULTIPLIER = {"rdp": 1000.0, "pld": 20.0}  # the calibration's search bracket


@contextlib.contextmanager
def _quiet():
  """dp-accounting warns for every Renyi order whose series does not converge at a high sample rate (and drops
  that order, which is correct); a calibration would print hundreds of such lines."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _silenced(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _quiet():
      return fn(*args, **kwargs)
  return wrapper


def _accountant(name: str, orders: Optional[Sequence[float]]):
  if name == "rdp":
    return dp_accounting.rdp.RdpAccountant(orders=list(orders)) if orders else dp_accounting.rdp.RdpAccountant()
  if name == "pld":
    if orders:
      raise ValueError("privacy accounting: `orders` applies to the 'rdp' accountant only, not 'pld'.")
    return dp_accounting.pld.PLDAccountant()
  raise ValueError(f"privacy accounting: unknown accountant {name!r}; choose one of {ACCOUNTANTS}.")


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
  """The DpEvent of `steps` Poisson-subsampled Gaussian steps (q = `sample_rate`, sigma = `noise_multiplier`)."""
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"privacy accounting: the sample rate must lie in (0, 1], got {sample_rate}.")
  if noise_multiplier < 0:
    raise ValueError(f"privacy accounting: the noise multiplier must be >= 0, got {noise_multiplier}.")
  step = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sample_rate < 1.0:
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, step)
  return dp_accounting.SelfComposedDpEvent(step, int(steps))


@_silenced
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *, accountant: str = "rdp",
            orders: Optional[Sequence[float]] = None) -> float:
  """Epsilon spent after `steps` noisy steps at `delta` (inf without noise; 0 before the first step).

  Args:
    noise_multiplier: noise standard deviation / clipping norm (sigma).
    sample_rate: probability q that an example (client) takes part in a step.
    steps: number of noisy steps (DP-SGD updates, or federated rounds).
    delta: the delta of (epsilon, delta)-DP, in (0, 1).
    accountant: "rdp" or "pld".
    orders: Renyi orders for "rdp" (None: dp-accounting's default grid).
  """
  if not 0.0 < delta < 1.0:
    raise ValueError(f"privacy accounting: delta must lie in (0, 1), got {delta}.")
  if steps <= 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  acc = _accountant(accountant, orders)
  acc.compose(dpsgd_event(noise_multiplier, sample_rate, steps))
  return float(acc.get_epsilon(delta))


@_silenced
def rdp_epsilon_and_order(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                          orders: Optional[Sequence[float]] = None):
  """(epsilon, the Renyi order that attains it) of the "rdp" accountant."""
  acc = _accountant("rdp", orders)
  acc.compose(dpsgd_event(noise_multiplier, sample_rate, steps))
  eps, order = acc.get_epsilon_and_optimal_order(delta)
  return float(eps), float(order)


@_silenced
def noise_multiplier_for(target_epsilon: float, sample_rate: float, steps: int, delta: float, *,
                         accountant: str = "rdp", orders: Optional[Sequence[float]] = None,
                         max_noise_multiplier: Optional[float] = None,
                         key: str = "config.privacy.target_epsilon") -> float:
  """The smallest noise multiplier whose epsilon after `steps` steps is at most `target_epsilon` (dp-accounting's
  bracketing search, to a relative tolerance of 1e-4, rounded up so the target holds).

  Raises ValueError naming `key` when the target cannot be met with sigma <= `max_noise_multiplier` (e.g. a
  tiny epsilon with many steps at a high sample rate) or is not positive. The default bound is 1000 for "rdp"
  and 20 for "pld", whose discretised loss distribution needs tens of GiB beyond sigma ~ 50.
  """
  if max_noise_multiplier is None:
    max_noise_multiplier = MAX_NOISE_MULTIPLIER[accountant]
  if not target_epsilon > 0:
    raise ValueError(f"{key}: the target epsilon must be > 0, got {target_epsilon}.")
  if steps <= 0:
    raise ValueError(f"{key}: there are no noisy steps to calibrate for (steps = {steps}).")
  best = epsilon(max_noise_multiplier, sample_rate, steps, delta, accountant=accountant, orders=orders)
  if best > target_epsilon:
    raise ValueError(f"{key}: epsilon = {target_epsilon} at delta = {delta:g} cannot be met in {steps} steps at "
                     f"sample rate {sample_rate:g}: even noise multiplier {max_noise_multiplier:g} spends epsilon "
                     f"{best:.3g}. Train fewer steps, sample fewer examples per step, or raise the target.")
  bracket = (1e-3, max_noise_multiplier)
  if accountant == "pld":
    # PLD is tighter than RDP, so RDP's sigma bounds it from above; a bracket near it also keeps PLD away from
    # the tiny sigmas whose discretisation would not fit in memory.
    upper = noise_multiplier_for(target_epsilon, sample_rate, steps, delta, accountant="rdp", key=key)
    bracket = (upper / 4.0, upper)
  sigma = dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant, orders), lambda s: dpsgd_event(s, sample_rate, steps), target_epsilon, delta,
      dp_accounting.ExplicitBracketInterval(*bracket), tol=1e-4)
  sigma = float(sigma)
  # calibrate_dp_mechanism returns a point of the bracket within tol; step up until the target provably holds.
  while epsilon(sigma, sample_rate, steps, delta, accountant=accountant, orders=orders) > target_epsilon:
    sigma *= 1.0 + 1e-4
  return sigma
