"""train.main with patches cut from larger cases, on the host and on device, and with a plan."""

import os

import numpy as np
import pytest

from medjax import build, config_lib, metric_writer, train
from medjax.tools import plan as plan_tool

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_unet.py")


def _config(arg):
  config = config_lib.load_config(f"{EXPERIMENT}:dims=2,quick=true,{arg}")
  config.mesh = (("data", 2),)
  config.data.num_train = 6
  config.checkpoint.async_save = False
  return config


def test_patch_training_runs_and_host_and_device_crops_agree(tmp_path):
  losses = {}
  for device_crop in (False, True):
    config = _config(f"patch=8,device_crop={str(device_crop).lower()}")
    assert config.input.patch_size == (8, 8) and config.data.image_size == 16
    workdir = str(tmp_path / str(device_crop))
    result = train.main(config, workdir)
    assert result["step"] == 4 and 0.0 <= result["val/dice_mean"] <= 1.0
    losses[device_crop] = [r["train/loss"] for r in metric_writer.read_metrics(workdir) if "train/loss" in r]
  # Device crops follow the host path's draws: the same patches, so the same losses.
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_plan_feeds_patch_and_topology(tmp_path):
  out = tmp_path / "plan"
  plan_tool.main(["plan", "--dataset", "synthetic_phantoms", "--kwargs",
                 "spatial_dims=2,image_size=24,num_train=4,num_val=2,num_test=2", "--out", str(out),
                 "--batch_size", "2"])
  planned = config_lib.read_plan(str(out / "plan.json"))
  config = _config(f"plan={out / 'plan.json'}")
  assert config.input.patch_size == tuple(planned["patch_size"])
  assert config.model.strides == tuple(tuple(s) for s in planned["strides"])
  assert len(config.model.features) == len(planned["features"])
  build.validate(config)


def test_missing_plan_names_the_file(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="nope.json' not found"):
    _config(f"plan={tmp_path / 'nope.json'}")
