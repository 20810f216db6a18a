"""End to end: train.main in tmp_path, exact resume, and the non-finite stop."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from medjax import build, checkpoint, config_lib, metric_writer, train
from medjax.data import datasets, pipeline
from medjax.data.datasets.base import Dataset
from tests.train_testing import Preempted, preempt_after_save, set_dotted

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_unet.py")


def _config(**overrides):
  config = config_lib.load_config(f"{EXPERIMENT}:dims=2,quick=true")
  config.mesh = (("data", 1),)
  config.data.num_train = 8
  config.checkpoint.async_save = True
  return set_dotted(config, **overrides)


def test_end_to_end_writes_metrics_checkpoints_and_config(tmp_path):
  result = train.main(_config(), str(tmp_path))
  assert result["step"] == 4 and 0.0 <= result["val/dice_mean"] <= 1.0
  records = metric_writer.read_metrics(str(tmp_path))
  keys = set().union(*records)
  assert {"train/loss", "train/lr", "train/grad_norm", "train/steps_per_s", "train/examples_per_s",
          "val/dice_mean", "val/dice/organ", "val/dice/lesion", "compile_s"} <= keys
  assert os.listdir(tmp_path / "tensorboard")
  assert checkpoint.load_config(str(tmp_path)).to_dict() == _config().to_dict()
  loaded = checkpoint.load(str(tmp_path))
  assert loaded.step == 4
  images = np.zeros((1, 16, 16, 1), np.float32)
  logits, _ = loaded.model.apply(loaded.variables, images, train=False)
  assert logits.shape == (1, 16, 16, 3)



def _final_state(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=10,
                                 read_only=True)
  return ckpt.restore_fields(("params", "opt_state", "step"))


def _results(workdir):
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    return json.load(f)


def test_resume_is_bitwise_exact(tmp_path, monkeypatch):
  config = _config(total_steps=6, checkpoint_every_steps=3, eval_every_steps=3)
  train.main(config, str(tmp_path / "straight"))

  original_save = preempt_after_save(monkeypatch, at_step=3)
  with pytest.raises(Preempted):
    train.main(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
  assert checkpoint.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), save_interval_steps=1,
                                 max_to_keep=10, read_only=True).latest_step() == 3
  train.main(config, str(tmp_path / "resumed"))

  straight, resumed = _final_state(str(tmp_path / "straight")), _final_state(str(tmp_path / "resumed"))
  assert int(resumed["step"]) == 6
  chex.assert_trees_all_equal(resumed["params"], straight["params"])  # bitwise
  chex.assert_trees_all_equal(resumed["opt_state"], straight["opt_state"])
  # results.json's wall time counts both sessions: the first one's time up to its checkpoint, plus the second
  results = _results(tmp_path / "resumed")
  logged = metric_writer.read_metrics(str(tmp_path / "resumed"))
  first_session = [r["wall_s"] for r in logged if "wall_s" in r and r["step"] == 3]
  assert results["resumed_from_step"] == 3 and first_session[0] > 0
  assert results["wall_s"] > first_session[0]
  assert _results(tmp_path / "straight")["resumed_from_step"] == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = _config(total_steps=6, checkpoint_every_steps=2, eval_every_steps=100, log_every_steps=100)
  config.data.num_train = 16
  bad_step = 5
  batches = pipeline.TrainBatches(range(config.data.num_train), global_batch_size=config.input.batch_size,
                                  seed=config.seed)
  poisoned = int(batches.global_indices(bad_step - 1)[0])
  earlier = np.concatenate([batches.global_indices(s) for s in range(bad_step - 1)])
  assert poisoned not in earlier  # the step that first sees the example is bad_step

  build = datasets.build_dataset

  class Poisoned:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      example = dict(self.source[i])
      if i == poisoned:
        example["image"] = np.full_like(example["image"], np.nan)
      return example

  def build_poisoned(name, kwargs):
    ds = build(name, kwargs)
    return Dataset(info=ds.info, sources={**ds.sources, "train": Poisoned(ds.sources["train"])})

  monkeypatch.setattr(datasets, "build_dataset", build_poisoned)
  with pytest.raises(train.NonFiniteLossError, match=rf"at step {bad_step} .*last good checkpoint is step 4"):
    train.main(config, str(tmp_path))
  state = _final_state(str(tmp_path))
  assert int(state["step"]) == 4
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
  config = _config()
  config.mesh = (("data", -1),)
  config.input.batch_size = 6
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the mesh's 'data' axis \(size 8"):
    train.main(config, str(tmp_path))


def test_classification_experiment_end_to_end(tmp_path):
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_resnet.py")
  config = config_lib.load_config(f"{path}:quick=true")
  config.mesh = (("data", -1),)  # 8 fake devices, batch 8
  config.model.stage_sizes = (1,)  # one residual block keeps the CPU compile short
  config.compute_dtype = "bfloat16"
  config.ema_decay = 0.9
  result = train.main(config, str(tmp_path))
  assert 0.0 <= result["val/accuracy"] <= 1.0 and 0.0 <= result["val/auc"] <= 1.0
  state = _final_state(str(tmp_path))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state["params"]))  # bf16 compute only
  loaded = checkpoint.load(str(tmp_path))
  assert "batch_stats" in loaded.variables


def test_restarting_a_finished_run_trains_nothing_and_reports(tmp_path):
  config = _config()
  first = train.main(config, str(tmp_path))
  records = len(metric_writer.read_metrics(str(tmp_path)))
  again = train.main(config, str(tmp_path))
  assert again["val/dice_mean"] == pytest.approx(first["val/dice_mean"])
  assert not any("train/loss" in r for r in metric_writer.read_metrics(str(tmp_path))[records:])


def test_training_with_on_device_augmentation(tmp_path):
  config = _config()
  config.augment = dict(flip=dict(p=0.5, axes=(0, 1)), affine=dict(p=0.5, rotate_deg=10.0, scale=(0.9, 1.1)),
                        gamma=dict(p=0.3, range=(0.8, 1.25)), noise=dict(p=0.3, std=(0.0, 0.05)))
  result = train.main(config, str(tmp_path))
  assert np.isfinite(result["val/dice_mean"])


def test_classification_with_mixup_soft_targets(tmp_path):
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic_resnet.py")
  config = config_lib.load_config(f"{path}:quick=true")
  config.mesh = (("data", 1),)
  config.model.stage_sizes = (1,)
  config.augment = dict(mixup=dict(p=1.0, alpha=0.4), num_classes=3)
  assert np.isfinite(train.main(config, str(tmp_path))["val/auc"])


def test_bad_augment_key_fails_validation():
  config = _config()
  config.augment = dict(flp=dict(p=0.5))
  with pytest.raises(config_lib.ConfigError, match=r"config\.augment: .*'flp'.*Did you mean 'flip'"):
    build.validate(config)
