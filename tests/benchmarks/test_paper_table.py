"""benchmarks/paper_table.py on fake run workdirs (config.json + results.json as train.main writes them)."""

import json
import os

import pytest

from benchmarks import paper_table


def _write_run(root, name, *, subset="breastmnist", model="resnet18", conv="2d", size=28, recipe="official",
               seed=0, auc_best=None, acc_best=None, auc_last=None, acc_last=None, wall_s=60.0,
               status="finished", results=True):
  workdir = os.path.join(root, name)
  os.makedirs(os.path.join(workdir, "checkpoints"))
  config = {"seed": seed, "model_name": model, "data": {"name": "medmnist", "subset": subset, "size": size},
            "tags": {"experiment": "medmnist_resnet", "subset": subset, "model": model, "conv": conv,
                     "size": size, "recipe": recipe}}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  if results:
    body = {"status": status, "step": 500, "best": {"metric": "val/auc", "value": 0.9, "step": 300},
            "final": {"val/auc": 0.9}, "test": {"test/auc": auc_last, "test/accuracy": acc_last},
            "test_best": {"test_best/auc": auc_best, "test_best/accuracy": acc_best}, "wall_s": wall_s,
            "resumed_from_step": 0}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(body, f)
  return workdir


def _rows(table):
  return {tuple(c.strip() for c in line.strip("|").split("|"))[:5]: [c.strip() for c in line.strip("|").split("|")]
          for line in table.splitlines()[2:] if line.startswith("|")}


def test_table_means_stds_published_and_deltas(tmp_path, capsys):
  sweep = tmp_path / "sweep"
  envs = [{"git_commit": "a" * 40, "git_dirty": False}, {"git_commit": "b" * 40, "git_dirty": True}, None]
  for seed, (auc, acc) in enumerate([(0.90, 0.80), (0.92, 0.84), (0.94, 0.88)]):
    workdir = _write_run(str(sweep), f"trial_{seed}", seed=seed, auc_best=auc, acc_best=acc, auc_last=auc - 0.1,
                         acc_last=acc - 0.1, wall_s=60.0 * (seed + 1))
    if envs[seed]:  # env.json as train.main writes it; trial_2 predates env.json
      with open(os.path.join(workdir, "env.json"), "w") as f:
        json.dump(envs[seed], f)
  single = _write_run(str(tmp_path), "acs", subset="adrenalmnist3d", conv="acs", seed=0, auc_best=0.85,
                      acc_best=0.75, auc_last=0.8, acc_last=None, wall_s=90.0)
  out = tmp_path / "tables" / "table.md"
  table = paper_table.main(["--runs", str(sweep), single, "--out", str(out)])
  assert out.read_text() == table == capsys.readouterr().out
  rows = _rows(table)
  breast = rows[("breastmnist", "resnet18", "2d", "28", "official")]
  # mean ± sample std: AUC 0.92 ± 0.02, ACC 0.84 ± 0.04; published 0.901 / 0.863 (MedMNIST v2, Table 3)
  assert breast[5:] == ["0,1,2", "0.920 ± 0.020", "0.840 ± 0.040", "0.820 ± 0.020", "0.740 ± 0.040",
                        "0.901 / 0.863", "+0.019", "-0.023", "2.0 ± 1.0", "?, aaaaaaa, bbbbbbb+dirty"]
  acs = rows[("adrenalmnist3d", "resnet18", "acs", "28", "official")]
  assert acs[5:] == ["0", "0.850", "0.750", "0.800", "-", "0.839 / 0.754", "+0.011", "-0.004", "1.5", "?"]
  assert "Scientific Data 10, 41" in table


def test_groups_by_recipe_and_marks_unpublished_and_unfinished(tmp_path):
  _write_run(str(tmp_path), "a", recipe="improved", model="vit_hybrid", auc_best=0.93, acc_best=0.9)
  _write_run(str(tmp_path), "b", recipe="official", seed=1, auc_best=0.88, acc_best=0.85, status="stopped")
  _write_run(str(tmp_path), "c", seed=2, results=False)
  short = _write_run(str(tmp_path), "s", recipe="improved", seed=0, auc_best=0.7, acc_best=0.6)
  quick = _write_run(str(tmp_path), "q", seed=0, auc_best=0.5, acc_best=0.5)
  for workdir, tags in ((quick, {"quick": True}), (short, {"epochs": 60, "tta": True, "mixup": 0.4, "balance": 0.5})):
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    config["tags"].update(tags)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config, f)
  table = paper_table.main(["--runs", str(tmp_path)])
  rows = _rows(table)
  assert rows[("breastmnist", "vit_hybrid", "2d", "28", "improved")][10:13] == ["-", "-", "-"]
  assert rows[("breastmnist", "resnet18", "2d", "28", "official")][5] == "1 (1 stopped)"
  assert rows[("breastmnist", "resnet18", "2d", "28", "official (quick)")][6] == "0.500"
  improved = "improved, 60 epochs + mixup 0.4 + balanced^0.5 + flip TTA"
  assert rows[("breastmnist", "resnet18", "2d", "28", improved)][6] == "0.700"
  assert f"Unfinished (no results.json yet): {os.path.join(str(tmp_path), 'c')}." in table


def test_published_numbers_are_the_readme_facts():
  assert paper_table.PUBLISHED == {
      ("breastmnist", "resnet18", "2d", 28): (0.901, 0.863), ("breastmnist", "resnet50", "2d", 28): (0.857, 0.812),
      ("pneumoniamnist", "resnet18", "2d", 28): (0.944, 0.854),
      ("pneumoniamnist", "resnet50", "2d", 28): (0.948, 0.854),
      ("adrenalmnist3d", "resnet18", "3d", 28): (0.827, 0.721),
      ("adrenalmnist3d", "resnet18", "acs", 28): (0.839, 0.754)}


def test_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    paper_table.main(["--runs", str(tmp_path / "nope")])
  with pytest.raises(SystemExit, match="no run workdirs"):
    paper_table.main(["--runs", str(tmp_path)])
  workdir = _write_run(str(tmp_path), "x", auc_best=0.9)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"seed": 0}, f)
  with pytest.raises(ValueError, match=r"config.json has no config.tags \['subset'"):
    paper_table.main(["--runs", str(tmp_path)])


def test_partial_wall_time_of_an_old_resumed_run_is_left_out(tmp_path):
  """Runs from before results.json summed the sessions: two compile records mean wall_s is partial."""
  whole = _write_run(str(tmp_path), "whole", seed=0, auc_best=0.9, acc_best=0.8, wall_s=600.0)
  partial = _write_run(str(tmp_path), "partial", seed=1, auc_best=0.9, acc_best=0.8, wall_s=60.0)
  for workdir, sessions in ((whole, 1), (partial, 2)):
    path = os.path.join(workdir, "results.json")
    with open(path) as f:
      body = json.load(f)
    del body["resumed_from_step"]
    with open(path, "w") as f:
      json.dump(body, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps({"step": 1 + 100 * i, "compile_s": 3.0}) + "\n" for i in range(sessions))
  row = _rows(paper_table.main(["--runs", str(tmp_path)]))[("breastmnist", "resnet18", "2d", "28", "official")]
  assert row[-2:] == ["10.0 (1 partial left out)", "?"]
