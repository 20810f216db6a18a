"""Tests for medjax.data.plan: fingerprint statistics, planning rules, JSON round trip (the CLI: tests/tools/test_plan.py)."""

import math

import numpy as np
import pytest

from medjax.data import plan as planlib


def _fp(spacings, shapes):
  """A minimal fingerprint for plan(): only spacings and shapes matter."""
  return {"spacings": [list(s) for s in spacings], "shapes": [list(s) for s in shapes]}


def test_fingerprint_statistics_on_foreground():
  image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
  label = np.array([[[0, 1], [1, 0]], [[2, 0], [0, 0]]], np.int32)
  image2 = np.full((2, 2, 2), 100.0, np.float32)
  label2 = np.zeros((2, 2, 2), np.int32)
  label2[0, 0, 0] = 1
  fp = planlib.fingerprint([(image, label, (1.0, 1.0, 1.0)), (image2, label2, (3.0, 1.0, 0.5))])
  fg = np.array([1.0, 2.0, 4.0, 100.0])  # label > 0 voxels of both cases
  stats = fp["intensity"][0]
  assert stats["num_samples"] == 4
  assert stats["mean"] == pytest.approx(fg.mean())
  assert stats["std"] == pytest.approx(fg.std())
  assert stats["p005"] == pytest.approx(np.percentile(fg, 0.5))
  assert stats["p995"] == pytest.approx(np.percentile(fg, 99.5))
  assert fp["class_voxels"] == {"0": 12, "1": 3, "2": 1}
  assert fp["class_frequencies"]["1"] == pytest.approx(3 / 16)
  assert fp["median_spacing_mm"] == [2.0, 1.0, 0.75]
  assert fp["shapes"] == [[2, 2, 2], [2, 2, 2]] and fp["num_cases"] == 2 and fp["spatial_dims"] == 3


def test_fingerprint_channels_and_errors():
  image = np.stack([np.ones((4, 4)), 2 * np.ones((4, 4))], -1)
  fp = planlib.fingerprint([(image, None, (1.0, 1.0))])  # no label: all voxels count
  assert fp["num_channels"] == 2 and [c["mean"] for c in fp["intensity"]] == [1.0, 2.0]
  with pytest.raises(ValueError, match="case 0"):
    planlib.fingerprint([(np.zeros((4, 4)), np.zeros((3, 4)), (1.0, 1.0))])
  with pytest.raises(ValueError, match="no cases"):
    planlib.fingerprint([])


def test_isotropic_plan():
  p = planlib.plan(_fp([(1.0, 1.0, 1.0)] * 3, [(40, 40, 40)] * 3), memory_budget_voxels=48**3)
  assert p["thick_axis"] is None and p["target_spacing_mm"] == [1.0, 1.0, 1.0]
  assert all(s == [2, 2, 2] for s in p["strides"])
  assert all(k == [3, 3, 3] for k in p["kernel_size"])
  assert len(p["features"]) == len(p["strides"]) + 1 == len(p["kernel_size"])
  assert p["features"][0] == 32 and all(f <= 320 for f in p["features"])
  total = [math.prod(s[a] for s in p["strides"]) for a in range(3)]
  assert all(n % t == 0 for n, t in zip(p["patch_size"], total))
  assert math.prod(p["patch_size"]) <= 48**3


def test_anisotropic_plan_and_thick_axis_target():
  spacings = [(5.0, 0.8, 0.8)] * 8 + [(2.0, 0.8, 0.8), (3.0, 0.8, 0.8)]
  p = planlib.plan(_fp(spacings, [(20, 128, 128)] * 10), memory_budget_voxels=16 * 64 * 64)
  # The thick axis target is its 10th percentile, not the median (5).
  assert p["thick_axis"] == 0
  assert p["target_spacing_mm"][0] == pytest.approx(np.percentile([s[0] for s in spacings], 10))
  assert p["target_spacing_mm"][1:] == [0.8, 0.8]
  assert p["strides"][0] == [1, 2, 2] and p["kernel_size"][0] == [1, 3, 3]
  assert 2 in [s[0] for s in p["strides"]]  # the slices join in once the in-plane spacing catches up
  total = [math.prod(s[a] for s in p["strides"]) for a in range(3)]
  assert all(n % t == 0 for n, t in zip(p["patch_size"], total))
  assert math.prod(p["patch_size"]) <= 16 * 64 * 64


def test_small_budget_max_patch_and_errors():
  fp = _fp([(1.0, 1.0)] * 2, [(100, 60)] * 2)
  p = planlib.plan(fp, memory_budget_voxels=32 * 32, max_patch=48)
  total = [math.prod(s[a] for s in p["strides"]) for a in range(2)]
  assert all(n % t == 0 and n <= 48 for n, t in zip(p["patch_size"], total))
  assert math.prod(p["patch_size"]) <= 32 * 32
  p = planlib.plan(fp, memory_budget_voxels=10**6, base_features=16, max_features=64)
  assert p["features"] == [16, 32, 64, 64, 64, 64][:len(p["features"])] and len(p["features"]) <= 6
  with pytest.raises(ValueError, match="too small"):
    planlib.plan(_fp([(1.0, 1.0)], [(6, 6)]))
  with pytest.raises(ValueError, match="lacks"):
    planlib.plan({"shapes": [[4, 4]]})


def test_plan_builds_unet_at_patch_size():
  import jax
  import jax.numpy as jnp
  from medjax.models import UNet
  fp = _fp([(4.0, 1.0, 1.0)] * 2, [(12, 40, 40)] * 2)
  p = planlib.plan(fp, memory_budget_voxels=8 * 32 * 32, base_features=4, max_features=16)
  model = UNet(spatial_dims=3, num_classes=2, features=p["features"], kernel_size=p["kernel_size"],
               strides=p["strides"])
  x = jax.ShapeDtypeStruct((1, *p["patch_size"], 1), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False))
  logits, _ = jax.eval_shape(lambda v, a: model.apply(v, a, train=False), variables, x)
  assert logits.shape == (1, *p["patch_size"], 2)


def test_json_round_trip(tmp_path):
  fp = planlib.fingerprint([(np.ones((4, 8, 8)), np.ones((4, 8, 8), np.int32), (3.0, 1.0, 1.0))])
  planlib.write_fingerprint(tmp_path / "fp.json", fp)
  assert planlib.read_fingerprint(tmp_path / "fp.json") == fp
  p = planlib.plan(fp, min_feature_size=2)
  planlib.write_plan(tmp_path / "plan.json", p)
  back = planlib.read_plan(tmp_path / "plan.json")
  assert back["kernel_size"] == tuple(tuple(k) for k in p["kernel_size"])
  assert back["strides"] == tuple(tuple(s) for s in p["strides"])
  assert back["patch_size"] == p["patch_size"] and back["target_spacing_mm"] == p["target_spacing_mm"]
  assert sorted(f.name for f in tmp_path.iterdir()) == ["fp.json", "plan.json"]  # no temp files left
  with pytest.raises(FileNotFoundError, match="missing.json"):
    planlib.read_plan(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="bad.json"):
    planlib.read_fingerprint(tmp_path / "bad.json")
