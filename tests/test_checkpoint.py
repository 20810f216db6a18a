"""Tests for medjax.checkpoint: round trips, resharding 8 <-> 1 devices, best-k retention, config, load()."""

import os

# 8 fake CPU devices for the resharding tests; must precede the first jax import (no-op if conftest set it).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax import checkpoint as ckpt_lib
from medjax.train_state import TrainState


def _state(seed=0, use_ema=True):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {"conv": {"kernel": jax.random.normal(k1, (8, 3), jnp.float32),
                     "bias": jnp.arange(3, dtype=jnp.bfloat16)},
            "head": {"kernel": jax.random.normal(k2, (3, 2), jnp.float32)}}
  variables = {"params": params, "batch_stats": {"mean": jnp.full((3,), 0.5, jnp.float32)}}
  return TrainState.create(variables=variables, tx=optax.adamw(1e-3), rng=jax.random.PRNGKey(seed + 1),
                           use_ema=use_ema)


def _shardings(state, mesh, shard_leading=False):
  """Replicated everywhere; with shard_leading, leaves whose leading dim is 8 split over "data"."""
  def one(x):
    spec = P("data") if shard_leading and x.ndim and x.shape[0] == 8 else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, state)


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def _ckpt(path, **kw):
  kw = {"save_interval_steps": 1, "max_to_keep": 2, "async_save": False, **kw}
  return ckpt_lib.Checkpointer(path, **kw)


def test_round_trip_equal_trees_and_dtypes(tmp_path):
  state = _state()
  with _ckpt(tmp_path / "c") as c:
    assert c.save(3, state, metrics={"val/dice_mean": jnp.float32(0.5)})
    mesh = _mesh(1)
    restored = c.restore(_abstract(state, _shardings(state, mesh)))
  assert isinstance(restored, TrainState)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert restored.params["conv"]["bias"].dtype == jnp.bfloat16
  assert c.metrics(3) == {"val/dice_mean": 0.5}


def test_restore_without_ema(tmp_path):
  state = _state(use_ema=False)
  with _ckpt(tmp_path / "c") as c:
    c.save(1, state)
    restored = c.restore(_abstract(state, _shardings(state, _mesh(1))))
  assert restored.ema_params is None
  chex.assert_trees_all_equal(restored, state)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: jax was initialised before this module "
                    "set XLA_FLAGS=--xla_force_host_platform_device_count=8 (set it in tests/conftest.py)")
