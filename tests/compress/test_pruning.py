"""Tests for medjax.compress.pruning: schedule, masks (global / layer, ties, exact counts), the optax
transformation under adamw (masked weights exactly 0.0 every step, masks only shrink, Orbax resume bit for bit),
the sparsity report and the option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

from medjax import checkpoint as ckpt_lib
from medjax.compress import pruning
from medjax.train_state import TrainState


# ------------------------------------------------------------------------------------------------ schedule

def test_polynomial_sparsity_known_values():
  s = lambda t: pruning.polynomial_sparsity(t, target=0.8, begin_step=10, end_step=20, initial=0.1, power=3)
  assert s(0) == s(10) == pytest.approx(0.1, abs=1e-15)
  assert s(15) == pytest.approx(0.8 - 0.7 * 0.5 ** 3, abs=1e-15)  # 0.7125
  assert s(12) == pytest.approx(0.8 - 0.7 * 0.8 ** 3, abs=1e-15)
  assert s(20) == s(35) == 0.8
  steps = jnp.array([0, 10, 12, 15, 20, 35])
  np.testing.assert_allclose(s(steps), [s(int(t)) for t in steps], rtol=1e-6)
  assert s(steps).dtype == jnp.float32
  jump = lambda t: pruning.polynomial_sparsity(t, target=0.5, begin_step=4, end_step=4)
  assert (jump(3), jump(4)) == (0.0, 0.5)
  np.testing.assert_array_equal(jump(jnp.array([3, 4])), [0.0, 0.5])


# ------------------------------------------------------------------------------------------------ masks

def _toy_params():
  # |a| = 3 1 2 1, |b| = 1 5 .5 (tree order: "a" before "b"); biases and a 1-D scale are never prunable.
  return {"a": {"kernel": jnp.array([[3.0, -1.0], [2.0, 1.0]]), "bias": jnp.zeros(2)},
          "b": {"kernel": jnp.array([[1.0, -5.0, 0.5]]), "bias": jnp.zeros(3)},
          "norm": {"scale": jnp.full((3,), 0.01)}}


def test_global_masks_exact_count_and_ties_by_position():
  masks = pruning.magnitude_masks(_toy_params(), 0.5)  # k = round(3.5) = 4 (half to even)
  # Smallest first: b[2] (0.5), then the three 1s in position order a[1], a[3], b[0].
  np.testing.assert_array_equal(masks["a"]["kernel"], [[True, False], [True, False]])
  np.testing.assert_array_equal(masks["b"]["kernel"], [[False, True, False]])
  for leaf in (masks["a"]["bias"], masks["b"]["bias"], masks["norm"]["scale"]):
    assert leaf.shape == () and leaf.dtype == jnp.bool_ and bool(leaf)
  masks = pruning.magnitude_masks(_toy_params(), 3 / 7)  # k = 3: the tie among the 1s cut after a[3]
  np.testing.assert_array_equal(masks["a"]["kernel"], [[True, False], [True, False]])
  np.testing.assert_array_equal(masks["b"]["kernel"], [[True, True, False]])


def test_layer_masks_prune_each_kernel_separately():
  masks = pruning.magnitude_masks(_toy_params(), 0.25, scope="layer")  # k_a = round(1) = 1, k_b = round(.75) = 1
  np.testing.assert_array_equal(masks["a"]["kernel"], [[True, False], [True, True]])  # tie a[1]/a[3]: a[1]
  np.testing.assert_array_equal(masks["b"]["kernel"], [[True, True, False]])
  dense = pruning.magnitude_masks(_toy_params(), 0.0)
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(dense))


def test_exact_sparsity_on_random_kernels_both_scopes():
  rng = np.random.default_rng(0)
  params = {"conv2d": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)},
            "conv3d": {"kernel": jnp.asarray(rng.standard_normal((1, 3, 3, 5, 6)), jnp.float32)},
            "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 7)), jnp.float32)}}
  n = {k: v["kernel"].size for k, v in params.items()}  # 180, 270, 42
  pruned = lambda m: {k: int(np.sum(~np.asarray(v["kernel"]))) for k, v in m.items()}
  assert sum(pruned(pruning.magnitude_masks(params, 0.37)).values()) == round(0.37 * sum(n.values()))  # 182
  assert pruned(pruning.magnitude_masks(params, 0.37, scope="layer")) == {k: round(0.37 * v) for k, v in n.items()}
  # Global: one threshold, so every kept weight outweighs every pruned one.
  masks = pruning.magnitude_masks(params, 0.6)
  kept = np.concatenate([np.abs(params[k]["kernel"])[np.asarray(masks[k]["kernel"])] for k in params])
  gone = np.concatenate([np.abs(params[k]["kernel"])[~np.asarray(masks[k]["kernel"])] for k in params])
  assert kept.min() > gone.max()
  # Traced sparsity (as inside the train step) gives the same masks.
  traced = jax.jit(lambda p, s: pruning.magnitude_masks(p, s))(params, jnp.float32(0.6))
  jax.tree.map(np.testing.assert_array_equal, traced, masks)


def test_previous_masks_only_shrink_and_exclude_patterns():
  params = _toy_params()
  previous = pruning.magnitude_masks(params, 0.0)
  previous["b"]["kernel"] = jnp.array([[True, False, True]])  # the largest weight (5) was pruned earlier
  masks = pruning.magnitude_masks(params, 2 / 7, masks=previous)  # k = 2: b[1] first, then b[2] (0.5)
  np.testing.assert_array_equal(masks["b"]["kernel"], [[True, False, False]])
  assert bool(jnp.all(masks["a"]["kernel"]))
  masks = pruning.magnitude_masks(params, 0.5, exclude=("b",))  # only a's 4 weights: k = 2
  np.testing.assert_array_equal(masks["a"]["kernel"], [[True, False], [True, False]])
  assert masks["b"]["kernel"].shape == ()
  assert pruning.prunable_paths(params, exclude="a") == ("b/kernel",)
  with pytest.raises(ValueError, match=r"config.pruning.exclude: pattern 'haed' matches no parameter. "
                                       r"Parameters: a/bias, a/kernel, b/bias, b/kernel, norm/scale."):
    pruning.magnitude_masks(params, 0.5, exclude=("haed",))
  with pytest.raises(ValueError, match=r"config.pruning.exclude: no prunable parameter is left"):
    pruning.magnitude_masks(params, 0.5, exclude=("a", "b"))


# ------------------------------------------------------------------------------------------------ optax

class _Tiny(nn.Module):
  """Conv (2D or 3D by the input rank) -> Dense head, with biases: the kernels are prunable."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3,) * (x.ndim - 2), name="conv")(x))
    return nn.Dense(3, name="head")(x.mean(axis=tuple(range(1, x.ndim - 1))))


