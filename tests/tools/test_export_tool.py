"""`python -m medjax.tools.export` on tiny trained runs: the folder predicts what the run's evaluation predicts (flip
TTA of a classifier; the sliding window of a patch-trained 3D U-Net), metadata from the run, one-line errors."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from medjax import build, checkpoint, provenance
from medjax.compress import predictor_loader
from medjax.data import datasets
from medjax.data.datasets import medmnist as mm
from medjax.tools import cli, export as export_tool
from tests.data.test_medmnist import write_fake
from tests.train_testing import train_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PROG = "medjax.tools.export: error: "


def _train(path, spec, **kwargs):
  train_experiment(path, spec, **kwargs)
  return str(path)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
  tiny_vgg = ("vgg11", dict(spatial_dims=2, num_classes=3, width=4, stage_sizes=(1, 1), pool_size=2,
                            head_features=(8,), dropout=0.0))
  # With left-right flip TTA, which the export must apply as the run's validation did.
  return _train(tmp_path_factory.mktemp("cls"), "synthetic_resnet.py:quick=true", model=tiny_vgg, num_test=4,
                eval_flips=((), (1,)))


def _export(argv, capsys):
  capsys.readouterr()  # what training printed
  cli.call(export_tool.main, export_tool._FLAGS, ["export"] + argv)
  return json.loads(capsys.readouterr().out)


def _cli_error(capsys, argv) -> str:
  """The one line the tool writes for a mistake (run in this process), after exit status 2."""
  with pytest.raises(SystemExit) as exit_info:
    cli.call(export_tool.main, export_tool._FLAGS, ["export"] + argv)
  assert exit_info.value.code == 2, argv
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(PROG), lines
  return lines[0][len(PROG):]


def _evaluation_outputs(workdir, images, sliding_window=False):
  """What the run's evaluation computes for `images`: `build.eval_apply_fn`, then the evaluator's softmax."""
  loaded = checkpoint.load(workdir)
  apply = build.eval_apply_fn(loaded.model, loaded.config, sliding_window=sliding_window)
  if sliding_window:  # its windows average probabilities already
    return np.asarray(jax.jit(lambda v, x: apply(v, x)[0])(loaded.variables, images))
  return np.asarray(jax.jit(lambda v, x: jax.nn.softmax(apply(v, x)[0], -1))(loaded.variables, images))


def test_classifier_export_predicts_as_the_runs_evaluation(cls_run, tmp_path, capsys):
  out = tmp_path / "model"
  summary = _export([f"--workdir={cls_run}", f"--out={out}"], capsys)
  meta = json.loads((out / "metadata.json").read_text())
  assert summary["input"] == ["b", 16, 16, 1] and summary["output"] == ["b", 3]
  assert summary["bytes"] == {**meta["files"], "metadata.json": os.path.getsize(out / "metadata.json")}
  assert summary["total_bytes"] == sum(os.path.getsize(out / f) for f in os.listdir(out))
  assert meta["classes"] == ["no_lesion", "bright_lesion", "dark_lesion"] and meta["task"] == "classification"
  assert meta["flips"] == [[], [1]] and meta["sliding_window"] is None and meta["output"]["activation"] == "softmax"
  assert meta["model"]["name"] == "vgg11" and meta["model"]["step"] == checkpoint.load(cls_run).step
  assert meta["provenance"]["run"]["git_commit"] == provenance.read(cls_run)["git_commit"]
  assert meta["provenance"]["export"] == provenance.git_state()
  assert "synthetic_lesions generator" in meta["normalization"]["before"][0]
  source = build.dataset(checkpoint.load_config(cls_run)).source("test")
  images = np.stack([source[i]["image"] for i in range(4)])
  predictor = predictor_loader.load(out)
  np.testing.assert_array_equal(predictor.predict(images), _evaluation_outputs(cls_run, images))
  np.testing.assert_array_equal(predictor.predict(images[:1]), _evaluation_outputs(cls_run, images[:1]))


def test_fixed_batch_and_other_flags(cls_run, tmp_path, capsys):
  out = tmp_path / "model"
  out.mkdir()
  (out / "old.txt").write_text("")
  summary = _export([f"--workdir={cls_run}", f"--out={out}", "--batch=2", "--checkpoint=latest", "--output=logits",
                     "--platforms=cpu", "--overwrite"], capsys)
  assert summary["input"] == [2, 16, 16, 1] and summary["platforms"] == ["cpu"]
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["output"]["kind"] == "logits" and meta["model"]["selected"].startswith("latest")
  assert (out / "old.txt").exists()  # --overwrite replaces the export's files only


@pytest.mark.slow
def test_patch_trained_3d_unet_exports_its_sliding_window(tmp_path_factory, capsys):
  workdir = _train(tmp_path_factory.mktemp("seg3d"), "synthetic_unet.py:dims=3,quick=true,patch=8", num_val=2)
  out = tmp_path_factory.mktemp("seg3d_model")
  summary = _export([f"--workdir={workdir}", f"--out={out}", "--overwrite"], capsys)
  assert summary["input"] == ["b", 16, 16, 16, 1] and summary["output"] == ["b", 16, 16, 16, 3]
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["sliding_window"]["roi_size"] == [8, 8, 8] and meta["task"] == "segmentation"
  source = build.dataset(checkpoint.load_config(workdir)).source("val")
  images = np.stack([source[i]["image"] for i in range(2)])
  got = predictor_loader.load(out).predict(images)
  for i in range(2):
    np.testing.assert_array_equal(got[i:i + 1], _evaluation_outputs(workdir, images[i:i + 1], sliding_window=True))


def test_command_line_mistakes_are_one_line(cls_run, tmp_path, capsys):
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("")
  (tmp_path / "file").write_text("")
  capsys.readouterr()
  run = f"--workdir={cls_run}"
  assert _cli_error(capsys, []) == "export needs --workdir, --out."
  assert _cli_error(capsys, [run]) == "export needs --out."
  assert _cli_error(capsys, [f"--workdir={tmp_path}/nowhere", f"--out={tmp_path}/m"]) == (
      f"--workdir {tmp_path}/nowhere does not exist.")
  assert _cli_error(capsys, [run, f"--out={tmp_path}/busy"]) == (
      f"--out {tmp_path}/busy exists and is not empty; give a new folder, or --overwrite to replace the export "
      "files in it.")
  assert _cli_error(capsys, [run, f"--out={tmp_path}/file"]).startswith(f"--out {tmp_path}/file is a file")
  assert _cli_error(capsys, [run, f"--out={tmp_path}/m", "--platforms=cpu,cdua"]) == (
      "--platforms: 'cdua' not among cpu, cuda, rocm, tpu. Did you mean 'cuda' or 'cpu'?")
  assert _cli_error(capsys, [run, f"--out={tmp_path}/m", "--shape=16,16,16"]) == (
      "--shape 16,16,16: the run's model is 2D; give y,x.")
  assert _cli_error(capsys, [run, f"--out={tmp_path}/m", "--shape=16,x"]) == (
      "--shape takes positive integers separated by commas, got '16,x'.")
  assert _cli_error(capsys, [run, f"--out={tmp_path}/m", "--batch=0"]).startswith("--batch must be a positive")
  assert "step 7" in _cli_error(capsys, [run, f"--out={tmp_path}/m", "--step=7"])
  assert not os.path.exists(tmp_path / "m")  # nothing written by a refused export


def test_shape_is_needed_for_cases_of_varying_size():
  info = datasets.DatasetInfo(task="segmentation", spatial_dims=3, image_shape=(8, 8, 8), num_channels=1,
                              num_classes=2, class_names=("background", "organ"), label_kind="map")
  with pytest.raises(cli.UsageError, match=r"--shape is needed: .* sliding window of \(8, 8, 8\)"):
    export_tool._shape(None, info, {"roi_size": (8, 8, 8)})
  assert export_tool._shape(["20", "24", "28"], info, {"roi_size": (8, 8, 8)}) == (20, 24, 28)
  assert export_tool._shape(None, info, None) == (8, 8, 8)


def test_multi_hot_labels_export_sigmoids(tmp_path):
  write_fake(tmp_path, "chestmnist", sizes=(2, 1, 1))
  write_fake(tmp_path, "pneumoniamnist", sizes=(2, 1, 1))
  config = ml_collections.ConfigDict({"evaluator": {"name": "classification"}})
  chest = mm.medmnist(subset="chestmnist", data_dir=str(tmp_path), verify_md5=False)
  pneumonia = mm.medmnist(subset="pneumoniamnist", data_dir=str(tmp_path), verify_md5=False)
  assert export_tool._default_output(config, chest) == "sigmoid"
  assert export_tool._default_output(config, pneumonia) == "softmax"
  config.evaluator.task = "multi-label"
  assert export_tool._default_output(config, pneumonia) == "sigmoid"
