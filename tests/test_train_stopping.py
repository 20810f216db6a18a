"""train.main's stopping rules and final report: on_eval, early stopping (and its exact resume), results.json
with test metrics of the last state and of the best checkpoint."""

import json
import os
import re

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medjax import build, checkpoint, config_lib, evaluators, metric_writer, train
from medjax.data import datasets
from tests.train_testing import Preempted, preempt_after_save, set_dotted

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _segmentation_config(**overrides):
  config = config_lib.load_config(os.path.join(EXPERIMENTS, "synthetic_unet.py") + ":dims=2,quick=true")
  config.mesh = (("data", 1),)
  config.data.num_train = 8
  return set_dotted(config, **overrides)


def _results(workdir):
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    return json.load(f)


def _latest_step(workdir):
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=10,
                                 read_only=True).latest_step()


class _ScriptedScore:
  """Stands in for `evaluators.evaluate`: evaluation k of a run is the one at step first_step + k * every and
  reports {"score": script[step]} (plus the real metrics when `real` is set and the step is scripted).

  Calls past the script (test-split evaluations) return the real metrics only.
  """

  def __init__(self, script, first_step, every, real=None):
    self.script, self.step, self.every, self.real = script, first_step, every, real

  def __call__(self, evaluator, eval_fn, batches):
    metrics = dict(self.real(evaluator, eval_fn, batches)) if self.real else {}
    if self.step in self.script:
      metrics["score"] = self.script[self.step]
    self.step += self.every
    return metrics



# An improvement must beat the best by more than 0.05: step 8's 0.74 does not beat step 4's 0.7, so with
# patience 3 the run stops at step 10. A resume that forgot steps 2-6 would take 0.74 as its best and run on.
SCRIPT = {2: 0.5, 4: 0.7, 6: 0.6, 8: 0.74, 10: 0.72, 12: 0.95, 14: 0.96}
EARLY = dict(metric="val/score", mode="max", patience=3, min_delta=0.05)


def test_early_stopping_stops_at_the_right_evaluation_also_after_a_preemption(tmp_path, monkeypatch):
  config = _segmentation_config(total_steps=14, eval_every_steps=2, checkpoint_every_steps=100,
                                log_every_steps=1)
  config.early_stopping = EARLY
  workdir, seen = str(tmp_path), []

  def on_eval(step, metrics):
    assert metrics["val/score"] == SCRIPT[step]  # the scripted evaluation is the one of this step
    seen.append(step)
    return False

  # Preempted right after saving step 6 (best 0.7 at step 4, one bad evaluation so far) ...
  original_save = preempt_after_save(monkeypatch, at_step=6)
  monkeypatch.setattr(evaluators, "evaluate", _ScriptedScore(SCRIPT, 2, 2))
  with pytest.raises(Preempted):
    train.main(config, workdir, on_eval=on_eval)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
  assert _latest_step(workdir) == 6 and seen == [2, 4]

  # ... and resumed: the patience count comes back from the log, so it stops at step 10 as a straight run
  # would (a resume that forgot steps 2-6 would run to step 14).
  monkeypatch.setattr(evaluators, "evaluate", _ScriptedScore(SCRIPT, 8, 2))
  result = train.main(config, workdir, on_eval=on_eval)
  assert result["step"] == 10 and seen == [2, 4, 8, 10]
  assert _latest_step(workdir) == 10
  results = _results(workdir)
  assert (results["status"], results["step"], results["final"]["val/score"]) == ("early_stopped", 10, 0.72)
  assert max(r["step"] for r in metric_writer.read_metrics(workdir)) == 10

  # Started again, the early-stopped run stays stopped: no training, same status.
  records = len(metric_writer.read_metrics(workdir))
  monkeypatch.setattr(evaluators, "evaluate", _ScriptedScore(SCRIPT, 10, 2))
  assert train.main(config, workdir)["step"] == 10
  assert _results(workdir)["status"] == "early_stopped"
  assert not any("train/loss" in r for r in metric_writer.read_metrics(workdir)[records:])


def test_on_eval_true_stops_after_checkpointing_that_step(tmp_path, capsys):
  config = _segmentation_config(total_steps=8, eval_every_steps=2, checkpoint_every_steps=100)
  calls = []

  def on_eval(step, metrics):
    calls.append((step, sorted(metrics)))
    return step == 4

  result = train.main(config, str(tmp_path), on_eval=on_eval)
  assert [step for step, _ in calls] == [2, 4] and result["step"] == 4
  assert all(key.startswith("val/") for _, keys in calls for key in keys) and "val/dice_mean" in calls[0][1]
  assert _latest_step(str(tmp_path)) == 4
  results = _results(str(tmp_path))
  assert results["status"] == "stopped" and results["step"] == 4
  assert results["final"]["val/dice_mean"] == pytest.approx(result["val/dice_mean"])
  assert "Stopped at step 4 of 8 by on_eval" in capsys.readouterr().out


