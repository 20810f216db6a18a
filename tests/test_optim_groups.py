"""Tests for medjax.optim parameter groups: freezing, linear probing, lr multipliers and layer-wise lr decay."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from medjax import build, checkpoint, optim, param_paths, train
from tests.test_train import _config as _train_config
from tests.test_train import _final_state
from tests.train_testing import run_straight_and_resumed

LAYERS = ("stem", "layer1", "layer2", "head")


def _params():
  """A ResNet-like tree: 2-D kernels (decayed) and 1-D biases / norm scales (not decayed)."""
  ones = lambda *s: jnp.ones(s, jnp.float32)
  return {"stem": {"conv": {"kernel": ones(3, 3, 1, 2)}, "norm": {"scale": ones(2), "bias": ones(2)}},
          "layer1": {"block0": {"kernel": ones(2, 2), "bias": ones(2)}},
          "layer2": {"block0": {"kernel": ones(2, 2), "bias": ones(2)}},
          "head": {"kernel": ones(2, 3), "bias": ones(3)}}


def _config(lr=0.5, name="sgd", **optim_keys):
  c = mlc.ConfigDict()
  c.optim = dict(name=name, **optim_keys)
  c.lr = lr
  c.total_steps = 10
  c.grad_clip_norm = None
  return c


def _paths(tree):
  return {param_paths.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _step_sizes(config, steps=1):
  """{path: -update / grad} of plain SGD after `steps` updates with gradient 1 everywhere."""
  tx, _ = optim.make_optimizer(config)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = jax.jit(tx.update)(grads, state, params)
  return {k: np.asarray(-u) for k, u in _paths(updates).items()}


def _assert_rates(got, expected):
  assert set(got) == set(expected)
  for path, rate in expected.items():
    np.testing.assert_allclose(got[path], np.full_like(got[path], rate), rtol=1e-6, err_msg=path)


# ------------------------------------------------------------------------------------------ step sizes


def test_freeze_gives_zero_updates_and_no_state():
  got = _step_sizes(_config(freeze=("stem", "layer1/*")))
  _assert_rates(got, {p: 0.0 if p.startswith(("stem/", "layer1/")) else 0.5 for p in _paths(_params())})
  # Adam keeps moments for the trainable leaves only.
  tx, _ = optim.make_optimizer(_config(name="adam", freeze=("stem",)))
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  plain, _ = optim.make_optimizer(_config(name="adam"))
  trainable = {k: v for k, v in _params().items() if k != "stem"}
  assert size(tx.init(_params())) == size(plain.init(trainable))  # mu, nu and the step counters


def test_train_only_is_linear_probing():
  got = _step_sizes(_config(train_only=("head",)))
  _assert_rates(got, {p: 0.5 if p.startswith("head/") else 0.0 for p in _paths(_params())})


def test_frozen_params_get_no_weight_decay_and_do_not_count_in_the_clip_norm():
  # adamw with zero gradients: only the decoupled decay moves kernels, and not the frozen one.
  tx, _ = optim.make_optimizer(_config(name="adamw", wd=0.5, freeze=("stem",)))
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat = _paths(updates)
  assert not np.any(flat["stem/conv/kernel"]) and np.all(flat["layer1/block0/kernel"] == -0.5 * 0.5)
  # A huge frozen gradient must not shrink the trainable ones through the global-norm clip.
  config = _config(lr=1.0, freeze=("stem",))
  config.grad_clip_norm = 1.0
  tx, _ = optim.make_optimizer(config)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["stem"]["conv"]["kernel"] = jnp.full((3, 3, 1, 2), 1e6)
  grads["head"]["bias"] = jnp.array([0.1, 0.0, 0.0])
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["bias"], [-0.1, 0.0, 0.0], rtol=1e-6)
  assert not np.any(updates["stem"]["conv"]["kernel"])


def test_lr_multipliers_first_pair_wins_and_mapping_is_unordered():
  pairs = (("layer1/block0/bias", 3.0), ("layer1", 0.1), ("layer*", 0.2))
  got = _step_sizes(_config(lr_multipliers=pairs))
  expected = dict.fromkeys(_paths(_params()), 0.5)
  expected |= {"layer1/block0/bias": 1.5, "layer1/block0/kernel": 0.05, "layer2/block0/bias": 0.1,
               "layer2/block0/kernel": 0.1}
  _assert_rates(got, expected)
  # Same result from a mapping without overlaps (ConfigDict sorts the keys, so order cannot carry meaning).
  got = _step_sizes(_config(lr_multipliers={"layer2": 0.2, "layer1": 0.1}))
  _assert_rates(got, {p: {"layer1": 0.05, "layer2": 0.1}.get(p.split("/")[0], 0.5) for p in _paths(_params())})
  with pytest.raises(ValueError, match=r"config\.optim\.lr_multipliers: parameter 'layer1/block0/bias' is "
                                       r"matched by patterns \['layer\*', 'layer1'\] with different multipliers"):
    _step_sizes(_config(lr_multipliers={"layer1": 0.1, "layer*": 0.2}))


def test_layer_decay_rates_follow_the_documented_rule():
  decay, n = 0.75, len(LAYERS)
  got = _step_sizes(_config(layer_decay=decay, layer_groups=LAYERS), steps=3)
  expected = {p: 0.5 * decay ** (n - 1 - LAYERS.index(p.split("/")[0])) for p in _paths(_params())}
  assert expected["head/bias"] == 0.5 and expected["stem/norm/scale"] == 0.5 * 0.75 ** 3
  _assert_rates(got, expected)
  # Groups are patterns: "layer*" puts both layers in one group (n = 3: stem d^2, layers d, head 1).
  got = _step_sizes(_config(layer_decay=decay, layer_groups=("stem", "layer*", "head")))
  _assert_rates(got, {p: 0.5 * decay ** {"stem": 2, "layer1": 1, "layer2": 1, "head": 0}[p.split("/")[0]]
                      for p in _paths(_params())})


def test_everything_composes_with_schedule_and_momentum():
  # multiplier * layer factor * schedule(step); frozen overrides; momentum state per group.
  config = _config(lr=1.0, freeze=("stem",), lr_multipliers=(("layer1", 0.1),), layer_decay=0.5,
                   layer_groups=LAYERS)
  config.schedule = dict(decay="step", boundaries=(2,), factor=0.5)
  config.total_steps = 4
  tx, schedule = optim.make_optimizer(config)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  factors = {"stem": 0.0, "layer1": 0.1 * 0.25, "layer2": 0.5, "head": 1.0}
  for step in range(4):
    updates, state = tx.update(grads, state, params)
    _assert_rates({k: -v for k, v in _paths(updates).items()},
                  {p: float(schedule(step)) * factors[p.split("/")[0]] for p in _paths(params)})


# ------------------------------------------------------------------------------------------ end to end


def _init_params(config):
  """The params train.main starts from (same init function and key)."""
  init = build.init_state_fn(build.model(config), optax.identity(), np.zeros((16, 16, 1), np.float32), False)
  return jax.jit(init)(jax.random.PRNGKey(config.seed)).params


def test_train_main_frozen_params_are_bit_identical_after_10_steps(tmp_path):
  config = _train_config(total_steps=10, checkpoint_every_steps=5, eval_every_steps=10, grad_clip_norm=1.0,
                         ema_decay=0.9, grad_accum_steps=2)
  config.optim.freeze = ("enc0",)
  assert train.main(config, str(tmp_path))["step"] == 10
  start, final = _paths(_init_params(config)), _paths(_final_state(str(tmp_path))["params"])
  assert set(start) == set(final)
  for path, value in final.items():
    if path.startswith("enc0/"):
      chex.assert_trees_all_equal(value, start[path])  # bitwise
    elif path.endswith("kernel"):
      assert not np.array_equal(value, start[path]), path
  # The EMA of a frozen parameter stays bit-identical too (steps.train_step's average form).
  ckpt = checkpoint.Checkpointer(os.path.join(str(tmp_path), "checkpoints"), save_interval_steps=1, max_to_keep=10,
                                 read_only=True)
  ema = _paths(ckpt.restore_fields(("ema_params",))["ema_params"])
  for path, value in ema.items():
    if path.startswith("enc0/"):
      chex.assert_trees_all_equal(value, start[path])


def test_train_main_linear_probing_resumes_bit_exact(tmp_path, monkeypatch):
  config = _train_config(total_steps=6, checkpoint_every_steps=3, eval_every_steps=3)
  head = [p for p in _paths(_init_params(config)) if p.split("/")[0] not in ("enc0", "enc1", "dec0")]
  assert head, "the synthetic U-Net's output layer name changed"
  config.optim.train_only = tuple(sorted({p.rsplit("/", 1)[0] for p in head}))
  config.optim.lr_multipliers = {"*bias": 2.0}
  straight, resumed = map(_final_state, run_straight_and_resumed(config, tmp_path, monkeypatch, at_step=3))
  chex.assert_trees_all_equal(resumed["params"], straight["params"])  # bitwise
  chex.assert_trees_all_equal(resumed["opt_state"], straight["opt_state"])
  start = _paths(_init_params(config))
  for path, value in _paths(straight["params"]).items():
    assert np.array_equal(value, start[path]) == (path not in head), path


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("optim_keys, pattern", [
    (dict(freeze=("stem", "backbone/*")), r"config\.optim\.freeze: pattern 'backbone/\*' matches no parameter\. "
                                          r"Parameters: head/bias, head/kernel, layer1/block0/bias"),
    (dict(train_only=("haed",)), r"config\.optim\.train_only: pattern 'haed' matches no parameter"),
    (dict(lr_multipliers={"body": 0.1}), r"config\.optim\.lr_multipliers: pattern 'body' matches no parameter"),
    (dict(layer_decay=0.5, layer_groups=("stem", "layer1", "head")),
     r"config\.optim\.layer_groups: parameter 'layer2/block0/bias' is in no layer group"),
    (dict(layer_decay=0.5, layer_groups=("stem", "layer1", "layer1/block0", "layer2", "head")),
     r"config\.optim\.layer_groups: parameter 'layer1/block0/bias' is in several layer groups"),
])
def test_pattern_errors_at_init_name_key_and_pattern(optim_keys, pattern):
  tx, _ = optim.make_optimizer(_config(**optim_keys))  # patterns need the params tree: checked at init
  with pytest.raises(ValueError, match=pattern):
    tx.init(_params())


def test_frozen_params_need_no_layer_group():
  got = _step_sizes(_config(freeze=("stem",), layer_decay=0.5, layer_groups=("layer1", "layer2", "head")))
  _assert_rates(got, {p: {"stem": 0.0, "layer1": 0.125, "layer2": 0.25}.get(p.split("/")[0], 0.5)
                      for p in _paths(_params())})


@pytest.mark.parametrize("optim_keys, exc, pattern", [
    (dict(freeze=("stem",), train_only=("head",)), ValueError,
     r"config\.optim\.freeze=\('stem',\) and config\.optim\.train_only=\('head',\) are mutually exclusive"),
    (dict(freez=("stem",)), ValueError, r"config\.optim: unknown key 'freez'.*Did you mean 'freeze'\?"),
    (dict(layer_decy=0.5), ValueError, r"unknown key 'layer_decy'.*Did you mean 'layer_decay'\?"),
    (dict(freeze=("stem", 3)), ValueError, r"config\.optim\.freeze must be a non-empty pattern string"),
    (dict(lr_multipliers={"head": -1.0}), ValueError, r"config\.optim\.lr_multipliers\['head'\] must be a number"),
    (dict(lr_multipliers=("head", 0.1)), ValueError, r"config\.optim\.lr_multipliers must be a \{pattern"),
    (dict(layer_decay=0.5), ValueError, r"layer_decay and config\.optim\.layer_groups must be given together"),
    (dict(layer_groups=LAYERS), ValueError, r"layer_decay and config\.optim\.layer_groups must be given together"),
    (dict(layer_decay=0.0, layer_groups=LAYERS), ValueError, r"config\.optim\.layer_decay must be > 0"),
])
def test_bad_group_config_raises_in_validation(optim_keys, exc, pattern):
  with pytest.raises(exc, match=pattern):
    optim.validate_optim_config(_config(**optim_keys))


def test_no_group_keys_keep_the_plain_state_layout():
  plain, _ = optim.make_optimizer(_config())
  empty, _ = optim.make_optimizer(_config(freeze=(), lr_multipliers={}))
  assert jax.tree.structure(plain.init(_params())) == jax.tree.structure(empty.init(_params()))
