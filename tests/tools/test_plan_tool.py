"""Tests for the plan CLI (medjax.tools.plan)."""

import json

from medjax.data import plan as planlib
from medjax.tools import plan as plan_tool


def test_cli_main(tmp_path):
  out = tmp_path / "out"
  p = plan_tool.main(["plan", "--dataset", "synthetic_phantoms",
                      "--kwargs", "spatial_dims=3,image_size=16,num_train=4", "--out", str(out)])
  fp = json.loads((out / "fingerprint.json").read_text())
  assert fp["num_cases"] == 4 and fp["spatial_dims"] == 3
  assert json.loads((out / "plan.json").read_text()) == p
  assert planlib.read_plan(out / "plan.json")["patch_size"] == p["patch_size"]
