"""The evaluate tool on tiny trained runs: report files, numbers recomputed from the per-case values, and
agreement with training's own validation metrics."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax import checkpoint, config_lib
from medjax.data import datasets
from medjax.tools import cli, evaluate
from tests.train_testing import train_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


_train = train_experiment


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("seg")
  return path, _train(path, "synthetic_unet.py:dims=2,quick=true", num_train=8, num_test=6)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("cls")
  # A two-stage VGG compiles in a third of the time of the experiment's ResNet-18.
  tiny_vgg = ("vgg11", dict(spatial_dims=2, num_classes=3, width=4, stage_sizes=(1, 1), pool_size=2,
                            head_features=(8,), dropout=0.0))
  # With left-right flip TTA, which the report must then apply exactly as the run's validation did.
  return path, _train(path, "synthetic_resnet.py:quick=true", model=tiny_vgg, num_test=8, eval_flips=((), (1,)))


def _column(cases, key):
  return np.array([np.nan if c[key] is None else c[key] for c in cases], np.float64)


def _nanmean(values):
  values = np.asarray(values, np.float64)
  return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else None


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _split_ids(workdir, split):
  config = checkpoint.load_config(str(workdir))
  source = datasets.build_dataset(*config_lib.named(config.data, "data")).source(split)
  return [int(source[i]["id"]) for i in range(len(source))]


def test_segmentation_report_matches_cases_and_training(seg_run):
  workdir, trained = seg_run
  evaluate.run(str(workdir), split="val", num_samples=30)
  out = workdir / "eval_val"
  for name in ("report.json", "report.md", "cases.csv", "dice_per_case.png", "overlays.png"):
    assert (out / name).is_file(), name
  assert _is_png(out / "overlays.png") and _is_png(out / "dice_per_case.png")
  report = json.loads((out / "report.json").read_text())
  assert report["checkpoint"]["step"] == 4 and report["checkpoint"]["selected"] == "best by val/dice_mean"
  with open(workdir / "env.json") as f:
    assert report["env"] == json.load(f)  # the run's provenance travels with its report
  assert "- trained with: " in (out / "report.md").read_text()
  assert report["checkpoint"]["saved_metrics"]["val/dice_mean"] == pytest.approx(trained["val/dice_mean"])
  assert [c["id"] for c in report["cases"]] == _split_ids(workdir, "val")
  values = {name: entry["value"] for name, entry in report["metrics"].items()}
  cases = report["cases"]
  for metric in ("dice", "iou", "hd95", "assd"):  # recomputed from the per-case table alone
    per_class = [_nanmean(_column(cases, f"{metric}/{name}")) for name in ("organ", "lesion")]
    assert [values[f"{metric}/organ"], values[f"{metric}/lesion"]] == pytest.approx(per_class, nan_ok=True)
    assert values[f"{metric}_mean"] == pytest.approx(_nanmean([v for v in per_class if v is not None]))
  assert values["dice_case_mean"] == pytest.approx(_nanmean(_column(cases, "dice_case_mean")))
  assert values["num_cases"] == 4
  for key in ("dice_mean", "dice/organ", "dice/lesion", "dice_case_mean"):  # training's final validation
    expected = trained[f"val/{key}"]
    assert (values[key] is None and math.isnan(expected)) or values[key] == pytest.approx(expected, rel=1e-6)
  for entry in report["metrics"].values():
    if entry["low"] is not None:
      assert entry["low"] <= entry["value"] + 1e-12 and entry["value"] <= entry["high"] + 1e-12
  markdown = (out / "report.md").read_text()
  assert "| dice_mean |" in markdown and "![overlays.png](overlays.png)" in markdown


def test_classification_report_matches_cases_and_training(cls_run):
  workdir, trained = cls_run
  out = workdir / "custom_out"
  evaluate.run(str(workdir), split="val", out=str(out), num_samples=30, html=True)
  for name in ("roc_pr.png", "confusion_matrix.png", "calibration.png", "report.html", "report.md"):
    assert (out / name).is_file(), name
  report = json.loads((out / "report.json").read_text())
  cases, values = report["cases"], {k: e["value"] for k, e in report["metrics"].items()}
  labels = np.array([c["label"] for c in cases])
  probs = np.stack([_column(cases, f"prob/{n}") for n in ("no_lesion", "bright_lesion", "dark_lesion")], 1)
  assert values["accuracy"] == pytest.approx(np.mean([c["correct"] for c in cases]))
  assert values["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
  assert values["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"), rel=1e-5)
  assert values["accuracy"] == pytest.approx(trained["val/accuracy"])
  assert values["auc"] == pytest.approx(trained["val/auc"], rel=1e-6)
  assert np.sum(report["curves"]["confusion_matrix"]["matrix"]) == len(cases) == 8
  assert "<table>" in (out / "report.html").read_text()


def test_checkpoint_choice_and_sliding_window(seg_run, tmp_path):
  workdir, _ = seg_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_*"))
  config = checkpoint.load_config(str(copy))
  config.inference = dict(roi_size=(8, 12), overlap=0.25, mode="gaussian")
  checkpoint.save_config(str(copy), config)
  report = evaluate.run(str(copy), split="test", which="2", num_samples=0, surface_metrics=False)
  assert report["checkpoint"] == {"step": 2, "selected": "requested", "saved_metrics": {}}
  assert report["config"]["inference"]["roi_size"] == [8, 12]
  assert report["metrics"]["num_cases"]["value"] == 6 and "hd95_mean" not in report["metrics"]
  assert 0.0 <= report["metrics"]["dice_case_mean"]["value"] <= 1.0
  with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 7 .*available steps: \[2, 4\]"):
    evaluate.run(str(copy), split="test", which="7")
  with pytest.raises(ValueError, match="must be 'best', 'latest' or a step number"):
    evaluate.run(str(copy), split="test", which="first")
  config.inference = dict(roi_size=(8, 8), overlapp=0.5)
  checkpoint.save_config(str(copy), config)
  with pytest.raises(config_lib.ConfigError, match=r"config.inference: unknown key\(s\) \['overlapp'\]"):
    evaluate.run(str(copy), split="test")


def test_command_line(cls_run, tmp_path):
  workdir, _ = cls_run
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "medjax.tools.evaluate", f"--workdir={workdir}", "--split=test",
       "--checkpoint=latest", "--bootstrap=0", f"--out={tmp_path}"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "accuracy: " in result.stdout and f"Report: {tmp_path}/report.md" in result.stdout
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["split"] == "test" and report["checkpoint"]["selected"] == "latest"
  assert report["metrics"]["auc"]["low"] is None  # --bootstrap=0: no intervals


def _cli_error(capsys, argv) -> str:
  """The one line `python -m medjax.tools.evaluate` writes for a mistake (run in this process), after exit 2."""
  with pytest.raises(SystemExit) as exit_info:
    cli.call(evaluate.main, evaluate._FLAGS, ["evaluate"] + argv)
  assert exit_info.value.code == 2, argv
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("medjax.tools.evaluate: error: "), lines
  return lines[0][len("medjax.tools.evaluate: error: "):]


def test_command_line_mistakes_are_one_line(seg_run, tmp_path, capsys):
  workdir, _ = seg_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("eval_*"))
  files = sorted(os.listdir(run))
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("")
  assert _cli_error(capsys, [f"--workdir={run}", "--split=tset"]) == (
      "--split: the dataset has no split 'tset'; it has 'train', 'val', 'test'. Did you mean 'test'?")
  assert _cli_error(capsys, [f"--workdir={tmp_path}/rnu"]) == (
      f"--workdir {tmp_path}/rnu does not exist. Did you mean 'run'?")
  assert _cli_error(capsys, [f"--workdir={tmp_path}/empty"]).startswith(f"--workdir {tmp_path}/empty is empty")
  assert "config.json" in _cli_error(capsys, [f"--workdir={tmp_path}/notes"])  # checkpoint.load_config's words
  assert _cli_error(capsys, [f"--workdir={run}", "--checkpoint=bets"]) == (
      "flag --checkpoint=bets: must be 'best', 'latest' or a step number (pass --help to list the flags)")
  assert _cli_error(capsys, []) == "--workdir is required (pass --help to list the flags)"
  assert "step 7" in _cli_error(capsys, [f"--workdir={run}", "--checkpoint=7"])
  config = checkpoint.load_config(str(run))
  config.inference = dict(roi_size=(8, 8), overlapp=0.5)
  checkpoint.save_config(str(run), config)
  assert _cli_error(capsys, [f"--workdir={run}", "--split=test"]).startswith(
      "config.inference: unknown key(s) ['overlapp']")
  assert sorted(os.listdir(run)) == files  # no report folder for a failed evaluation


def test_recorder_keeps_ids_and_metadata_of_real_cases():
  batches = [{"id": np.array([5, 6]), "sex": np.array(["F", "M"]), "weight": np.ones(2, np.float32),
              "image": np.zeros((2, 4, 4, 1), np.float32), "spacing_mm": np.ones((2, 2), np.float32)},
             {"id": np.array([7, 5]), "sex": np.array(["M", "F"]), "weight": np.array([1, 0], np.float32),
              "image": np.zeros((2, 4, 4, 1), np.float32), "spacing_mm": np.ones((2, 2), np.float32)}]
  recorder = evaluate._Recorder(iter(batches))
  assert len(list(recorder)) == 2
  assert recorder.ids == [5, 6, 7] and recorder.metadata == {"sex": ["F", "M", "M"]}
