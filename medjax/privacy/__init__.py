"""Differential privacy: DP-SGD as a gradient function the one training step is given.

  config.privacy = dict(clip_norm=1.0, target_epsilon=8.0)   # medjax.privacy.options for every key

Modules: `clipping` (per-example clipping and noise; ghost norms or jax-privacy's vmap clipping), `ghost_norms`
(per-example gradient norms from layer activations), `accounting` (epsilon and noise calibration through
dp-accounting, RDP or PLD), `options` (config.privacy parsed and resolved into a PrivacyPlan).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from medjax.privacy import accounting, clipping, ghost_norms, options
from medjax.privacy.options import PrivacyPlan


@dataclasses.dataclass(frozen=True)
class DpSetup:
  """DP-SGD's parts for one run: the plan, `steps.train_step`'s gradient function, and the norm method used."""

  plan: PrivacyPlan
  gradient_fn: Callable
  norms: str


__all__ = ["DpSetup", "PrivacyPlan", "accounting", "clipping", "ghost_norms", "options"]
