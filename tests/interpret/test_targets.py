"""interpret.targets: the per-example score a method explains."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import interpret


def test_class_scores_pick_each_examples_logit():
  logits = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.testing.assert_array_equal(interpret.scores(logits, np.array([0, 3, 1])), [0.0, 7.0, 9.0])


def test_region_scores_sum_one_class_over_the_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  mask = np.zeros((2, 4, 5), np.float32)
  mask[0, :2, :2] = 1.0
  mask[1, 3, 4] = 0.5
  got = interpret.scores(logits, interpret.RegionTarget(mask, 2))
  np.testing.assert_allclose(got, [logits[0, :2, :2, 2].sum(), 0.5 * logits[1, 3, 4, 2]], rtol=1e-6)


def test_target_errors_say_what_fits():
  with pytest.raises(ValueError, match=r"a class target needs logits \(B, K\) and target \(B,\)"):
    interpret.scores(np.zeros((2, 4, 4, 3)), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"RegionTarget.mask must have the logits' shape without classes \(2, 4, 4\)"):
    interpret.scores(np.zeros((2, 4, 4, 3)), interpret.RegionTarget(np.zeros((2, 4)), 1))