def _setup(spatial, pruning_options, total_steps, seed=0):
  model, rng = _Tiny(), np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, *spatial, 2)), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]  # drawn with NumPy: no RNG compile
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32), shapes)
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.1))
  tx = pruning.wrap_optimizer(inner, pruning_options, total_steps)

  @jax.jit
  def step(params, opt_state, t):
    g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x * (1.0 + t)) ** 2))(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return params, tx, step


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)])
def test_adamw_steps_keep_masked_weights_exactly_zero(spatial):
  options = dict(target=0.75, initial=0.1, begin_step=2, end_step=10, frequency=3)
  params, tx, step = _setup(spatial, options, total_steps=12)
  opt_state = tx.init(params)
  n = params["conv"]["kernel"].size + params["head"]["kernel"].size
  schedule = lambda t: pruning.polynomial_sparsity(t, target=0.75, begin_step=2, end_step=10, initial=0.1)
  previous, pruned_counts = pruning.find_state(opt_state).masks, []
  for t in range(1, 13):
    params, opt_state = step(params, opt_state, float(t))
    state = pruning.find_state(opt_state)
    assert int(state.count) == t
    for name in ("conv", "head"):
      mask, value = np.asarray(state.masks[name]["kernel"]), np.asarray(params[name]["kernel"])
      assert np.all(value[~mask] == 0.0), (t, name)
      assert not np.any(mask & ~np.asarray(previous[name]["kernel"])), "a pruned weight came back"
    previous = state.masks
    pruned_counts.append(sum(int(np.sum(~np.asarray(state.masks[k]["kernel"]))) for k in ("conv", "head")))
  # Mask steps t = 2, 5, 8 (every 3 from begin) and 10 (end_step); constant in between and after.
  expected, count = [], 0
  for t in range(1, 13):
    if t in (2, 5, 8, 10):
      count = round(schedule(t) * n)
    expected.append(count)
  assert pruned_counts == expected
  assert pruned_counts[-1] == round(0.75 * n) and len(set(expected)) == 5
  assert pruning.sparsity_report(params)[-2] == dict(name="prunable", shape=[], params=n, zeros=round(0.75 * n),
                                                     sparsity=round(0.75 * n) / n)
  assert pruning.find_state(opt_state).masks["conv"]["bias"].shape == ()


