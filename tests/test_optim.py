"""Tests for medjax.optim: closed-form schedules, the weight-decay mask, clipping and config errors."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from medjax import optim

PEAK, TOTAL, WARMUP, INIT = 1e-3, 1000, 100, 1e-5


def _config(**overrides):
  c = mlc.ConfigDict()
  c.optim = dict(name="sgd")
  c.lr = 0.1
  c.total_steps = 10
  c.schedule = dict(decay="constant")
  c.grad_clip_norm = None
  for k, v in overrides.items():
    c[k] = v
  return c


def _params():
  ones = lambda *s: jnp.ones(s, jnp.float32)
  return {"conv": {"kernel": ones(3, 3, 2, 4), "bias": ones(4)}, "norm": {"scale": ones(4), "bias": ones(4)},
          "dense": {"kernel": ones(4, 5), "bias": ones(5)}}


def _one_update(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


# ------------------------------------------------------------------------------------------- schedules


def _warm(s):
  return INIT + (PEAK - INIT) * s / WARMUP


def _t(s):
  return min(max((s - WARMUP) / (TOTAL - WARMUP), 0.0), 1.0)


CLOSED_FORMS = {
    "constant": ({}, lambda s: PEAK),
    "cosine": (dict(alpha=0.1), lambda s: 0.1 * PEAK + 0.9 * PEAK * 0.5 * (1 + math.cos(math.pi * _t(s)))),
    "polynomial": (dict(power=0.9, end_value=1e-6),
                   lambda s: 1e-6 + (PEAK - 1e-6) * (1 - _t(s)) ** 0.9),
    "exponential": (dict(decay_rate=0.5, transition_steps=300), lambda s: PEAK * 0.5 ** ((s - WARMUP) / 300)),
    "step": (dict(boundaries=(0.5, 0.75), factor=0.1), lambda s: PEAK * 0.1 ** ((s >= 500) + (s >= 750))),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_schedule_matches_closed_form(name):
  kwargs, expected = CLOSED_FORMS[name]
  fn = optim.make_schedule(name, PEAK, TOTAL, warmup_steps=WARMUP, warmup_init=INIT, **kwargs)
  mid = (WARMUP + TOTAL) // 2
  for s in (0, WARMUP // 2, WARMUP - 1):  # linear warmup from warmup_init
    np.testing.assert_allclose(fn(s), _warm(s), rtol=1e-6, err_msg=f"step {s}")
  for s in (WARMUP, mid, TOTAL - 1, TOTAL):
    np.testing.assert_allclose(fn(s), expected(s), rtol=1e-6, err_msg=f"step {s}")
  np.testing.assert_allclose(fn(WARMUP), PEAK, rtol=1e-6)  # warmup ends exactly at the peak
  assert fn(mid).dtype == jnp.float32
  # Jittable with a traced step, same values.
  np.testing.assert_allclose(jax.jit(fn)(jnp.int32(mid)), fn(mid), rtol=1e-6)


def test_cosine_and_polynomial_reach_end_value_and_stay():
  cos = optim.make_schedule("cosine", PEAK, TOTAL, alpha=0.05)
  poly = optim.make_schedule("polynomial", PEAK, TOTAL, power=2.0, end_value=0.0)
  np.testing.assert_allclose(cos(0), PEAK, rtol=1e-6)
  np.testing.assert_allclose([cos(TOTAL), cos(2 * TOTAL)], [0.05 * PEAK] * 2, rtol=1e-6)
  np.testing.assert_allclose(cos(TOTAL // 2), 0.05 * PEAK + 0.95 * PEAK / 2, rtol=1e-6)
  np.testing.assert_allclose(poly(TOTAL // 2), PEAK * 0.25, rtol=1e-6)
  assert float(poly(TOTAL + 5)) == 0.0


def test_exponential_staircase_and_default_transition():
  fn = optim.make_schedule("exponential", 1.0, 100, decay_rate=0.5, transition_steps=10, staircase=True)
  np.testing.assert_allclose([fn(0), fn(9), fn(10), fn(25)], [1.0, 1.0, 0.5, 0.25], rtol=1e-6)
  fn = optim.make_schedule("exponential", 1.0, 100, warmup_steps=20, decay_rate=0.1)
  np.testing.assert_allclose([fn(20), fn(60), fn(100)], [1.0, 0.1 ** 0.5, 0.1], rtol=1e-6)


@pytest.mark.parametrize("boundaries", [(0.5, 0.75), (500, 750)])
def test_step_schedule_medmnist(boundaries):
  # MedMNIST recipe: 100 epochs of 10 steps, lr x0.1 at epochs 50 and 75.
  steps_per_epoch, peak = 10, 1e-3
  c = _config(optim=dict(name="adam"), lr=peak, total_steps=100 * steps_per_epoch,
              schedule=dict(decay="step", boundaries=boundaries, factor=0.1))
  _, fn = optim.make_optimizer(c)
  epochs = np.array([0, 49, 50, 74, 75, 99, 100])
  got = np.array([fn(e * steps_per_epoch) for e in epochs])
  np.testing.assert_allclose(got, peak * np.array([1, 1, 0.1, 0.1, 0.01, 0.01, 0.01]), rtol=1e-6)
  np.testing.assert_allclose([fn(499), fn(749)], [peak, peak * 0.1], rtol=1e-6)  # boundary step is the switch


def test_missing_schedule_is_constant():
  c = _config(lr=0.3)
  del c["schedule"]
  _, fn = optim.make_optimizer(c)
  np.testing.assert_allclose([fn(0), fn(7)], [0.3, 0.3], rtol=1e-6)
  _, fn = optim.make_optimizer(_config(lr=0.3, schedule=dict(warmup_steps=4)))
  np.testing.assert_allclose([fn(0), fn(2), fn(4), fn(9)], [0.0, 0.15, 0.3, 0.3], rtol=1e-6)


# ------------------------------------------------------------------------------------------ weight decay


def test_decay_mask_rule_on_arrays_and_shapes():
  params = _params()
  mask = optim.decay_mask(params)
  assert mask == {"conv": {"kernel": True, "bias": False}, "norm": {"scale": False, "bias": False},
                  "dense": {"kernel": True, "bias": False}}
  assert optim.decay_mask(jax.eval_shape(lambda: params)) == mask
  assert optim.decay_mask({"s": jnp.float32(2.0)}) == {"s": False}


def test_adamw_decays_kernels_only():
  lr, wd = 0.1, 0.5
  tx, _ = optim.make_optimizer(_config(optim=dict(name="adamw", wd=wd), lr=lr))
  params = _params()
  new = _one_update(tx, params, jax.tree.map(jnp.zeros_like, params))
  for path in (("conv", "kernel"), ("dense", "kernel")):  # decoupled: p * (1 - lr * wd)
    np.testing.assert_allclose(new[path[0]][path[1]], 1.0 - lr * wd, rtol=1e-6)
  for path in (("conv", "bias"), ("norm", "scale"), ("norm", "bias"), ("dense", "bias")):
    chex.assert_trees_all_equal(new[path[0]][path[1]], params[path[0]][path[1]])


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_coupled_wd_shrinks_kernels_only(name):
  tx, _ = optim.make_optimizer(_config(optim=dict(name=name, wd=0.5), lr=0.01))
  params = _params()
  new = _one_update(tx, params, jax.tree.map(jnp.zeros_like, params))
  assert float(new["conv"]["kernel"].max()) < 1.0 and float(new["dense"]["kernel"].max()) < 1.0
  chex.assert_trees_all_equal(new["norm"], params["norm"])
  chex.assert_trees_all_equal(new["conv"]["bias"], params["conv"]["bias"])
  if name == "sgd":  # plain SGD on the L2 gradient wd * p: p * (1 - lr * wd)
    np.testing.assert_allclose(new["conv"]["kernel"], 1.0 - 0.01 * 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------------- optimizer numerics


def _run(tx, steps=5):
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.3, -0.7])}
  loss = lambda p: jnp.sum((p["w"] @ jnp.array([1.0, 2.0]) + p["b"] - 1.0) ** 2)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_nesterov_matches_optax():
  tx, _ = optim.make_optimizer(_config(optim=dict(name="sgd", momentum=0.9, nesterov=True), lr=0.01))
  chex.assert_trees_all_close(_run(tx), _run(optax.sgd(0.01, momentum=0.9, nesterov=True)), rtol=1e-6)


def test_rmsprop_centered_matches_optax():
  tx, _ = optim.make_optimizer(_config(optim=dict(name="rmsprop", decay=0.95, eps=1e-6, momentum=0.5,
                                                  centered=True), lr=0.01))
  ref = optax.rmsprop(0.01, decay=0.95, eps=1e-6, momentum=0.5, centered=True)
  chex.assert_trees_all_close(_run(tx), _run(ref), rtol=1e-6)


def test_schedule_drives_the_optimizer():
  # SGD with lr = step schedule: the update at each step is -lr(step) * grad, optax counting from 0.
  tx, fn = optim.make_optimizer(_config(lr=1.0, total_steps=4, schedule=dict(decay="step", boundaries=(2,),
                                                                             factor=0.5)))
  params, grads = {"x": jnp.zeros(())}, {"x": jnp.ones(())}
  state, seen = tx.init(params), []
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    seen.append(-float(updates["x"]))
  np.testing.assert_allclose(seen, [float(fn(s)) for s in range(4)], rtol=1e-6)
  np.testing.assert_allclose(seen, [1.0, 1.0, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("clip", [None, 0, 1.0])
def test_grad_clip_caps_global_norm(clip):
  tx, _ = optim.make_optimizer(_config(lr=1.0, grad_clip_norm=clip))
  params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
  grads = {"a": jnp.full((2, 3), 3.0), "b": jnp.full((3,), -4.0)}  # global norm sqrt(54 + 48) ~ 10.1
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = float(optax.tree.norm(updates))
  if clip:
    np.testing.assert_allclose(norm, clip, rtol=1e-6)
    small = jax.tree.map(lambda g: g * 1e-3, grads)  # under the cap: untouched
    updates, _ = tx.update(small, tx.init(params), params)
    chex.assert_trees_all_close(updates, jax.tree.map(jnp.negative, small), rtol=1e-6)
  else:
    np.testing.assert_allclose(norm, float(optax.tree.norm(grads)), rtol=1e-6)


# ------------------------------------------------------------------------------------------ config errors


def test_registry_names():
  assert optim.OPTIMIZERS.names() == ["adam", "adamw", "rmsprop", "sgd"]
  assert optim.SCHEDULES.names() == ["constant", "cosine", "exponential", "polynomial", "step"]


def test_unknown_optimizer_name():
  with pytest.raises(KeyError, match=r"config\.optim\.name.*Did you mean 'adamw'"):
    optim.make_optimizer(_config(optim=dict(name="adamww")))
  with pytest.raises(KeyError, match=r"config\.schedule\.decay.*Did you mean 'cosine'"):
    optim.validate_optim_config(_config(schedule=dict(decay="cosin")))


def test_unknown_kwarg_names_the_key():
  with pytest.raises(ValueError, match=r"config\.optim: unknown key 'momentun' for optimizer 'sgd'\. "
                                       r"Did you mean 'momentum'\? Valid: freeze, layer_decay, layer_groups, "
                                       r"lr_multipliers, momentum, nesterov, train_only, unfreeze, wd\."):
    optim.make_optimizer(_config(optim=dict(name="sgd", momentun=0.9)))
  with pytest.raises(ValueError,
                     match=r"config\.schedule: unknown key 'alpah' for schedule 'cosine'.*'alpha'"):
    optim.validate_optim_config(_config(schedule=dict(decay="cosine", alpah=0.1)))
  with pytest.raises(ValueError, match=r"unknown key 'zzz'.*Valid: b1, b2, eps, freeze,"):
    optim.validate_optim_config(_config(optim=dict(name="adam", zzz=1)))


@pytest.mark.parametrize("overrides, pattern", [
    (dict(optim=dict(wd=0.1)), r"config\.optim: missing 'name'"),
    (dict(lr=-1.0), r"config\.lr must be a number >= 0"),
    (dict(total_steps=0), r"config\.total_steps must be an integer >= 1"),
    (dict(schedule=dict(warmup_steps=11)), r"warmup_steps=11 exceeds config\.total_steps=10"),
    (dict(schedule=dict(decay="step")), r"config\.schedule: schedule 'step' needs 'boundaries'"),
    (dict(schedule=dict(decay="step", boundaries=(8, 4))), r"config\.schedule: .*strictly increasing"),
    (dict(schedule=dict(decay="step", boundaries=(20,))), r"config\.schedule: .*must lie in"),
    (dict(optim=dict(name="sgd", nesterov=True)), r"config\.optim: .*nesterov=True needs momentum"),
    (dict(optim=dict(name="adamw", wd=-1.0)), r"config\.optim\.wd must be a number >= 0"),
    (dict(grad_clip_norm=-1.0), r"config\.grad_clip_norm must be a number >= 0"),
])
def test_bad_values_raise_naming_the_key(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    optim.validate_optim_config(_config(**overrides))


def test_validate_accepts_plain_dicts_and_string_optim():
  optim.validate_optim_config(dict(optim="adamw", lr=3e-4, total_steps=100,
                                   schedule=dict(decay="cosine", warmup_steps=10, alpha=0.01)))
  tx, fn = optim.make_optimizer(dict(optim=dict(name="adamw", wd=1e-5), lr=3e-4, total_steps=100,
                                     schedule=dict(decay="polynomial", power=0.9), grad_clip_norm=12.0))
  assert isinstance(tx, optax.GradientTransformation)
  np.testing.assert_allclose(fn(0), 3e-4, rtol=1e-6)
