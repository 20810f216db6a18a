"""DP-SGD in the one training loop: epsilon reported and reached, Poisson batches, bit-exact resume, and the
configurations it refuses."""

import json
import os

import numpy as np
import pytest

from medjax import build, config_lib, train
from medjax.data import sampling
from medjax.privacy import options
from tests.train_testing import run_straight_and_resumed

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_dp.py")


def _config(**privacy):
  config = config_lib.load_config(EXPERIMENT + ":quick=true")
  config.mesh = (("data", 1),)
  config.privacy.update(privacy)
  return config


def test_poisson_batches_are_deterministic_padded_and_distinct():
  draws = [sampling.poisson_batch(0, step, 1000, 0.05, 90) for step in range(200)]
  indices, valid, drawn = draws[3]
  again = sampling.poisson_batch(0, 3, 1000, 0.05, 90)
  np.testing.assert_array_equal(indices, again[0])
  k = int(valid.sum())
  assert k == drawn and len(set(indices[:k].tolist())) == k and valid[k:].sum() == 0
  sizes = np.asarray([d[2] for d in draws])
  assert sizes.mean() == pytest.approx(50, abs=2.5) and sizes.std() == pytest.approx(np.sqrt(1000 * .05 * .95), rel=.2)
  # every example is equally likely to be sampled
  counts = np.bincount(np.concatenate([d[0][d[1] > 0] for d in draws]), minlength=1000)
  assert counts.mean() == pytest.approx(10, rel=0.05)
  # buckets pad to the next multiple of the bucket (at most the largest size) and draw the same examples
  for step, (indices, _, drawn) in enumerate(draws[:40]):
    b_indices, b_valid, b_drawn = sampling.poisson_batch(0, step, 1000, 0.05, 90, bucket=8)
    assert b_drawn == drawn and len(b_valid) == min(-(-max(drawn, 1) // 8) * 8, 90)
    assert len(b_valid) % 8 == 0 and 0 <= len(b_valid) - drawn < 8
    np.testing.assert_array_equal(b_indices[:drawn], indices[:drawn])
    assert b_valid[:drawn].sum() == drawn and b_valid[drawn:].sum() == 0
  np.testing.assert_array_equal(sampling.bucketed_size(np.array([0, 1, 8, 9, 95]), 8, 90), [8, 8, 8, 16, 90])


def test_dp_run_reports_epsilon_and_resumes_bit_for_bit(tmp_path, monkeypatch):
  config = _config()
  straight, resumed = run_straight_and_resumed(config, tmp_path, monkeypatch, at_step=2)
  results = json.load(open(os.path.join(straight, "results.json")))
  privacy = results["privacy"]
  assert privacy["epsilon"] <= 8.0 and privacy["epsilon"] == pytest.approx(8.0, rel=1e-3)
  assert privacy["per_example_norms_method"] == "ghost" and privacy["sampling"] == "poisson"
  assert privacy["delta"] == pytest.approx(1 / 64) and privacy["sample_rate"] == pytest.approx(16 / 64)
  assert privacy["physical_batch_size"] > 16
  logged = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  eps = [m["privacy/epsilon"] for m in logged if "privacy/epsilon" in m]
  assert eps == sorted(eps) and eps[-1] == pytest.approx(privacy["epsilon"])
  a = json.load(open(os.path.join(straight, "results.json")))["final"]
  b = json.load(open(os.path.join(resumed, "results.json")))["final"]
  assert a == b


def test_batchnorm_and_unreachable_targets_are_refused_naming_the_key(tmp_path):
  config = _config()
  config.model.norm = "batch"
  with pytest.raises(config_lib.ConfigError, match="BatchNorm .* config.model.norm='group'"):
    build.validate(config)
  config = _config(target_epsilon=1e-6, delta=1e-5)
  config.total_steps, config.input.batch_size = 400, 64  # every example in every step (q = 1)
  with pytest.raises(ValueError, match=r"config.privacy.target_epsilon: epsilon = 1e-06 .* cannot be met"):
    train.main(config, str(tmp_path / "w"))
  config = _config(noise_multiplier=1.0)
  with pytest.raises(config_lib.ConfigError, match="exactly one of noise_multiplier"):
    build.validate(config)
  config = _config(clip=1.0)
  with pytest.raises(config_lib.ConfigError, match="unknown key 'clip'. Did you mean 'clip_norm'"):
    build.validate(config)
  config = _config(clip_norm=float("inf"))
  with pytest.raises(config_lib.ConfigError, match="clip_norm is inf"):
    build.validate(config)
  config = _config()
  config.grad_accum_steps = 2
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps"):
    build.validate(config)


def test_plan_pads_poisson_batches_so_truncation_is_negligible():
  plan = options.plan(options.parse(dict(target_epsilon=8.0)), num_examples=4708, batch_size=128, total_steps=370,
                      batch_multiple=8)
  assert plan.physical_batch_size % 8 == 0 and 128 < plan.physical_batch_size <= 200  # 6 sd above 128
  assert plan.delta == pytest.approx(1 / 4708) and plan.steps_per_epoch == 37
  assert plan.epsilon(370) <= 8.0
  # buckets of about one standard deviation (sqrt(128 * (1 - q)) = 11), rounded up to the data-parallel width
  assert plan.batch_bucket == 16 and plan.poisson() == (128 / 4708, plan.physical_batch_size, 16)
  assert 128 < plan.expected_slots() < 128 + 16  # the mean padding is under one bucket, not 5 sd
  unbucketed = options.plan(options.parse(dict(target_epsilon=8.0, batch_bucket=0)), num_examples=4708,
                            batch_size=128, total_steps=370, batch_multiple=8)
  assert unbucketed.batch_bucket == plan.physical_batch_size
  assert unbucketed.expected_slots() == pytest.approx(plan.physical_batch_size)
  assert unbucketed.noise_multiplier == plan.noise_multiplier  # the guarantee does not depend on the padding
  shuffled = options.plan(options.parse(dict(noise_multiplier=1.0, sampling="shuffle")), num_examples=4708,
                          batch_size=128, total_steps=10)
  assert shuffled.poisson() is None and shuffled.physical_batch_size == 128
