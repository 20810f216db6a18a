"""The compress_report tool on a tiny trained ResNet-18: one row per variant, parameters and bytes shrinking as
each compression promises, the original's metrics equal to medjax.tools.evaluate's, and errors naming flags."""

import json
import os

import pytest

from medjax import config_lib, train
from medjax.compress import pruning
from medjax.tools import cli, compress_report, evaluate

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_dp.py")
PROG = "medjax.tools.compress_report: error: "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=0")  # synthetic lesions, ResNet-18 of width 8
  config.mesh = (("data", 1),)
  config.model.norm = "batch"  # filter pruning keeps every channel of a group-norm conv narrower than 32
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
  path = str(tmp_path_factory.mktemp("float"))
  train.main(config, path)
  return path


@pytest.fixture(scope="module")
def result(run_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("report"))
  return out, compress_report.run(run_dir, ptq=True, calibration_batches=2, prune=["0.5"], filters=["0.5"],
                                  repeats=2, out=out)


def test_one_row_per_variant_with_files(result):
  out, report = result
  assert [r["name"] for r in report["rows"]] == ["original", "ptq int8", "prune 0.5", "filters 0.5"]
  assert report["split"] == "test"
  written = json.load(open(os.path.join(out, "report.json")))
  assert written["rows"] == report["rows"]
  text = open(os.path.join(out, "report.md")).read()
  assert report["table"] in text and text.count("\n| ") == 1 + len(report["rows"])  # header, separator, rows
  with open(os.path.join(out, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for row in report["rows"]:
    assert set(row["metrics"]) == {"auc", "accuracy"}, row
    assert 0 <= row["metrics"]["accuracy"] <= 1
    assert row["latency_ms_1"] > 0 and row["latency_ms_batch"] > 0 and row["batch"] == 16


def test_sizes_shrink_as_each_compression_promises(result):
  rows = {r["name"]: r for r in result[1]["rows"]}
  original, ptq, pruned, filters = rows["original"], rows["ptq int8"], rows["prune 0.5"], rows["filters 0.5"]
  assert ptq["size"] < 0.35 * original["size"]
  assert ptq["params"] == original["params"]
  # One-shot magnitude pruning zeroes half of the prunable weights (every kernel here) and keeps the storage.
  assert pruned["params"] == original["params"] and pruned["size"] == original["size"]
  assert original["nonzero"] - pruned["nonzero"] >= 0.5 * 0.5 * original["params"]
  # Filter pruning halves every inner convolution: conv1 loses half its filters, conv2 half its inputs.
  assert 0.5 * original["params"] < filters["params"] < 0.85 * original["params"]
  assert filters["size"] < original["size"]


def test_pruned_row_zeroes_exactly_the_global_magnitude_count(run_dir, result):
  from medjax import checkpoint
  params = checkpoint.load(run_dir, step="best").variables["params"]
  prunable = next(r for r in pruning.sparsity_report(params) if r["name"] == "prunable" and not r["shape"])
  rows = {r["name"]: r for r in result[1]["rows"]}
  # round(0.5 n) prunable weights end at 0; those already 0 (the smallest magnitudes) were counted as zeros.
  newly = rows["original"]["nonzero"] - rows["prune 0.5"]["nonzero"]
  assert newly == round(0.5 * prunable["params"]) - prunable["zeros"]


def test_original_metrics_equal_the_evaluate_tool(run_dir, result, tmp_path):
  evaluated = evaluate.run(run_dir, split="test", num_samples=0, out=str(tmp_path))
  original = result[1]["rows"][0]["metrics"]
  assert original["auc"] == evaluated["metrics"]["auc"]["value"]
  assert original["accuracy"] == evaluated["metrics"]["accuracy"]["value"]


def _cli_error(capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.call(compress_report.main, compress_report._FLAGS, ["compress_report"] + argv)
  assert exit_info.value.code == 2, argv
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(PROG), lines
  return lines[0]


def test_errors_name_the_flag(run_dir, tmp_path, capsys):
  assert "--workdir" in _cli_error(capsys, [])
  assert "--workdir" in _cli_error(capsys, [f"--workdir={tmp_path / 'nope'}"])
  assert "--prune: 1.5 must be in (0, 1)" in _cli_error(capsys, [f"--workdir={run_dir}", "--prune=0.5,1.5"])
  assert "--filters: 'half' is not a number" in _cli_error(capsys, [f"--workdir={run_dir}", "--filters=half"])
  assert "--repeats must be >= 1" in _cli_error(capsys, [f"--workdir={run_dir}", "--repeats=0"])
  assert "--variants" in _cli_error(capsys, [f"--workdir={run_dir}", f"--variants={tmp_path / 'missing'}"])
  assert "--split: the dataset has no split 'tset'" in _cli_error(capsys, [f"--workdir={run_dir}", "--split=tset"])


def test_cli_prints_the_table_with_a_variant_run_and_the_export(run_dir, tmp_path, capsys):
  out = tmp_path / "out"
  cli.call(compress_report.main, compress_report._FLAGS,
           ["compress_report", f"--workdir={run_dir}", f"--variants={run_dir}", "--export", "--repeats=1",
            f"--out={out}"])
  printed = capsys.readouterr().out
  assert "| original |" in printed and "| export |" in printed and f"| {os.path.basename(run_dir)} |" in printed
  rows = json.load(open(out / "report.json"))["rows"]
  original, same_run, exported = rows
  assert same_run["metrics"] == original["metrics"] and same_run["params"] == original["params"]
  # The exported predictor computes the same function: the same AUC up to float rounding of the logits.
  assert exported["metrics"]["auc"] == pytest.approx(original["metrics"]["auc"], abs=1e-6)
  assert exported["size"] > 0 and exported["params"] == original["params"]


def test_a_qat_variant_is_reported_as_the_int8_model_it_trained_for(result, tmp_path):
  config = config_lib.load_config(EXPERIMENT + ":quick=true,eps=0")
  config.mesh = (("data", 1),)
  config.model.norm = "batch"
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
  config.quantization = dict(mode="qat")
  qat_dir = str(tmp_path / "qat")
  train.main(config, qat_dir)
  rows = compress_report.run(qat_dir, variants=[qat_dir], calibration_batches=2, repeats=1,
                             out=str(tmp_path / "out"))["rows"]
  ptq = next(r for r in json.load(open(os.path.join(result[0], "report.json")))["rows"] if r["name"] == "ptq int8")
  assert [r["name"] for r in rows] == ["original", "qat int8"]
  # The same architecture as the fixture's float run: the int8 storage of its PTQ row, a quarter of float32's
  # bytes for the kernels.
  assert rows[1]["size"] == ptq["size"] < rows[0]["size"] / 3
  assert rows[1]["params"] == rows[0]["params"] and 0 <= rows[1]["metrics"]["auc"] <= 1
