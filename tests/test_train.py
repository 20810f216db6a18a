"""End to end: train.main in tmp_path, exact resume, and the non-finite stop; a changed config on an existing
run, and a resume past a damaged checkpoint."""

import glob
import hashlib
import json
import os
import re
import shutil

import chex
import jax
import numpy as np
import pytest

from absl import flags

from medjax import build, checkpoint, config_lib, metric_writer, train
from medjax import main as main_lib
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


# ------------------------------------------------------------------------- the workdir is the run's record


def _short_config(**overrides):
  return _config(total_steps=4, checkpoint_every_steps=2, eval_every_steps=2, **overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies (`_copy`)."""
  workdir = tmp_path_factory.mktemp("finished")
  train.main(_short_config(), str(workdir))
  return workdir


def _copy(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  return str(workdir)


def _snapshot(path):
  """{relative file: sha256} of every file under `path`."""
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        files[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return files


def test_rerun_with_a_changed_config_is_refused_and_the_workdir_is_untouched(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  before = _snapshot(workdir)
  config_json = os.path.join(os.path.abspath(workdir), "config.json")
  with pytest.raises(config_lib.ConfigError, match="^" + re.escape(
      f"The config differs from the one this run was started with ({config_json}): lr: 0.005 -> 0.001; "
      f"total_steps: 4 -> 8. Start a fresh --workdir, or pass --allow_config_change to resume with the new "
      f"values, recorded in config_history.jsonl.") + "$"):
    train.main(_config(total_steps=8, checkpoint_every_steps=2, eval_every_steps=2, lr=1e-3), workdir)
  assert _snapshot(workdir) == before  # config.json byte-identical, checkpoints and logs untouched


def test_an_allowed_change_resumes_and_is_recorded(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  result = train.main(_config(total_steps=6, checkpoint_every_steps=2, eval_every_steps=2), workdir,
                      allow_config_change=True)
  assert result["step"] == 6 and _results(workdir)["resumed_from_step"] == 4
  (record,) = checkpoint.read_config_history(workdir)
  assert (record["step"], record["changed"]) == (4, {"total_steps": {"old": 4, "new": 6}})
  assert checkpoint.load_config(workdir).total_steps == 6
  assert checkpoint.for_run(workdir, read_only=True).all_steps() == [4, 6]


def test_the_model_cannot_change_even_when_allowed(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      f"The config changes the model of the run in {os.path.abspath(workdir)}: model.features: [4, 8] -> [8, 16]. "
      f"model_name and model.* set the parameter shapes")):
    train.main(_short_config(**{"model.features": (8, 16)}), workdir, allow_config_change=True)
  assert _snapshot(workdir) == before


def test_an_allowed_change_that_does_not_fit_the_saved_state_is_refused(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  before = _snapshot(workdir)
  config = _short_config()
  config.ema_decay = 0.9  # adds EMA weights to the training state
  with pytest.raises(config_lib.ConfigError, match="^" + re.escape(
      "The config change (ema_decay: 0.0 -> 0.9) does not fit the training state saved at step 4: "
      f"Checkpoint {os.path.abspath(workdir)}/checkpoints step 4 does not match the requested state; missing "
      "from the checkpoint: ema_params.dec0.conv0.conv.kernel, ") + r".* \(and \d+ more\)\. " + re.escape(
          "It cannot be applied to an existing run, even with --allow_config_change; start a fresh --workdir.")
                     + "$"):
    train.main(config, workdir, allow_config_change=True)
  assert _snapshot(workdir) == before


def test_command_line_refuses_a_changed_config_in_one_line(finished_run, tmp_path, capsys):
  workdir = _copy(finished_run, tmp_path)
  before = _snapshot(workdir)
  same = [f"--config={EXPERIMENT}:dims=2,quick=true", f"--workdir={workdir}", "--config.mesh=(('data',1),)",
          "--config.data.num_train=8", "--config.total_steps=4", "--config.checkpoint_every_steps=2",
          "--config.eval_every_steps=2"]

  def error(*extra):
    argv, overrides = main_lib.split_overrides(["medjax.main", *same, *extra])
    try:
      flags.FLAGS(argv)
      with pytest.raises(SystemExit) as exit_info:
        main_lib.run(argv, overrides)
    finally:
      flags.FLAGS.unparse_flags()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    return lines[0]

  assert error("--config.lr=0.001").startswith(
      "medjax.main: error: The config differs from the one this run was started with "
      f"({os.path.abspath(workdir)}/config.json): lr: 0.005 -> 0.001. Start a fresh --workdir, or pass "
      "--allow_config_change")
  assert error("--allow_config_change", "--config.model.features=(8,16)").startswith(
      f"medjax.main: error: The config changes the model of the run in {os.path.abspath(workdir)}: "
      "model.features: [4, 8] -> [8, 16].")
  assert _snapshot(workdir) == before


def _damage(step_dir, kind):
  """Damages a saved step as a full disk or a careless `rm` would; returns the reason the check gives."""
  data = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)
  name = os.path.relpath(data, step_dir)
  if kind == "truncated array file":
    with open(data, "r+b") as f:
      f.truncate(10)
    return re.escape(f"{name} is truncated (10 bytes, data up to byte ") + r"\d+ expected\)"
  if kind == "deleted array file":
    os.remove(data)
    return re.escape(f"{name} is missing")
  os.remove(os.path.join(step_dir, "state", "_METADATA"))
  return re.escape("state/_METADATA is missing")


@pytest.mark.parametrize("kind", ["truncated array file", "deleted _METADATA", "deleted array file"])
def test_resume_falls_back_to_the_newest_intact_step_and_keeps_the_damaged_one(finished_run, tmp_path, kind):
  workdir = _copy(finished_run, tmp_path)
  ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
  reason = _damage(os.path.join(ckdir, "4"), kind)
  damaged = _snapshot(os.path.join(ckdir, "4"))
  with pytest.warns(checkpoint.DamagedCheckpointWarning) as warned:
    result = train.main(_short_config(), workdir)
  messages = [str(w.message) for w in warned if w.category is checkpoint.DamagedCheckpointWarning]
  assert len(messages) == 2, messages
  assert re.fullmatch(re.escape(f"Checkpoint step 4 in {ckdir} is damaged (") + reason + re.escape(
      "); resuming from step 2, the newest intact one. Step 4 stays on disk (moved aside, all files kept, if this "
      "run saves step 4 again)."), messages[0])
  assert re.fullmatch(re.escape(f"Checkpoint step 4 in {ckdir} is damaged (") + reason + re.escape(
      f"); moved it to {ckdir}/4.damaged (all files kept) to save step 4 again."), messages[1])
  assert result["step"] == 4 and _results(workdir)["resumed_from_step"] == 2
  assert _snapshot(os.path.join(ckdir, "4.damaged")) == damaged  # nothing lost
  # The step trained again from step 2 is exactly the one that was damaged (an exact resume).
  resumed, original = _final_state(workdir), _final_state(str(finished_run))
  chex.assert_trees_all_equal(resumed["params"], original["params"])
  chex.assert_trees_all_equal(resumed["opt_state"], original["opt_state"])


def test_an_older_damaged_step_is_skipped_and_kept(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
  _damage(os.path.join(ckdir, "2"), "deleted _METADATA")
  damaged = _snapshot(os.path.join(ckdir, "2"))
  with pytest.warns(checkpoint.DamagedCheckpointWarning, match="^" + re.escape(
      f"Checkpoint step 2 in {ckdir} is damaged (state/_METADATA is missing); it is skipped and stays on disk.")
                    + "$"):
    assert train.main(_short_config(), workdir)["step"] == 4  # finished: nothing to train
  assert _results(workdir)["resumed_from_step"] == 4 and _snapshot(os.path.join(ckdir, "2")) == damaged


def test_load_names_a_damaged_step_and_the_intact_ones(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
  _damage(os.path.join(ckdir, "4"), "deleted _METADATA")
  where = f"step 4 in {ckdir} is damaged (state/_METADATA is missing); intact steps: [2]."
  for step, message in [(4, f"Checkpoint {where}"), ("4", f"Checkpoint {where}"),
                        ("latest", f"The latest checkpoint, {where}"), (None, f"The latest checkpoint, {where}")]:
    with pytest.raises(checkpoint.DamagedCheckpointError, match=f"^{re.escape(message)}$"):
      checkpoint.load(workdir, step)
  assert checkpoint.load(workdir, 2).step == 2
  best = _results(workdir)["best"]
  if best["step"] == 4:  # best by val/dice_mean, from the metrics saved with each step
    with pytest.raises(checkpoint.DamagedCheckpointError, match=re.escape(
        f"The best checkpoint by val/dice_mean, {where}")):
      checkpoint.load(workdir, "best")
  else:
    assert checkpoint.load(workdir, "best").step == 2


def test_no_intact_checkpoint_to_resume_from(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
  for step in (2, 4):
    _damage(os.path.join(ckdir, str(step)), "deleted _METADATA")
  with pytest.raises(checkpoint.DamagedCheckpointError, match="^" + re.escape(
      f"No intact checkpoint to resume from in {ckdir} (damaged: step 2: state/_METADATA is missing; step 4: "
      "state/_METADATA is missing). Move the damaged steps out of it to train from scratch, or start a fresh "
      "--workdir.") + "$"):
    train.main(_short_config(), workdir)