def test_restore_8_devices_to_1_and_back(tmp_path):
  mesh8, mesh1 = _mesh(8), _mesh(1)
  state = _state()
  sh8 = _shardings(state, mesh8, shard_leading=True)
  state8 = jax.device_put(state, sh8)
  assert state8.params["conv"]["kernel"].sharding.spec == P("data")
  assert len(state8.params["conv"]["kernel"].addressable_shards) == 8
  with _ckpt(tmp_path / "c") as c:
    c.save(1, state8)
    sh1 = _shardings(state, mesh1)
    state1 = c.restore(_abstract(state, sh1))
    kernel = state1.params["conv"]["kernel"]
    assert kernel.sharding == sh1.params["conv"]["kernel"]
    assert kernel.sharding.device_set == {jax.devices()[0]}
    chex.assert_trees_all_equal(state1, state)

    c.save(2, state1)  # written from 1 device, read back onto 8
    back = c.restore(_abstract(state, sh8), step=2)
  kernel = back.params["conv"]["kernel"]
  assert kernel.sharding == sh8.params["conv"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert {s.data.shape for s in kernel.addressable_shards} == {(1, 3)}
  chex.assert_trees_all_equal(back, state)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_keep_best_k_plus_latest(tmp_path, mode):
  # Best two (by mode) are steps 3 and 7; latest two are 9 and 10 -> {3, 7, 9, 10} survive.
  good, bad = (0.9, 0.1) if mode == "max" else (0.1, 0.9)
  values = {s: bad + 0.01 * s * (1 if mode == "min" else -1) for s in range(1, 11)}
  values[3], values[7] = good, good + (0.01 if mode == "max" else -0.01)
  c = _ckpt(tmp_path / "c", max_to_keep=2, keep_best=2, best_metric="val/dice_mean", best_mode=mode)
  state = _state()
  for s in range(1, 11):
    assert c.save(s, state, metrics={"val/dice_mean": values[s], "train/loss": 1.0})
  c.wait()
  assert c.all_steps() == [3, 7, 9, 10]
  assert c.best_step() == 7
  assert c.latest_step() == 10
  c.close()
  # A fresh Checkpointer over the same directory sees the same steps and best step (metrics read from disk).
  c2 = _ckpt(tmp_path / "c", max_to_keep=2, keep_best=2, best_metric="val/dice_mean", best_mode=mode)
  assert c2.all_steps() == [3, 7, 9, 10] and c2.best_step() == 7
  c2.close()


def test_steps_without_metric_or_nan_are_never_best(tmp_path):
  c = _ckpt(tmp_path / "c", max_to_keep=1, keep_best=1, best_metric="val/dice_mean", best_mode="max")
  state = _state()
  c.save(1, state)  # no metrics at all
  assert c.best_step() is None
  c.save(2, state, metrics={"val/dice_mean": 0.3})
  c.save(3, state, metrics={"train/loss": 0.1})  # other metrics only
  c.save(4, state, metrics={"val/dice_mean": float("nan")})  # diverged
  c.save(5, state)
  assert c.all_steps() == [2, 5]
  assert c.best_step() == 2
  c.close()


def test_save_interval_force_and_should_save(tmp_path):
  c = _ckpt(tmp_path / "c", save_interval_steps=5, max_to_keep=10)
  state = _state()
  assert c.should_save(5) and not c.should_save(7)
  assert [s for s in range(1, 13) if c.save(s, state)] == [5, 10]
  assert c.save(12, state, force=True)
  assert not c.save(10, state, force=True)  # already saved (final save on an interval step): a no-op
  assert c.all_steps() == [5, 10, 12]
  c.close()


def test_async_save_wait_restore(tmp_path):
  state = _state()
  c = _ckpt(tmp_path / "c", async_save=True)
  assert c.save(1, state, metrics={"val/dice_mean": 0.7})
  c.wait()
  assert os.path.isdir(tmp_path / "c" / "1" / "state")
  restored = c.restore(_abstract(state, _shardings(state, _mesh(1))))
  chex.assert_trees_all_equal(restored, state)
  c.close()


def test_error_missing_directory_and_empty_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _ckpt(tmp_path / "nope", read_only=True)
  c = _ckpt(tmp_path / "empty")
  state = _state()
  with pytest.raises(FileNotFoundError, match=f"No checkpoints found in {tmp_path / 'empty'}"):
    c.restore(_abstract(state, _shardings(state, _mesh(1))))
  assert c.latest_step() is None and c.best_step() is None
  c.close()


def test_error_missing_step_lists_available(tmp_path):
  state = _state()
  with _ckpt(tmp_path / "c", max_to_keep=5) as c:
    c.save(2, state)
    c.save(4, state)
    with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[2, 4\]"):
      c.restore(_abstract(state, _shardings(state, _mesh(1))), step=3)


def test_error_incompatible_checkpoint_names_key_path(tmp_path):
  state = _state()
  with _ckpt(tmp_path / "c") as c:
    c.save(1, state)
    other = state.replace(params={**state.params, "head": {"kernel": jnp.zeros((4, 2))}})
    expected = r"step 1 .*params\.head\.kernel: checkpoint \(3, 2\) vs requested \(4, 2\)"
    with pytest.raises(ValueError, match=expected):
      c.restore(_abstract(other, _shardings(other, _mesh(1))))
    fewer = state.replace(params={"conv": state.params["conv"]})  # structure mismatch
    with pytest.raises(ValueError, match=f"Checkpoint {tmp_path / 'c'} step 1 does not match"):
      c.restore(_abstract(fewer, _shardings(fewer, _mesh(1))))


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="best_metric"):
    _ckpt(tmp_path / "c", keep_best=2)
  with pytest.raises(ValueError, match="best_mode"):
    _ckpt(tmp_path / "c", best_mode="largest")
  with pytest.raises(ValueError, match="max_to_keep"):
    _ckpt(tmp_path / "c", max_to_keep=0)


def _config():
  c = mlc.ConfigDict()
  c.seed, c.lr, c.model_name = 0, 3e-4, "unet"
  c.model = dict(spatial_dims=2, num_classes=2, features=(4, 8), blocks_per_stage=1, norm="batch")
  c.checkpoint = dict(max_to_keep=2, keep_best=1, async_save=True)
  return c


