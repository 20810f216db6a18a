"""benchmarks/dp_speed.py: the torch peer has medjax's parameter count, and the quick mode times the medjax
non-private and DP-SGD steps (and torch / Opacus where installed) into one table (no speed is asserted)."""

import jax
import numpy as np
import pytest

from benchmarks import dp_speed


def _medjax_params(width):
  from medjax import build

  config = dp_speed.make_config(0, quick=False)
  config.model.width = width
  model = build.model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32),
                                             train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("width", [8, 64])
def test_torch_resnet18_has_medjax_parameter_count(width):
  pytest.importorskip("torchvision")
  torch_params = sum(p.numel() for p in dp_speed.torch_resnet18(width).parameters())
  assert torch_params == _medjax_params(width)


@pytest.mark.slow
def test_quick_table():
  torch_missing = dp_speed.torch_available()
  out = dp_speed.main(["--quick", "--warmup", "0", "--repeats", "1", "--skip_vmap", "--torch_threads", "1"])
  results, rows, headline = out["results"], out["rows"], out["headline"]
  expected = {"medjax", "medjax_dp"} | (set() if torch_missing else {"torch", "opacus"})
  assert set(results) == expected
  assert rows[0] == dp_speed.HEADER and len(rows) == 1 + len(expected)
  assert results["medjax"]["expected"] == results["medjax"]["slots"] == 8
  dp = results["medjax_dp"]
  assert dp["norms"] == "ghost" and dp["expected"] == 8 < dp["slots"]
  assert dp["noise_multiplier"] > 0
  assert headline["dp_over_non_private"] > 0
  assert ("dp_over_opacus" in headline) == (not torch_missing)
  if not torch_missing:
    assert results["torch"]["params"] == results["opacus"]["params"] == dp["params"]
