"""The compiled train step: device-count invariance, gradient accumulation, EMA, the non-finite guard."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import build, losses, models, sharding
from medjax.train_state import TrainState

SHAPE_2D = (12, 16)


def _batch(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch_size,) + SHAPE_2D + (1,)).astype(np.float32)
  label = (image[..., 0] > 0.5).astype(np.int32) + (image[..., 0] > 1.5).astype(np.int32)
  return {"image": image, "label": label}


def _setup(mesh_spec, preset, *, accum_steps=1, ema_decay=0.0, lr=1e-2):
  model = models.build_model("unet", dict(spatial_dims=2, num_classes=3, features=(8, 16), norm="instance"))
  tx = optax.adam(lr)
  mesh = sharding.make_mesh(mesh_spec)
  init_fn = build.init_state_fn(model, tx, np.zeros(SHAPE_2D + (1,), np.float32), use_ema=ema_decay > 0)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract, mesh, preset)
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  objective = losses.make_objective("dice_xent", {})
  step = build.jit_train_step(model, objective, tx, mesh, state_sharding, accum_steps=accum_steps,
                              ema_decay=ema_decay)
  return mesh, state, step


def _run(mesh_spec, preset, batches, **kw):
  mesh, state, step = _setup(mesh_spec, preset, **kw)
  losses_seen = []
  for b in batches:
    state, metrics = step(state, sharding.host_to_global(b, mesh))
    losses_seen.append(float(metrics["loss"]))
  return state, np.array(losses_seen)


@pytest.mark.parametrize("preset", ["data_parallel", "fsdp"])
def test_eight_devices_match_one_device(preset):
  batches = [_batch(8, seed=s) for s in range(3)]
  state1, loss1 = _run((("data", 1),), "data_parallel", batches)
  state8, loss8 = _run((("data", -1),), preset, batches)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state8.params), jax.device_get(state1.params), rtol=1e-5, atol=1e-5)
  if preset == "fsdp":
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state8.params)]
    assert any("data" in tuple(spec) for spec in specs), "fsdp sharded no parameter"


def test_grad_accumulation_equals_large_batch():
  big = _batch(8, seed=3)
  state_full, loss_full = _run((("data", 1),), "data_parallel", [big])
  state_acc, loss_acc = _run((("data", 1),), "data_parallel", [big], accum_steps=4)
  np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_acc.params, state_full.params, rtol=1e-5, atol=1e-5)


def test_grad_accumulation_on_eight_devices():
  big = _batch(16, seed=4)
  state_full, _ = _run((("data", 1),), "data_parallel", [big])
  state_acc, _ = _run((("data", -1),), "data_parallel", [big], accum_steps=2)
  chex.assert_trees_all_close(jax.device_get(state_acc.params), state_full.params, rtol=1e-5, atol=1e-5)


def test_ema_tracks_params():
  mesh, state, step = _setup((("data", 1),), "data_parallel", ema_decay=0.5)
  for t in range(2):  # warm-up decay min(0.5, (1 + t) / (10 + t)): 0.1, then 2/11
    before = jax.device_get(state.ema_params)
    state, _ = step(state, sharding.host_to_global(_batch(2), mesh))
    decay = min(0.5, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda b, p: decay * b + (1 - decay) * p, before, jax.device_get(state.params))
    chex.assert_trees_all_close(state.ema_params, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_step_keeps_previous_state():
  mesh, state, step = _setup((("data", 1),), "data_parallel")
  state, _ = step(state, sharding.host_to_global(_batch(2), mesh))
  good = jax.device_get(state)
  bad = _batch(2)
  bad["image"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, sharding.host_to_global(bad, mesh))
  assert float(metrics["finite"]) == 0.0
  chex.assert_trees_all_equal(jax.device_get(state.params), good.params)
  chex.assert_trees_all_equal(jax.device_get(state.opt_state), good.opt_state)
  assert int(state.step) == 2


def test_dropout_rng_depends_on_step_only():
  """The per-step key is fold_in(rng, step): two states with the same step draw the same numbers."""
  state = TrainState(step=jnp.array(5), params={}, model_state={}, opt_state=(), ema_params=None,
                     rng=jax.random.PRNGKey(1))
  key = jax.random.fold_in(state.rng, state.step)
  assert jnp.array_equal(key, jax.random.fold_in(jax.random.PRNGKey(1), 5))


def test_augment_fn_runs_inside_the_step_with_a_step_derived_key():
  seen = []

  def augment(rng, batch):
    seen.append(rng.shape)  # traced once: the step is compiled once
    flipped = jnp.where(jax.random.bernoulli(rng), batch["image"][:, ::-1], batch["image"])
    return {**batch, "image": flipped}

  mesh, state, _ = _setup((("data", 1),), "data_parallel")
  model = models.build_model("unet", dict(spatial_dims=2, num_classes=3, features=(8, 16), norm="instance"))
  step = build.jit_train_step(model, losses.make_objective("dice_xent", {}), optax.adam(1e-2), mesh,
                              jax.tree.map(lambda a: a.sharding, state), augment_fn=augment)
  state, metrics = step(state, sharding.host_to_global(_batch(2), mesh))
  state, metrics = step(state, sharding.host_to_global(_batch(2), mesh))
  assert len(seen) == 1 and np.isfinite(float(metrics["loss"]))


def test_ema_averages_batch_statistics():
  """The EMA model evaluates with averaged statistics, not the live ones of the current weights."""
  model = models.build_model("resnet18", dict(spatial_dims=2, num_classes=2, width=4, stage_sizes=(1, 1, 1, 1),
                                              small_input=True))
  tx = optax.adam(1e-2)
  mesh = sharding.make_mesh((("data", 1),))
  init_fn = build.init_state_fn(model, tx, np.zeros(SHAPE_2D + (1,), np.float32), use_ema=True)
  state_sharding = sharding.state_shardings(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh, "data_parallel")
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  step = build.jit_train_step(model, losses.make_objective("xent", {}), tx, mesh, state_sharding, ema_decay=0.5)
  rng = np.random.default_rng(0)
  for t in range(3):
    before = jax.device_get(state.ema_model_state)
    batch = {"image": rng.normal(2.0, 3.0, size=(4,) + SHAPE_2D + (1,)).astype(np.float32),
             "label": rng.integers(0, 2, size=(4,)).astype(np.int32)}
    state, _ = step(state, sharding.host_to_global(batch, mesh))
    decay = min(0.5, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda b, m: decay * b + (1 - decay) * m, before, jax.device_get(state.model_state))
    chex.assert_trees_all_close(jax.device_get(state.ema_model_state), expected, rtol=1e-5, atol=1e-6)
  live, averaged = state.variables(use_ema=False), state.variables(use_ema=True)
  assert averaged["params"] is state.ema_params and averaged["batch_stats"] is state.ema_model_state["batch_stats"]
  assert live["batch_stats"] is state.model_state["batch_stats"]
  differs = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.ema_model_state, state.model_state)
  assert any(jax.tree.leaves(differs))
