"""The registered learning-rate schedules (`SCHEDULES`) and `make_schedule` (with linear warmup)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from medjax.registry import Registry

SCHEDULES = Registry("schedule")

ScheduleFn = Callable[[Any], jax.Array]


# ------------------------------------------------------------------------------------------- schedules
# Each registered schedule is `f(peak_value, total_steps, warmup_steps, **kw) -> fn(step)`; `fn` only has to
# be right for step >= warmup_steps (the linear warmup in `make_schedule` covers the steps before) and counts
# steps from 0, warmup included. Builders do all checks in Python and touch no device.


def _remaining(step, total_steps: int, warmup_steps: int) -> jax.Array:
  """Fraction in [0, 1] of the post-warmup span still ahead at `step` (float32).

  Computed as (total - step) / span rather than 1 - progress: near the end of training the latter loses
  most float32 digits to cancellation (relative error ~1e-5 at 1000 steps).
  """
  span = max(1, total_steps - warmup_steps)
  return jnp.clip((total_steps - jnp.asarray(step, jnp.float32)) / span, 0.0, 1.0)


@SCHEDULES.register("constant")
def constant(peak_value: float, total_steps: int, warmup_steps: int) -> ScheduleFn:
  """lr = peak after warmup."""
  del total_steps, warmup_steps
  return lambda step: jnp.full((), peak_value, jnp.float32)


@SCHEDULES.register("step")
def step_schedule(peak_value: float, total_steps: int, warmup_steps: int, boundaries: Sequence[float],
                  factor: float = 0.1) -> ScheduleFn:
  """Piecewise constant: lr = peak * factor ** (number of boundaries <= step).

  `boundaries` are absolute steps (ints) or fractions of `total_steps` (floats in (0, 1)); e.g. MedMNIST's
  x0.1 at 50% and 75% of training is `boundaries=(0.5, 0.75), factor=0.1`. The new rate applies from the
  boundary step itself. Boundaries must be increasing and lie in [warmup_steps, total_steps].
  """
  if isinstance(boundaries, (int, float)):
    boundaries = (boundaries,)
  steps = []
  for b in boundaries:
    if isinstance(b, bool) or not isinstance(b, (int, float)):
      raise ValueError(f"schedule 'step': boundaries must be numbers, got {b!r}.")
    if isinstance(b, float) and 0.0 < b < 1.0:
      steps.append(int(round(b * total_steps)))
    elif float(b).is_integer():
      steps.append(int(b))
    else:
      raise ValueError(f"schedule 'step': boundary {b!r} is neither a fraction in (0, 1) nor a whole step.")
  if any(b2 <= b1 for b1, b2 in itertools.pairwise(steps)):
    raise ValueError(f"schedule 'step': boundaries must be strictly increasing, got steps {steps}.")
  if steps and (steps[0] < warmup_steps or steps[-1] > total_steps):
    raise ValueError(f"schedule 'step': boundary steps {steps} must lie in [warmup_steps={warmup_steps}, "
                     f"total_steps={total_steps}].")
  # Precomputed per-interval rates, so the traced function is a lookup (no float32 pow drift).
  rates = tuple(peak_value * factor ** i for i in range(len(steps) + 1))

  def fn(s):
    idx = jnp.sum(jnp.asarray(s) >= jnp.asarray(steps, jnp.int32)) if steps else 0
    return jnp.asarray(rates, jnp.float32)[idx]

  return fn


@SCHEDULES.register("exponential")
def exponential(peak_value: float, total_steps: int, warmup_steps: int, decay_rate: float = 0.1,
                transition_steps: Optional[int] = None, staircase: bool = False) -> ScheduleFn:
  """lr = peak * decay_rate ** ((step - warmup) / transition_steps); floor of the exponent if `staircase`.

  `transition_steps` defaults to the post-warmup span, so the rate reaches peak * decay_rate at the end.
  """
  if not decay_rate > 0.0:
    raise ValueError(f"schedule 'exponential': decay_rate must be > 0, got {decay_rate!r}.")
  if transition_steps is None:
    transition_steps = max(1, total_steps - warmup_steps)
  if not transition_steps > 0:
    raise ValueError(f"schedule 'exponential': transition_steps must be > 0, got {transition_steps!r}.")

  def fn(s):
    exponent = jnp.maximum(jnp.asarray(s, jnp.float32) - warmup_steps, 0.0) / transition_steps
    if staircase:
      exponent = jnp.floor(exponent)
    return (peak_value * jnp.power(jnp.float32(decay_rate), exponent)).astype(jnp.float32)

  return fn


@SCHEDULES.register("cosine")
def cosine(peak_value: float, total_steps: int, warmup_steps: int, alpha: float = 0.0) -> ScheduleFn:
  """Half-cosine from peak at the end of warmup to `alpha * peak` at `total_steps` (then flat)."""
  end = alpha * peak_value

  def fn(s):
    # 0.5 * (1 + cos(pi * t)) with t = 1 - r, written as sin^2(pi * r / 2) to stay accurate as r -> 0.
    r = _remaining(s, total_steps, warmup_steps)
    return (end + (peak_value - end) * jnp.sin(0.5 * jnp.pi * r) ** 2).astype(jnp.float32)

  return fn


@SCHEDULES.register("polynomial")
def polynomial(peak_value: float, total_steps: int, warmup_steps: int, power: float = 1.0,
               end_value: float = 0.0) -> ScheduleFn:
  """lr = end + (peak - end) * (1 - t) ** power, t the post-warmup progress; nnU-Net's "poly" is power=0.9."""

  def fn(s):
    r = _remaining(s, total_steps, warmup_steps)
    return (end_value + (peak_value - end_value) * jnp.power(r, power)).astype(jnp.float32)

  return fn


def make_schedule(name: str, peak_value: float, total_steps: int, warmup_steps: int = 0,
                  warmup_init: float = 0.0, **kwargs) -> ScheduleFn:
  """Schedule `name` with a linear warmup from `warmup_init` (step 0) to `peak_value` (step warmup_steps).

  Returns fn(step) -> float32 scalar learning rate; jittable, step may be a Python int or int array.
  """
  decay_fn = SCHEDULES.get(name)(peak_value, total_steps, warmup_steps, **kwargs)
  if not warmup_steps:
    return decay_fn

  def fn(s):
    s_f = jnp.asarray(s, jnp.float32)
    warm = warmup_init + (peak_value - warmup_init) * s_f / warmup_steps
    return jnp.where(s_f < warmup_steps, warm, decay_fn(s)).astype(jnp.float32)

  return fn