def test_kept_weights_get_the_inner_update_and_initial_masks_apply_at_step_one():
  options = dict(target=0.5, initial=0.5, begin_step=0, end_step=4, frequency=10)
  params, tx, _ = _setup((5, 7), options, total_steps=4)
  state = tx.init(params)  # begin_step 0 with initial 0.5: the masks of step 0 are already sparse
  masks = pruning.find_state(state).masks
  n = params["conv"]["kernel"].size + params["head"]["kernel"].size
  assert sum(int(np.sum(~np.asarray(masks[k]["kernel"]))) for k in ("conv", "head")) == round(0.5 * n)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, state, params)
  ref, _ = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.1)).update(
      grads, state[0], params)
  new = optax.apply_updates(params, updates)
  for name in ("conv", "head"):
    mask = np.asarray(masks[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(updates[name]["kernel"])[mask], np.asarray(ref[name]["kernel"])[mask])
    np.testing.assert_array_equal(np.asarray(new[name]["kernel"])[~mask], 0.0)
    np.testing.assert_array_equal(updates[name]["bias"], ref[name]["bias"])


def test_masks_survive_orbax_round_trip_and_resume_bit_for_bit(tmp_path):
  options = dict(target=0.6, begin_step=1, end_step=6, frequency=2)
  params0, tx, step = _setup((5, 7), options, total_steps=8)
  start = lambda: TrainState.create(variables={"params": params0}, tx=tx, rng=jax.random.key_data(
      jax.random.key(0)), use_ema=False)
  advance = lambda state, t: state.replace(step=state.step + 1, **dict(zip(
      ("params", "opt_state"), step(state.params, state.opt_state, float(t)))))
  straight = start()
  for t in range(1, 9):
    straight = advance(straight, t)

  resumed = start()
  for t in range(1, 5):
    resumed = advance(resumed, t)
  with ckpt_lib.Checkpointer(tmp_path / "c", save_interval_steps=1, max_to_keep=1, async_save=False) as c:
    c.save(4, resumed)
    sharding = SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            jax.eval_shape(start))  # what a restarted run builds before restoring
    restored = c.restore(abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, resumed)
  masks = pruning.find_state(restored.opt_state).masks
  assert masks["conv"]["kernel"].dtype == jnp.bool_ and not bool(jnp.all(masks["conv"]["kernel"]))
  for t in range(5, 9):
    restored = advance(restored, t)
  jax.tree.map(np.testing.assert_array_equal, restored, straight)  # params, Adam moments, masks, count
  assert int(pruning.find_state(straight.opt_state).count) == 8


# ------------------------------------------------------------------------------------------------ report