def test_config_json_round_trip(tmp_path):
  config = _config()
  path = ckpt_lib.save_config(tmp_path, config)
  assert path == os.path.join(tmp_path, "config.json")
  assert os.listdir(tmp_path) == ["config.json"]  # no temp file left behind
  back = ckpt_lib.load_config(tmp_path)
  assert back.to_dict() == config.to_dict()
  assert back.model.features == (4, 8)
  config.lr = 1e-3  # overwrite replaces the file
  ckpt_lib.save_config(tmp_path, config)
  assert ckpt_lib.load_config(tmp_path).lr == 1e-3
  with pytest.raises(FileNotFoundError, match="config.json"):
    ckpt_lib.load_config(tmp_path / "missing")


@pytest.mark.parametrize("use_ema,has_ema", [(True, True), (False, True), (True, False)])
def test_load_unet_without_optimizer(tmp_path, use_ema, has_ema):
  models = pytest.importorskip("medjax.models")
  config = _config()
  model = models.build_model(config.model_name, config.model)
  x = jnp.ones((1, 16, 12, 1), jnp.float32)
  # Shapes via eval_shape and values from numpy: an eager UNet init costs seconds of op-by-op compiles.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rs = np.random.RandomState(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rs.uniform(0.5, 1.5, s.shape), s.dtype), shapes)
  state = TrainState.create(variables=variables, tx=optax.adam(1e-3), rng=jax.random.PRNGKey(1), use_ema=True)
  ema = jax.tree.map(lambda p: p + 1.0, state.params) if has_ema else None  # EMA off -> params are used
  ema_stats = jax.tree.map(lambda m: m * 2.0, state.model_state) if has_ema else None
  state = state.replace(ema_params=ema, ema_model_state=ema_stats, step=jnp.int32(6))
  ckpt_lib.save_config(tmp_path, config)
  with _ckpt(tmp_path / ckpt_lib.CHECKPOINT_DIR) as c:
    c.save(6, state)

  loaded = ckpt_lib.load(tmp_path, use_ema=use_ema)
  assert loaded.step == 6
  assert loaded.config.to_dict() == config.to_dict()
  assert type(loaded.model) is type(model)
  expected = state.variables(use_ema=use_ema)
  chex.assert_trees_all_equal(loaded.variables, expected)
  assert set(loaded.variables) == {"params", "batch_stats"}
  leaf = jax.tree.leaves(loaded.variables)[0]
  assert leaf.sharding.device_set == {jax.local_devices()[0]}
  with pytest.raises(FileNotFoundError, match=r"step 5 .*available steps: \[6\]"):
    ckpt_lib.load(tmp_path, step=5)
  out, _ = jax.jit(lambda v: loaded.model.apply(v, x, train=False))(loaded.variables)
  assert out.shape == (1, 16, 12, 2) and bool(jnp.all(jnp.isfinite(out)))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    ckpt_lib.load(tmp_path)
  pytest.importorskip("medjax.models")
  ckpt_lib.save_config(tmp_path, _config())
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt_lib.load(tmp_path)


@pytest.mark.parametrize("use_ema", [True, False])
def test_checkpoint_without_ema_model_state_restores(tmp_path, use_ema):
  """Checkpoints written before TrainState had `ema_model_state` resume; the statistics' EMA restarts from
  the restored statistics."""
  train = pytest.importorskip("medjax.train")
  params = {"w": jnp.arange(4.0)}
  stats = {"batch_stats": {"mean": jnp.full((2,), 3.0)}}
  tx = optax.adam(1e-3)
  old = {"step": jnp.int32(4), "params": params, "model_state": stats, "opt_state": tx.init(params),
         "ema_params": jax.tree.map(lambda p: p + 1.0, params) if use_ema else None, "rng": jax.random.PRNGKey(2)}
  with _ckpt(tmp_path) as c:
    c.save(4, old)
  fresh = TrainState.create(variables={"params": params, **stats}, tx=tx, rng=jax.random.PRNGKey(0),
                            use_ema=use_ema)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), fresh)
  with _ckpt(tmp_path) as c:
    restored = train.restore_state(c, target, 4)
  assert int(restored.step) == 4
  chex.assert_trees_all_equal(restored.model_state, stats)
  if use_ema:
    chex.assert_trees_all_equal(restored.ema_params, {"w": jnp.arange(4.0) + 1.0})
    chex.assert_trees_all_equal(restored.ema_model_state, stats)
  else:
    assert restored.ema_params is None and restored.ema_model_state is None
