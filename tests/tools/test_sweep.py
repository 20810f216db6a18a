"""Sweeps, local backend: search-space helpers, trial names, a real 2x2 grid of quick runs with a failing
trial, interrupt and resume, k-fold mean/std, the first N trials of a grid, and plot axes taken from the
search space (the last four with a fake trainer script)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections as mlc
import numpy as np
import pytest
from matplotlib import ticker

from medjax import config_lib
from medjax.sweep import local, report, space, trials
from medjax.tools import sweep as sweep_tool
from tests.tools.sweep_testing import ROOT, calls, fake_score, write_fixture


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
  # Trial processes run `python -m medjax.main` from wherever the test runs.
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _quiet(*args):
  del args


# ------------------------------------------------------------------------------------------- helpers


def test_product_orders_axes_and_merges_sub_sweeps():
  grid = space.product(lr=[1, 2], **{"model.depth": space.choice([3, 4])})
  assert grid == [{"lr": 1, "model.depth": 3}, {"lr": 1, "model.depth": 4},
                  {"lr": 2, "model.depth": 3}, {"lr": 2, "model.depth": 4}]
  folds = space.product(space.kfold(3), lr=[0.1, 0.2])
  assert len(folds) == 6 and folds[1] == {"data.fold": 0, "data.num_folds": 3, "lr": 0.2}
  with pytest.raises(ValueError, match=r"\['lr'\] are set by two factors"):
    space.product([{"lr": 1}], lr=[2])
  with pytest.raises(ValueError, match="continuous distribution"):
    space.product(lr=space.loguniform(1e-4, 1e-2))
  with pytest.raises(ValueError, match="lo > 0"):
    space.loguniform(0.0, 1.0)
  with pytest.raises(ValueError, match="k >= 2"):
    space.kfold(1)


def test_random_draws_are_reproducible_and_in_range():
  sp = {"lr": space.loguniform(1e-4, 1e-2), "wd": space.uniform(0.0, 0.5), "depth": space.intuniform(2, 4),
        "norm": space.choice(["batch", "instance"]), "seed": 7}
  draws = space.random_draws(sp, 50, seed=3)
  assert draws == space.random_draws(sp, 50, seed=3) != space.random_draws(sp, 50, seed=4)
  assert all(1e-4 <= d["lr"] <= 1e-2 and 0 <= d["wd"] <= 0.5 and d["seed"] == 7 for d in draws)
  assert {d["depth"] for d in draws} == {2, 3, 4} and {d["norm"] for d in draws} == {"batch", "instance"}
  # log-uniform: about as many draws below the geometric midpoint 1e-3 as above it
  assert 15 <= sum(d["lr"] < 1e-3 for d in draws) <= 35


def test_trial_names_are_short_safe_and_round_trip_through_overrides():
  assert trials.trial_name({"lr": 0.001, "model.features": (8, 16)}) == "lr=0.001,model.features=8-16"
  assert trials.trial_name({}) == "base"
  odd = trials.trial_name({"data.name": "a b/c"})
  assert odd.startswith("data.name=a_b_c-") and len(odd) == len("data.name=a_b_c-") + 8
  long = trials.trial_name({f"key{i}": i * 1.5 for i in range(20)})
  assert len(long) == 80 and long != trials.trial_name({f"key{i}": i * 1.5 for i in range(19)})
  config = config_lib.load_config(os.path.join(ROOT, "experiments/synthetic_unet.py:quick=true"))
  overrides = {"lr": 0.002, "model.features": (6, 12), "compute_dtype": "bfloat16", "augment": {}}
  applied = config_lib.apply_overrides(config, trials.override_args(overrides))
  assert (applied.lr, applied.model.features, applied.compute_dtype) == (0.002, (6, 12), "bfloat16")
  with pytest.raises(config_lib.ConfigError, match="same overrides"):
    trials.check_trials([{"lr": 0.1}, {"lr": 0.1}])


def test_device_slots_pin_gpus_or_set_cpu_device_count():
  assert local.device_slots(["0", "1", "2", "3", "4"], 2, parallel=4) == [["0", "1"], ["2", "3"]]
  assert local.device_slots([], 2, parallel=3) == [None, None, None]
  with pytest.raises(ValueError, match="only 1 GPU"):
    local.device_slots(["0"], 2, parallel=1)
  assert local.local_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
  env = local.trial_env({"XLA_FLAGS": "--xla_foo --xla_force_host_platform_device_count=8"}, None, 2)
  assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=2"
  assert local.trial_env({}, ["2", "3"], 2)["CUDA_VISIBLE_DEVICES"] == "2,3"


# ------------------------------------------------------------------------------- real quick trials


@pytest.mark.slow
def test_real_grid_two_at_a_time_with_a_failing_trial(tmp_path):
  """A 2x2 grid of quick U-Net runs plus one mistyped key, through the CLI, 2 trials at a time."""
  exp = tmp_path / "grid.py"
  exp.write_text(
      f"import importlib.util\nfrom medjax import sweep\n"
      f"_spec = importlib.util.spec_from_file_location('unet_exp', {os.path.join(ROOT, 'experiments', 'synthetic_unet.py')!r})\n"
      "_unet = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_unet)\n"
      "def get_config(arg=None):\n"
      "  c = _unet.get_config(arg)\n"  # the quick run, with one evaluation and less data: 2 steps
      "  c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 2\n"
      "  c.data.num_val = c.input.eval_batch_size = 2\n"
      "  return c\n"
      "def get_sweep(arg=None):\n  return _unet.get_sweep(arg) + [{'model.featurs': (4, 8)}]\n")
  workdir = tmp_path / "sweep"
  proc = subprocess.run([sys.executable, "-m", "medjax.tools.sweep", f"--config={exp}:quick=true,dims=2",
                         f"--workdir={workdir}", "--parallel=2", "--metric=val/dice_mean"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 1, proc.stderr[-2000:]  # one trial failed; the others finished
  assert "1 trial(s) failed: model.featurs=4-8" in proc.stderr
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == ["lr=0.005,model.features=4-8", "lr=0.005,model.features=8-16",
                                       "lr=0.001,model.features=4-8", "lr=0.001,model.features=8-16",
                                       "model.featurs=4-8"]
  assert [r["status"] for r in rows] == ["finished"] * 4 + ["failed"]
  for row in rows[:4]:
    metrics = [json.loads(line) for line in open(workdir / row["name"] / "metrics.jsonl")]
    dice = [m["val/dice_mean"] for m in metrics if m.get("val/dice_mean") is not None]
    assert float(row["best val/dice_mean"]) == pytest.approx(max(dice)) and row["best step"] == "2"
    assert float(row["wall s"]) > 0
  assert "Unknown config key 'model.featurs'" in rows[4]["error"] and "model.features" in rows[4]["error"]
  table = (workdir / "results.md").read_text()
  assert "| lr=0.001,model.features=8-16 | finished | 0.001 | (8, 16) |  | " in table
  assert "Unknown config key" in table
  for key in ("lr", "model.features"):
    assert (workdir / f"metric_vs_{key}.png").read_bytes()[:4] == b"\x89PNG"
  doc = json.loads((workdir / "sweep.json").read_text())
  assert doc["backend"] == "local" and doc["config"].endswith(":quick=true,dims=2")
  assert [t["status"] for t in doc["trials"]] == ["finished"] * 4 + ["failed"]
  assert doc["trials"][4]["returncode"] == 2


# ------------------------------------------------------------------------------- fake trainer


def test_interrupted_launcher_resumes_only_what_was_missing(tmp_path):
  exp, command = write_fixture(tmp_path)
  (tmp_path / "slow").write_text("lr=0.1,model.depth=2")  # every other trial sleeps until killed
  workdir = tmp_path / "sweep"
  launcher = subprocess.Popen([sys.executable, "-m", "medjax.tools.sweep", f"--config={exp}",
                               f"--workdir={workdir}", f"--trial_command={command}", "--parallel=1"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while len(calls(tmp_path)) < 2 and time.time() < deadline:  # first finished, second started
    time.sleep(0.1)
  launcher.send_signal(signal.SIGTERM)
  _, err = launcher.communicate(timeout=60)
  assert launcher.returncode == 130 and "run the same command again" in err
  doc = json.loads((workdir / "sweep.json").read_text())
  assert [t["status"] for t in doc["trials"]] == ["finished", "interrupted", "pending", "pending"]

  (tmp_path / "slow").unlink()
  result = sweep_tool.launch(exp, str(workdir), trial_command=command, parallel=2, log=_quiet)
  names = [c["name"] for c in calls(tmp_path)]
  assert names.count("lr=0.1,model.depth=2") == 1  # finished before: not run again
  assert [c["resumed"] for c in calls(tmp_path) if c["name"] == "lr=0.1,model.depth=3"] == [False, True]
  assert sorted(names[2:]) == ["lr=0.01,model.depth=2", "lr=0.01,model.depth=3", "lr=0.1,model.depth=3"]
  assert [r["status"] for r in result["rows"]] == ["finished"] * 4
  assert [r["best"] for r in result["rows"]] == pytest.approx(
      [fake_score(0.1, 2), fake_score(0.1, 3), fake_score(0.01, 2), fake_score(0.01, 3)])
  sweep_tool.launch(exp, str(workdir), trial_command=command, log=_quiet)  # all done: nothing runs
  assert len(calls(tmp_path)) == 5


def test_kfold_sweep_reports_mean_and_std_per_configuration(tmp_path):
  exp, command = write_fixture(tmp_path)
  result = sweep_tool.launch(f"{exp}:kfold", str(tmp_path / "cv"), trial_command=command, parallel=2,
                             log=_quiet)
  assert len(result["rows"]) == 10 and all(r["status"] == "finished" for r in result["rows"])
  groups = {g["name"]: g for g in result["kfold"]}
  assert list(groups) == ["data.num_folds=5,lr=0.1", "data.num_folds=5,lr=0.01"]  # best mean first
  for lr in (0.1, 0.01):
    scores = [fake_score(lr, 2, fold) for fold in range(5)]
    group = groups[f"data.num_folds=5,lr={lr}"]
    assert group["folds_done"] == 5
    assert group["mean"] == pytest.approx(np.mean(scores)) and group["std"] == pytest.approx(np.std(scores, ddof=1))
  table = (tmp_path / "cv" / "results.md").read_text()
  assert "## Cross-validation" in table and (
      f"| data.num_folds=5,lr=0.1 | 5/5 | {groups['data.num_folds=5,lr=0.1']['mean']:.4g} |") in table
  assert os.path.exists(tmp_path / "cv" / "metric_vs_lr.png")
  assert not os.path.exists(tmp_path / "cv" / "metric_vs_data.fold.png")


def test_search_space_needs_num_trials_and_draws_them(tmp_path):
  exp, command = write_fixture(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="--num_trials"):
    sweep_tool.launch(f"{exp}:space", str(tmp_path / "s"), trial_command=command, log=_quiet)
  result = sweep_tool.launch(f"{exp}:space", str(tmp_path / "s"), trial_command=command, num_trials=3, seed=1,
                             log=_quiet)
  assert [r["overrides"] for r in result["rows"]] == space.random_draws(
      trials.load_sweep(f"{exp}:space"), 3, seed=1)
  with pytest.raises(config_lib.ConfigError, match="No metric"):
    sweep_tool.resolve_settings(mlc.ConfigDict(dict(lr=0.1)), {})


def test_config_sweep_section_is_read_and_checked():
  config = mlc.ConfigDict(dict(best_metric="val/auc", sweep=dict(parallel=3, partition="gpu", nodes=2)))
  settings = sweep_tool.resolve_settings(config, dict(parallel=None, nodes=4, mode="min"))
  assert (settings["parallel"], settings["metric"], settings["mode"]) == (3, "val/auc", "min")
  assert (settings["slurm"].partition, settings["slurm"].nodes) == ("gpu", 4)
  config.sweep.paralel = 2
  with pytest.raises(config_lib.ConfigError, match="paralel"):
    sweep_tool.resolve_settings(config, {})


def test_grid_num_trials_runs_the_first_n_and_a_larger_n_adds_the_next(tmp_path):
  exp, command = write_fixture(tmp_path)
  workdir = str(tmp_path / "grid")
  grid = ["lr=0.1,model.depth=2", "lr=0.1,model.depth=3", "lr=0.01,model.depth=2", "lr=0.01,model.depth=3"]
  logged = []
  result = sweep_tool.launch(exp, workdir, trial_command=command, num_trials=2, log=logged.append)
  assert [c["name"] for c in calls(tmp_path)] == grid[:2] == [r["name"] for r in result["rows"]]
  assert ("sweep: --num_trials 2: running the first 2 of the grid's 4 trials (a larger value adds the next "
          "ones).") in logged
  result = sweep_tool.launch(exp, workdir, trial_command=command, num_trials=3, log=_quiet)
  assert [c["name"] for c in calls(tmp_path)] == grid[:3]  # the first two were skipped, the third ran
  assert [r["name"] for r in result["rows"]] == grid[:3] and {r["status"] for r in result["rows"]} == {"finished"}
  logged.clear()
  result = sweep_tool.launch(exp, workdir, trial_command=command, num_trials=10, log=logged.append)
  assert "sweep: --num_trials 10: running all 4 trials of the grid." in logged
  assert [c["name"] for c in calls(tmp_path)] == grid and len(result["rows"]) == 4
  with pytest.raises(config_lib.ConfigError, match="--num_trials must be >= 1"):
    sweep_tool.launch(exp, workdir, trial_command=command, num_trials=0, log=_quiet)


def _visible_tick_labels(ax, minor=False):
  ax.figure.canvas.draw()
  lo, hi = ax.get_xlim()
  return [label.get_text() for tick, label in zip(ax.get_xticks(minor=minor), ax.get_xticklabels(minor=minor))
          if lo <= tick <= hi]


def _rows(key, values):
  return [dict(overrides={key: v}, best=0.5 + 0.01 * i, status="finished") for i, v in enumerate(values)]


def test_plot_axis_comes_from_the_search_space(tmp_path):
  exp, command = write_fixture(tmp_path)
  workdir = tmp_path / "space"
  result = sweep_tool.launch(f"{exp}:space", str(workdir), trial_command=command, num_trials=4, log=_quiet)
  axes = json.loads((workdir / "sweep.json").read_text())["axes"]
  assert axes == {"lr": {"scale": "log", "range": [1e-3, 1.0]}, "model.depth": {"scale": "categorical"}}
  assert (workdir / "metric_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
  ax = report.metric_figure(result["rows"], "lr", "val/score", axes["lr"]).axes[0]
  assert ax.get_xscale() == "log"
  assert _visible_tick_labels(ax) == ["1e-3", "1e-2", "1e-1", "1"]  # decades over the search range
  assert set(_visible_tick_labels(ax, minor=True)) == {""}  # unlabelled minor ticks: no clutter
  assert isinstance(ax.xaxis.get_major_formatter(), ticker.FuncFormatter)
  assert [report.log_tick_label(x) for x in (1e-4, 2.5e-4, 1.0, 50.0)] == ["1e-4", "2.5e-4", "1", "5e1"]

  sp = {"lr": space.loguniform(2e-3, 6e-3), "wd": space.uniform(0.001, 1.0), "norm": space.choice(["in", "bn"])}
  axes = space.plot_axes(sp)
  # The scale follows the distribution, not the spread: values within half a decade still get a log axis,
  # uniform values spanning three decades stay linear.
  ax = report.metric_figure(_rows("lr", [2.1e-3, 3e-3, 5.5e-3]), "lr", "m", axes["lr"]).axes[0]
  assert ax.get_xscale() == "log" and _visible_tick_labels(ax) == ["2e-3", "3e-3", "4e-3", "5e-3", "6e-3"]
  ax = report.metric_figure(_rows("wd", [0.001, 0.01, 0.9]), "wd", "m", axes["wd"]).axes[0]
  assert ax.get_xscale() == "linear" and ax.get_xlim()[0] < 0.001 and ax.get_xlim()[1] > 0.9
  ax = report.metric_figure(_rows("norm", ["in", "bn", "in"]), "norm", "m", axes["norm"]).axes[0]
  assert ax.get_xscale() == "linear" and _visible_tick_labels(ax) == ["in", "bn"]  # categories, as listed
  # A grid's axis is a list of values, i.e. a choice: categories, numbers in increasing order.
  grid_axes = space.plot_axes(space.product(lr=[1e-2, 1e-4, 1e-3]))
  assert grid_axes == {"lr": {"scale": "categorical"}}
  ax = report.metric_figure(_rows("lr", [1e-2, 1e-4, 1e-3]), "lr", "m", grid_axes["lr"]).axes[0]
  assert ax.get_xscale() == "linear" and _visible_tick_labels(ax) == ["0.0001", "0.001", "0.01"]
