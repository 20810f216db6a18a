"""Sweeps, SLURM and optuna backends: submitit's LocalExecutor running trials, the sbatch script of a 2-node
8-GPU trial, and an optuna study with pruning and resume (trials through a fake train.main)."""

import json
import os
import types

import pytest

from medjax import config_lib
from medjax.sweep import optuna_search, slurm
from medjax.tools import sweep as sweep_tool
from tests.tools.sweep_testing import ROOT, calls, fake_score, write_fixture


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _quiet(*args):
  del args


def test_submitit_local_executor_runs_the_trials(tmp_path):
  exp, command = write_fixture(tmp_path)
  (tmp_path / "exp2.py").write_text((tmp_path / "exp.py").read_text().replace(
      'sweep.product(lr=[0.1, 0.01], **{"model.depth": [2, 3]})', '[{"lr": 0.1}, {"model.detph": 3}]'))
  result = sweep_tool.launch(str(tmp_path / "exp2.py"), str(tmp_path / "sw"), "slurm", cluster="local",
                             trial_command=command, log=_quiet)
  first, second = result["rows"]
  assert (first["status"], first["best"], first["error"]) == ("finished", pytest.approx(fake_score(0.1, 2)), "")
  assert second["status"] == "failed" and "Unknown config key 'model.detph'" in second["error"]
  doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
  assert all(t["job_id"] for t in doc["trials"]) and doc["backend"] == "slurm"
  assert os.listdir(tmp_path / "sw" / "slurm_logs")  # submitit's pickles and logs
  # Relaunching submits nothing for the finished trial.
  sweep_tool.launch(str(tmp_path / "exp2.py"), str(tmp_path / "sw"), "slurm", cluster="local",
                    trial_command=command, log=_quiet)
  assert [c["name"] for c in calls(tmp_path)].count("lr=0.1") == 1


def test_sbatch_script_for_two_nodes_of_eight_gpus(tmp_path):
  options = slurm.SlurmOptions(partition="gpu", time_min=120, nodes=2, gpus_per_node=8, cpus_per_task=64,
                               mem_gb=400, account="proj", setup=["module load cuda/12.4"])
  text = slurm.sbatch_script(str(tmp_path / "logs"), options, num_trials=6)
  for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --cpus-per-task=64", "#SBATCH --partition=gpu", "#SBATCH --time=120",
               "#SBATCH --array=0-5%6", "#SBATCH --mem=400GB", "#SBATCH --account=proj",
               "#SBATCH --job-name=medjax_sweep", "module load cuda/12.4"):
    assert line in text.splitlines(), line
  assert "srun --unbuffered" in text and "-m submitit.core._submit" in text
  logged = []
  sweep_tool.launch(write_fixture(tmp_path)[0], str(tmp_path / "dry"), "slurm", dry_run=True,
                    nodes=2, gpus_per_node=8, log=logged.append)
  assert "#SBATCH --array=0-3%4" in logged[0] and not os.path.exists(tmp_path / "dry" / "sweep.json")
  logged.clear()  # a grid with --num_trials: an array of its first N trials
  sweep_tool.launch(write_fixture(tmp_path)[0], str(tmp_path / "dry"), "slurm", dry_run=True, num_trials=2,
                    log=logged.append)
  assert "#SBATCH --array=0-1%2" in logged[1] and "first 2 of the grid's 4 trials" in logged[0]
  with pytest.raises(ValueError, match="one node"):
    slurm.make_executor(str(tmp_path / "l"), options, cluster="local")


def test_each_node_task_gets_the_distributed_flags(monkeypatch):
  task = slurm.TrialTask(["python", "-m", "medjax.main"], "/tmp/x")
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  env = types.SimpleNamespace(num_tasks=2, hostnames=["gpu-a01", "gpu-a02"], global_rank=1, job_id="4240_2")
  assert task.distributed_flags(env) == ["--coordinator_address=gpu-a01:24242", "--num_processes=2",
                                         "--process_id=1"]
  assert task.distributed_flags(types.SimpleNamespace(num_tasks=1)) == []


