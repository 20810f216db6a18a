"""train.main with patches cut from larger cases, on the host and on device, and with a plan."""

import json
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


# ------------------------------------------------------------------------------------- whole-case validation
MSD_EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "msd_unet.py")
# Cases of different sizes: some smaller than the 16^3 patch along an axis (padded), some larger (several
# windows), so whole-case validation needs one program per shape and the patch score differs from it.
CASE_SHAPES = [(12, 20, 14), (18, 11, 16), (10, 17, 19), (14, 14, 22), (20, 12, 13), (11, 19, 15)]


def _write_msd_task(root, bad_label_case=None):
  """A 6-case MSD task folder (3 classes) with the CASE_SHAPES; returns the data_dir."""
  from medjax.data import io

  task = os.path.join(root, "Task04_Hippocampus")
  for sub in ("imagesTr", "labelsTr", "imagesTs"):
    os.makedirs(os.path.join(task, sub), exist_ok=True)
  rng = np.random.default_rng(0)
  training = []
  for i, shape in enumerate(CASE_SHAPES):
    label = np.zeros(shape, np.uint8)
    z, y, x = (n // 2 for n in shape)
    label[z - 3:z + 3, y - 4:y + 4, x - 4:x + 4] = 1
    label[z - 1:z + 1, y - 2:y + 2, x - 2:x + 2] = 2
    if i == bad_label_case:
      label[0, 0, 0] = 7
    image = rng.normal(0.0, 0.3, shape).astype(np.float32) + label.astype(np.float32)
    for sub, array in (("imagesTr", image), ("labelsTr", label)):
      io.write_nifti(os.path.join(task, sub, f"c_{i}.nii.gz"), io.Volume.from_array(array, (1.0, 1.0, 1.0)))
    training.append({"image": f"./imagesTr/c_{i}.nii.gz", "label": f"./labelsTr/c_{i}.nii.gz"})
  meta = {"name": "Hippocampus", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "anterior",
          "2": "posterior"}, "numTraining": len(CASE_SHAPES), "training": training, "test": []}
  with open(os.path.join(task, "dataset.json"), "w") as f:
    json.dump(meta, f)
  return str(root)


def _msd_config(data_dir, arg=""):
  config = config_lib.load_config(f"{MSD_EXPERIMENT}:quick=true,data_dir={data_dir},num_folds=3{arg}")
  config.mesh = (("data", 2),)
  config.checkpoint.async_save = False
  config.lr = 0.05
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 6
  return config


def test_whole_case_validation_equals_evaluate(tmp_path):
  """The in-loop validation Dice of a checkpoint is `evaluate`'s Dice on the whole cases of that checkpoint;
  validation on patches is logged under its own name and scores differently."""
  from medjax.tools import evaluate

  data_dir = _write_msd_task(tmp_path / "data")
  workdir = str(tmp_path / "whole")
  result = train.main(_msd_config(data_dir), workdir)
  assert result["val/num_cases"] == 2 and 0.0 < result["val/dice_mean"] < 1.0
  report = evaluate.run(workdir, split="val", which="6", num_samples=0, surface_metrics=False)
  for key in ("dice_mean", "dice/anterior", "dice/posterior", "dice_case_mean"):
    np.testing.assert_allclose(report["metrics"][key]["value"], result[f"val/{key}"], rtol=1e-6, err_msg=key)
  assert [c["id"] for c in report["cases"]] and all(r.get("eval_s", 0) >= 0 for r in
                                                      metric_writer.read_metrics(workdir))

  patches = train.main(_msd_config(data_dir, ",validation=patches"), str(tmp_path / "patches"))
  assert "val/dice_mean" not in patches and 0.0 <= patches["val/pseudo_dice_mean"] <= 1.0
  assert patches["val/pseudo_num_cases"] == 2


def test_patch_validation_needs_the_pseudo_metric_name(tmp_path):
  config = _msd_config(str(tmp_path), ",validation=patches")
  config.best_metric = "val/dice_mean"
  with pytest.raises(config_lib.ConfigError, match="val/pseudo_dice_mean"):
    build.validate(config)
  config.best_metric, config.validation = "val/pseudo_dice_mean", "patch"
  with pytest.raises(config_lib.ConfigError, match="config.validation must be one of .*Did you mean 'patches'"):
    build.validate(config)


def test_bad_validation_label_stops_the_run_before_the_first_step(tmp_path):
  data_dir = _write_msd_task(tmp_path / "data", bad_label_case=1)
  config = _msd_config(data_dir)
  # Put the bad case c_1 in the validation split: the fold that holds it out.
  config.data.fold = next(f for f in range(3) if "c_1" in [
      c.name for c in build.dataset(_with_fold(config, f)).source("val").cases])
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"case c_1: label .*c_1\.nii\.gz holds values \[7\] outside the declared "
                                       r"classes 0..2"):
    train.main(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # refused before the first training step


def _with_fold(config, fold):
  config = config_lib.from_json(config_lib.to_json(config))
  config.data.fold = fold
  return config