def test_sparsity_report_rows_and_markdown():
  params = {"conv": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.zeros(2)},
            "head": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
  rows = pruning.sparsity_report(params)
  assert rows == [dict(name="conv/bias", shape=[2], params=2, zeros=2, sparsity=1.0),
                  dict(name="conv/kernel", shape=[2, 2], params=4, zeros=3, sparsity=0.75),
                  dict(name="head/kernel", shape=[2, 3], params=6, zeros=1, sparsity=1 / 6),
                  dict(name="prunable", shape=[], params=10, zeros=4, sparsity=0.4),
                  dict(name="total", shape=[], params=12, zeros=6, sparsity=0.5)]
  assert pruning.sparsity_report(params, exclude=("head",))[-2] == dict(name="prunable", shape=[], params=4,
                                                                         zeros=3, sparsity=0.75)
  table = pruning.format_report(rows).splitlines()
  assert table[0] == "| parameter | shape | params | zeros | sparsity |"
  assert table[3] == "| conv/kernel | 2x2 | 4 | 3 | 75.0% |"
  assert table[-2:] == ["| **prunable** | - | 10 | 4 | 40.0% |", "| **total** | - | 12 | 6 | 50.0% |"]


# ------------------------------------------------------------------------------------------------ options

def test_parse_defaults_and_idempotence():
  options = pruning.parse({"target": 0.9, "exclude": "head"})
  assert options == dict(pruning.DEFAULTS, target=0.9, exclude=("head",))
  assert pruning.parse(options) == options


@pytest.mark.parametrize("given, message", [
    (dict(targt=0.5), "config.pruning: unknown key 'targt'. Did you mean 'target'? Known keys: method, scope, "),
    (dict(method="l1"), "config.pruning.method must be one of ('magnitude',), got 'l1'"),
    (dict(scope="local"), "config.pruning.scope must be one of ('global', 'layer'), got 'local'."),
    (dict(target=1.0), "config.pruning.target must lie in [0, 1), got 1.0."),
    (dict(target="0.8"), "config.pruning.target must be a finite number, got '0.8'."),
    (dict(target=0.5, initial=0.6), "config.pruning.initial must lie in [0, target=0.5], got 0.6."),
    (dict(frequency=0), "config.pruning.frequency must be an integer >= 1, got 0."),
    (dict(begin_step=5, end_step=3), "config.pruning.end_step must be an integer >= 5, got 3."),
    (dict(power=0), "config.pruning.power must be > 0, got 0.0."),
    (dict(exclude=("head", "")), "config.pruning.exclude must be a non-empty pattern string or a sequence"),
])
def test_option_errors_name_the_key(given, message):
  with pytest.raises(ValueError) as error:
    pruning.parse(given)
  assert message in str(error.value)


def test_wrap_optimizer_checks_the_schedule_against_total_steps():
  with pytest.raises(ValueError, match=r"config.pruning.end_step=20 exceeds config.total_steps=10."):
    pruning.wrap_optimizer(optax.sgd(0.1), dict(end_step=20), 10)
  with pytest.raises(ValueError, match=r"config.pruning.begin_step=11 exceeds end_step=10 \(config.total_steps=10\)"):
    pruning.wrap_optimizer(optax.sgd(0.1), dict(begin_step=11), 10)
  one_shot = pruning.wrap_optimizer(optax.sgd(0.1), dict(target=0.5, begin_step=0, end_step=0), 10)
  masks = pruning.find_state(one_shot.init(_toy_params())).masks  # pruned to the target at step 0
  np.testing.assert_array_equal(masks["a"]["kernel"], [[True, False], [True, False]])
  tx = pruning.wrap_optimizer(optax.sgd(0.1), dict(target=0.5), 10)
  state = tx.init(_toy_params())
  assert isinstance(state[1], pruning.PruneState) and pruning.find_state(state) is state[1]
  assert pruning.find_state(optax.sgd(0.1).init(_toy_params())) is None
