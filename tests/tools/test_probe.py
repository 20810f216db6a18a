"""The probe tool on a tiny pretrained run: the three variants' runs (a linear probe that keeps every encoder
weight and batch statistic bit-identical, a fine-tune that loads them, a scratch run that does not), the
report against the runs' results.json, a re-run that trains nothing, the --steps rescaling, and one-line
errors."""

import json
import os

import jax
import numpy as np
import pytest

from medjax import checkpoint, config_lib, optim, param_paths, train
from medjax.tools import cli, probe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# A one-stage ResNet (batch norm, width 4) on 16 px synthetic lesions with a small test split, on one device.
SYNTHETIC = os.path.join(ROOT, "experiments", "synthetic_resnet.py")
TINY = f"""
from medjax import config_lib


def get_config(arg=None):
  c = config_lib.load_config({SYNTHETIC!r} + ":quick=true")
  c.mesh = (("data", 1),)
  c.model.stage_sizes = (1,)
  c.data.num_test = 8
  c.test_split = "test"
  return c
"""
STEPS = 2


def _flat(tree):
  return {param_paths.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The experiment file, a 4-step pretrained run of it, and a probe of 2 seeds x 3 variants of 2 steps."""
  root = tmp_path_factory.mktemp("probe")
  spec = str(root / "tiny_experiment.py")
  with open(spec, "w") as f:
    f.write(TINY)
  pretrained = str(root / "pretrained")
  train.main(config_lib.load_config(spec), pretrained)
  out = str(root / "probe")
  result = probe.run(spec, pretrained, out, seeds=(0, 1), steps=STEPS, log=lambda _: None)
  return dict(spec=spec, pretrained=pretrained, out=out, result=result)


def _run_dir(setup, variant, seed=0):
  return os.path.join(setup["out"], variant, f"seed{seed}")


def _results(run_dir):
  with open(os.path.join(run_dir, train.RESULTS_FILE)) as f:
    return json.load(f)


def test_variants_start_as_the_protocol_says(setup):
  assert sorted(setup["result"]["trained"]) == sorted(
      _run_dir(setup, v, s) for v in probe.VARIANTS for s in (0, 1))
  for variant in probe.VARIANTS:
    for seed in (0, 1):
      results = _results(_run_dir(setup, variant, seed))
      assert results["step"] == STEPS and results["status"] == train.FINISHED
      config = checkpoint.load_config(_run_dir(setup, variant, seed))
      assert config.seed == seed and config.total_steps == STEPS
  source = checkpoint.load(setup["pretrained"], "latest")
  probed = checkpoint.load(_run_dir(setup, "linear_probe"))
  src, got = _flat(source.variables["params"]), _flat(probed.variables["params"])
  encoder = [p for p in src if not p.startswith("head/")]
  assert encoder and set(src) == set(got)
  for path in encoder:  # frozen: exactly the pretrained bits
    np.testing.assert_array_equal(got[path], src[path], err_msg=path)
  assert not np.array_equal(got["head/kernel"], src["head/kernel"])  # a new head, trained
  src_stats, got_stats = _flat(source.variables["batch_stats"]), _flat(probed.variables["batch_stats"])
  assert src_stats and set(src_stats) == set(got_stats)
  for path in src_stats:  # batch norm in inference mode: the running statistics as loaded
    np.testing.assert_array_equal(got_stats[path], src_stats[path], err_msg=path)
  with open(os.path.join(_run_dir(setup, "finetune"), checkpoint.INIT_REPORT_FILE)) as f:
    report = json.load(f)
  assert report["source"] == f"workdir {setup['pretrained']} step 4 (latest)"
  assert {r["path"] for r in report["initialised"]} == {"params/head/kernel", "params/head/bias"}
  tuned = _flat(checkpoint.load(_run_dir(setup, "finetune")).variables["params"])
  assert not np.array_equal(tuned["stem_conv/kernel"], src["stem_conv/kernel"])  # the encoder trains
  for seed in (0, 1):
    assert not os.path.exists(os.path.join(_run_dir(setup, "scratch", seed), checkpoint.INIT_REPORT_FILE))
    assert "init_from" not in checkpoint.load_config(_run_dir(setup, "scratch", seed))


def test_report_agrees_with_the_runs(setup):
  with open(os.path.join(setup["out"], probe.JSON_FILE)) as f:
    report = json.load(f)
  assert report["section"] == "test_best" and report["prefix"] == "test_best/"
  assert report["best_metric"] == "val/auc" and report["total_steps"] == STEPS and report["seeds"] == [0, 1]
  assert report["step_changes"]["total_steps"] == [4, STEPS]
  table = open(os.path.join(setup["out"], probe.MARKDOWN_FILE)).read()
  assert table == setup["result"]["markdown"]
  assert "| variant | n | auc | accuracy | balanced_accuracy |" in table and "`test_best/...`" in table
  assert list(report["variants"]) == list(probe.VARIANTS)
  for variant, entry in report["variants"].items():
    for run in entry["runs"]:
      results = _results(run["workdir"])
      assert run["metrics"] == {k[len("test_best/"):]: v for k, v in results["test_best"].items()}
    aucs = [r["metrics"]["auc"] for r in entry["runs"]]
    summary = entry["summary"]["auc"]
    assert summary["n"] == 2 and summary["mean"] == pytest.approx(np.mean(aucs))
    assert summary["std"] == pytest.approx(np.std(aucs, ddof=1))
    acc = entry["summary"]["accuracy"]
    assert f"| {variant} | 2 | {summary['mean']:.4f} ± {summary['std']:.4f} | {acc['mean']:.4f} ± " in table


def test_command_line_rerun_trains_nothing(setup, capsys):
  runs = [_run_dir(setup, v, s) for v in probe.VARIANTS for s in (0, 1)]
  before = {r: open(os.path.join(r, train.RESULTS_FILE)).read() for r in runs}
  steps = {r: checkpoint.for_run(r, read_only=True).all_steps() for r in runs}
  old = json.load(open(os.path.join(setup["out"], probe.JSON_FILE)))
  probe.call(["probe", f"--config={setup['spec']}", f"--init={setup['pretrained']}", f"--workdir={setup['out']}",
              "--seeds=0,1", f"--steps={STEPS}"])
  out = capsys.readouterr().out
  assert out.count("finished already") == len(runs) and "| linear_probe | 2 |" in out
  assert {r: open(os.path.join(r, train.RESULTS_FILE)).read() for r in runs} == before
  assert {r: checkpoint.for_run(r, read_only=True).all_steps() for r in runs} == steps
  assert json.load(open(os.path.join(setup["out"], probe.JSON_FILE))) == old


def _error(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    probe.call(["probe", *argv])
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("medjax.tools.probe: error: "), lines
  return lines[0][len("medjax.tools.probe: error: "):]


def test_user_mistakes_are_one_line(setup, capsys, tmp_path):
  base = [f"--config={setup['spec']}", f"--init={setup['pretrained']}", f"--workdir={tmp_path / 'p'}"]
  assert _error(capsys, base + ["--variants=scratch,linear_prob"]) == (
      "--variants: unknown variant 'linear_prob'; the variants are scratch, linear_probe, finetune. "
      "Did you mean 'linear_probe'?")
  missing = os.path.join(os.path.dirname(setup["pretrained"]), "pretrianed")
  assert _error(capsys, base[:1] + [f"--init={missing}"] + base[2:]) == (
      f"--init {missing} does not exist. Did you mean 'pretrained'?")
  assert _error(capsys, base + ["--seeds="]) == "--seeds takes integers separated by commas, got ''."
  assert _error(capsys, base + ["--head=haed"]).startswith(
      "--head: pattern 'haed' matches no parameter of the model; its last parameters are ")
  assert _error(capsys, base + ["--head=*"]).startswith("--head * selects every parameter of the model")
  assert _error(capsys, base + ["--config.model.widht=2"]).startswith("Unknown config key 'model.widht'")
  assert not os.path.exists(tmp_path / "p")  # nothing trained or written
  with pytest.raises(cli.UsageError, match="--seeds is empty"):
    probe.run(setup["spec"], setup["pretrained"], str(tmp_path / "p"), seeds=())


def test_steps_rescale_the_schedule_and_variants_set_the_keys():
  official = config_lib.load_config(os.path.join(ROOT, "experiments", "medmnist_resnet.py"))
  assert probe.set_steps(official, 100) == {"total_steps": [500, 100]}  # fractional boundaries stay
  spec = os.path.join(ROOT, "experiments", "medmnist_resnet.py") + ":subset=adrenalmnist3d,recipe=finetune,init=pre"
  config = config_lib.load_config(spec)
  config.schedule.decay, config.schedule.boundaries = "step", (200, 0.9)
  config.optim.unfreeze = (("stage4_*", 50),)
  total, warmup = config.total_steps, config.schedule.warmup_steps  # 20 epochs of 38 steps, 2 of warmup
  lp = probe.variant_config(config, "linear_probe", seed=3, init="/w", head=("head",), steps=total // 2)
  assert lp.total_steps == total // 2 and lp.schedule.warmup_steps == warmup // 2
  assert tuple(lp.schedule.boundaries) == (100, 0.9) and config.schedule.boundaries == (200, 0.9)  # a copy
  optim.validate_optim_config(lp)
  assert tuple(lp.optim.train_only) == ("head",) and "unfreeze" not in lp.optim and lp.freeze_batch_stats
  assert dict(lp.init_from) == dict(path="/w", step="latest", exclude=("head",), inflate="average") and lp.seed == 3
  ft = probe.variant_config(config, "finetune", seed=0, init="/w", head=("head", "stem_*"), init_step=7)
  assert ft.init_from.exclude == ("head", "stem_*") and ft.init_from.step == 7 and "train_only" not in ft.optim
  assert tuple(ft.optim.unfreeze) == (("stage4_*", 50),) and not ft.get("freeze_batch_stats")
  scratch = probe.variant_config(config, "scratch", seed=0, init="/w", head=("head",))
  assert "init_from" not in scratch and scratch.total_steps == total


def test_metric_source_and_summary():
  runs = [{"test_best": {"test_best/auc": 0.5}, "test": {"test/auc": 0.4}, "final": {"val/auc": 0.3}},
          {"test_best": {}, "test": {"test/auc": 0.6}, "final": {"val/auc": 0.7}}]
  assert probe.metric_source(runs) == ("test", "test/")
  assert probe.metric_source([{"test_best": {}, "test": {}, "final": {"val/auc": 1.0}}]) == ("final", "val/")
  assert probe.summarise([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(np.sqrt(2.0)), "n": 2}
  assert probe.summarise([1.0]) == {"mean": 1.0, "std": None, "n": 1}
