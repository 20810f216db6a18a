"""Tests for the plan CLI (medjax.tools.plan)."""

import json

import pytest

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


def test_missing_data_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    plan_tool.main(["plan", "--dataset", "msd", "--kwargs",
                    f"data_dir='{tmp_path}/msd',task='Task04_Hippocampus',patch_size=(32,32,32)",
                    "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"medjax.tools.plan: error: dataset 'msd': task 'Task04_Hippocampus' not found in {tmp_path}/msd"), lines
  assert not (tmp_path / "out").exists()
