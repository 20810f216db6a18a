"""config.pruning in the one training loop: the masks' zeros hold through training and a preempted resume, and
results.json / sparsity_report.md report the sparsity reached."""

import json
import os

import jax
import numpy as np
import pytest

from medjax import build, checkpoint, config_lib
from medjax.compress import pruning
from tests.train_testing import run_straight_and_resumed

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_dp.py")


def _config(**options):
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=0")
  config.mesh = (("data", 1),)
  config.pruning = dict(target=0.6, begin_step=1, frequency=1, exclude=("head",), **options)
  config.checkpoint.max_to_keep, config.checkpoint.keep_best = 3, 0
  return config


@pytest.mark.slow
def test_pruned_run_keeps_exact_zeros_through_resume_and_reports_sparsity(tmp_path, monkeypatch):
  straight, resumed = run_straight_and_resumed(_config(), tmp_path, monkeypatch, at_step=2)
  results = json.load(open(os.path.join(straight, "results.json")))
  assert results["final"] == json.load(open(os.path.join(resumed, "results.json")))["final"]
  # The best checkpoint is chosen among steps at the target sparsity (end_step = total_steps = 4) only.
  assert results["best"]["step"] == 4
  prunable = results["sparsity"]["prunable"]
  # end_step = total_steps: the target, up to the float32 sparsity inside the step (one weight in 2^23)
  assert abs(prunable["zeros"] - round(0.6 * prunable["params"])) <= max(1, prunable["params"] // 2**23)
  assert 0 < results["sparsity"]["total"]["sparsity"] < 0.6
  assert "| **prunable** | - |" in open(os.path.join(straight, "sparsity_report.md")).read()
  # A weight pruned by step 2 (saved, then the resumed run restarts from it) is still exactly zero at step 4.
  for workdir in (straight, resumed):
    ckpt = checkpoint.for_run(workdir, read_only=True)
    try:
      early, final = (ckpt.restore_fields(("params",), step=step)["params"] for step in (2, 4))
    finally:
      ckpt.close()
    chosen = set(pruning.prunable_paths(final, exclude=("head",)))
    flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    early, final = flat(early), flat(final)
    pruned_early = sum(int(np.sum(early[name] == 0)) for name in chosen)
    assert pruned_early > 0
    for name in chosen:
      assert np.all(final[name][early[name] == 0] == 0), name
  straight_params = jax.tree.leaves(checkpoint.load(straight).variables["params"])
  resumed_params = jax.tree.leaves(checkpoint.load(resumed).variables["params"])
  for a, b in zip(straight_params, resumed_params):
    np.testing.assert_array_equal(a, b)


def test_bad_pruning_configs_name_the_key():
  config = _config(targett=0.5)
  with pytest.raises(config_lib.ConfigError, match="config.pruning: unknown key 'targett'. Did you mean 'target'"):
    build.validate(config)
  config = _config()
  config.ema_decay = 0.99
  with pytest.raises(config_lib.ConfigError, match="config.pruning with config.ema_decay"):
    build.validate(config)
