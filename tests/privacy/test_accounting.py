"""Accounting: our epsilon is dp-accounting's, the Opacus-documented value reproduces, calibration inverts it."""

import math

import dp_accounting
import pytest

from medjax.privacy import accounting


def test_rdp_epsilon_matches_the_value_opacus_documents():
  # Opacus documents epsilon 2.39 at order 5 for q = 0.01, sigma = 1.0, 300 steps, delta = 1e-5 with the
  # orders [2, 5, 10, 20, 100].
  eps, order = accounting.rdp_epsilon_and_order(1.0, 0.01, 300, 1e-5, orders=[2, 5, 10, 20, 100])
  assert round(eps, 2) == 2.39
  assert order == 5
  assert accounting.epsilon(1.0, 0.01, 300, 1e-5, orders=[2, 5, 10, 20, 100]) == pytest.approx(eps, rel=1e-12)


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_for_the_same_event(name):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.3)), 120)
  reference = dp_accounting.rdp.RdpAccountant() if name == "rdp" else dp_accounting.pld.PLDAccountant()
  reference.compose(event)
  ours = accounting.epsilon(1.3, 0.05, 120, 1e-5, accountant=name)
  assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_pld_is_tighter_than_rdp_and_epsilon_grows_with_steps():
  rdp = accounting.epsilon(1.0, 0.01, 300, 1e-5)
  pld = accounting.epsilon(1.0, 0.01, 300, 1e-5, accountant="pld")
  assert pld < rdp
  assert accounting.epsilon(1.0, 0.01, 600, 1e-5) > rdp
  assert accounting.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
  assert math.isinf(accounting.epsilon(0.0, 0.01, 10, 1e-5))


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_noise_multiplier_for_a_target_reaches_it_tightly(name):
  sigma = accounting.noise_multiplier_for(2.0, 0.02, 200, 1e-5, accountant=name)
  assert accounting.epsilon(sigma, 0.02, 200, 1e-5, accountant=name) <= 2.0
  assert accounting.epsilon(sigma * 0.99, 0.02, 200, 1e-5, accountant=name) > 2.0


def test_an_unreachable_target_names_the_key():
  with pytest.raises(ValueError, match=r"config.privacy.target_epsilon: epsilon = 1e-06 .* cannot be met"):
    accounting.noise_multiplier_for(1e-6, 1.0, 10_000, 1e-5, max_noise_multiplier=50.0)
  with pytest.raises(ValueError, match="must be > 0"):
    accounting.noise_multiplier_for(0.0, 0.01, 10, 1e-5)
  with pytest.raises(ValueError, match="unknown accountant 'moments'"):
    accounting.epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")