def _sklearn_test_metrics(workdir, step, config):
  """Accuracy and one-vs-rest macro AUC of checkpoint `step` on the test split, computed independently."""
  loaded = checkpoint.load(workdir, step=step)
  name, kwargs = config_lib.named(config.data, "data")
  source = datasets.build_dataset(name, kwargs).source("test")
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  logits, _ = loaded.model.apply(loaded.variables, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  return {"accuracy": float(np.mean(probs.argmax(-1) == labels)),
          "auc": roc_auc_score(labels, probs, multi_class="ovr", average="macro")}


def test_results_json_reports_last_and_best_checkpoint_on_the_test_split(tmp_path, monkeypatch, capsys):
  config = config_lib.load_config(os.path.join(EXPERIMENTS, "synthetic_resnet.py") + ":quick=true")
  set_dotted(config, mesh=(("data", 1),), total_steps=4, eval_every_steps=2, checkpoint_every_steps=100,
       **{"data.num_test": 24, "data.num_val": 8, "model.stage_sizes": (1,)})  # one residual block: fast
  config.test_split = "test"
  config.best_metric = "val/score"  # scripted so the best step (2) is not the last one (4)
  monkeypatch.setattr(evaluators, "evaluate", _ScriptedScore({2: 0.9, 4: 0.1}, 2, 2, real=evaluators.evaluate))
  workdir = str(tmp_path)
  returned = train.main(config, workdir)
  out = capsys.readouterr().out

  results = _results(workdir)
  assert results["status"] == "finished" and results["step"] == 4 and results["wall_s"] > 0
  assert results["best"] == {"metric": "val/score", "value": 0.9, "step": 2}
  assert results["final"]["val/score"] == 0.1 and "val/auc" in results["final"]
  for prefix, step in (("test", 4), ("test_best", 2)):
    expected = _sklearn_test_metrics(workdir, step, config)
    for name, value in expected.items():
      assert results[prefix][f"{prefix}/{name}"] == pytest.approx(value, abs=1e-6), (prefix, name)
      assert returned[f"{prefix}/{name}"] == pytest.approx(value, abs=1e-6)
  assert results["test"]["test/auc"] != results["test_best"]["test_best/auc"]  # really two different states
  logged = [r for r in metric_writer.read_metrics(workdir) if "test/auc" in r]
  assert len(logged) == 1 and logged[0]["step"] == 4 and "test_best/auc" in logged[0]
  assert re.search(r"Test \(last\) .*test/accuracy=[\d.]+.* Test \(best\) .*test_best/accuracy=[\d.]+", out)


def test_unknown_test_split_fails_before_training(tmp_path):
  config = _segmentation_config()
  config.test_split = "tset"
  with pytest.raises(config_lib.ConfigError, match=r"config.test_split: the dataset has no split 'tset'; "
                                                   r"it has 'train', 'val', 'test'"):
    train.main(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("early_stopping, message", [
    (dict(metric="val/auc", patiense=3), r"Unknown key config.early_stopping.patiense. Did you mean 'patience'"),
    (dict(metric="auc"), r"early_stopping.metric must be a validation metric key 'val/...'.*got 'auc'"),
    (dict(metric="val/auc", mode="up"), r"early_stopping.mode must be 'max' or 'min', got 'up'"),
    (dict(metric="val/auc", patience=0), r"patience >= 1 and min_delta >= 0"),
    (dict(metric="val/auc", patience=2.5), r"config.early_stopping.patience must be int, got 2.5"),
])
def test_bad_early_stopping_config_fails_validation(early_stopping, message):
  config = _segmentation_config(eval_every_steps=2)
  config.early_stopping = early_stopping
  with pytest.raises(config_lib.ConfigError, match=message):
    build.validate(config)


def test_early_stopping_needs_periodic_evaluation_and_defaults_to_best_metric():
  config = _segmentation_config()
  config.eval_every_steps = 0  # evaluate at the end only
  config.early_stopping = dict(patience=2)
  with pytest.raises(config_lib.ConfigError, match=r"set config.eval_every_steps"):
    build.validate(config)
  config.eval_every_steps, config.best_mode = 2, "min"
  build.validate(config)
  early = train.make_early_stopping(config)
  assert (early.metric, early.mode, early.patience, early.min_delta) == ("val/dice_mean", "min", 2, 0.0)


def test_early_stopping_counts_nan_as_no_improvement_and_min_mode():
  early = train.EarlyStopping("val/loss", mode="min", patience=2, min_delta=0.1)
  assert not early.update(1, {"val/loss": float("nan")})  # no finite value yet: one bad evaluation
  assert not early.update(2, {"val/loss": 1.0}) and early.best_step == 2
  assert not early.update(3, {"val/loss": 0.95})  # better, but by less than min_delta
  assert early.update(4, {"val/loss": float("inf")})
  with pytest.raises(config_lib.ConfigError, match=r"early_stopping.metric='val/loss' is not among .*'val/x'"):
    early.update(5, {"val/x": 1.0})