# --------------------------------------------------------------------------------------------- optuna


class FakeTrain:
  """train.main stand-in: 4 evaluations with value = quality * step / 4, stopping when on_eval says so."""

  def __init__(self, interrupt_on_call=None):
    self.calls, self.interrupt_on_call = [], interrupt_on_call

  def __call__(self, config, workdir, *, on_eval=None):
    self.calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    quality = fake_score(0.1 if config.lr > 0.03 else 0.0, config.model.depth)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      for step in (1, 2, 3, 4):
        if len(self.calls) == self.interrupt_on_call and step == 2:
          raise KeyboardInterrupt
        value = quality * step / 4
        f.write(json.dumps({"step": step, "val/score": value}) + "\n")
        if on_eval(step, {"val/score": value, "val/num_cases": 4.0}):
          return {"step": step}
    return {"step": 4}


def test_optuna_study_prunes_resumes_and_reports_the_best_config(tmp_path):
  exp, _ = write_fixture(tmp_path)
  spec, workdir = f"{exp}:space", str(tmp_path / "tpe")
  first = FakeTrain(interrupt_on_call=4)
  with pytest.raises(KeyboardInterrupt):
    sweep_tool.launch(spec, workdir, "optuna", num_trials=6, train_fn=first, log=_quiet)
  assert os.path.exists(os.path.join(workdir, "optuna.db"))
  doc = json.loads((tmp_path / "tpe" / "sweep.json").read_text())
  assert [t["status"] for t in doc["trials"]][3] == "interrupted"
  interrupted_dir = first.calls[3]

  second = FakeTrain()
  result = sweep_tool.launch(spec, workdir, "optuna", num_trials=6, train_fn=second, log=_quiet)
  assert second.calls[0] == interrupted_dir  # resumed first, in its own workdir
  study = optuna_search.open_study(workdir, metric="val/score", mode="max")
  states = [t.state.name for t in study.trials]
  assert states.count("COMPLETE") + states.count("PRUNED") == 6 and "PRUNED" in states
  assert states.count("FAIL") == 1 and len(first.calls) + len(second.calls) == 7
  best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
  assert result["best"]["number"] == best.number and result["best"]["value"] == pytest.approx(best.value)
  with open(os.path.join(workdir, "best_config.json")) as f:
    best_config = config_lib.from_json(f.read())
  assert best_config.lr == pytest.approx(best.params["lr"]) and best_config.model.depth == best.params["model.depth"]
  statuses = [r["status"] for r in result["rows"]]
  assert len(statuses) == 6 and statuses.count("pruned") == states.count("PRUNED")  # the retry replaces
  assert sum(r["name"] == os.path.basename(interrupted_dir) for r in result["rows"]) == 1  # the interrupted row
  # The report's axes come from the study's distributions: lr was sampled with log=True.
  axes = json.loads((tmp_path / "tpe" / "sweep.json").read_text())["axes"]
  assert axes == {"lr": {"scale": "log", "range": [1e-3, 1.0]}, "model.depth": {"scale": "categorical"}}
  # Run again: the study already has its 6 trials, nothing trains.
  third = FakeTrain()
  sweep_tool.launch(spec, workdir, "optuna", num_trials=6, train_fn=third, log=_quiet)
  assert third.calls == []


def test_optuna_needs_on_eval_and_a_search_space(tmp_path):
  exp, _ = write_fixture(tmp_path)

  def old_main(config, workdir):
    del config, workdir

  with pytest.raises(RuntimeError, match="has no `on_eval` keyword"):
    sweep_tool.launch(f"{exp}:space", str(tmp_path / "a"), "optuna", num_trials=2, train_fn=old_main, log=_quiet)
  with pytest.raises(config_lib.ConfigError, match="needs get_sweep to return a search space"):
    sweep_tool.launch(exp, str(tmp_path / "b"), "optuna", num_trials=2, train_fn=FakeTrain(), log=_quiet)
