"""The notebooks run headless, as Jupyter runs them: in `notebooks/`, with no environment variable set.

Nothing is written into this repository: the notebooks are copied into a temporary tree laid out like it
(`pyproject.toml`, `notebooks/*.ipynb`, `runs/demo`, `runs/sweep2d`), the runs are made there by tiny quick
trainings (a 3D demo and a 2-trial 2D sweep, recorded in sweep.json and reported by the sweep's own report
writer), and the notebooks execute in memory from `<tree>/notebooks`. A second tree without runs holds the
notebooks only, for the "not there yet" messages and the environment-variable overrides.
"""

import json
import os
import shutil

import nbclient
import nbformat
import pytest

from medjax import config_lib, train
from medjax.sweep import report
from medjax.sweep import trials as trials_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("load_checkpoint.ipynb", "compare_runs.ipynb")
EXPERIMENT = os.path.join(ROOT, "experiments", "synthetic_unet.py")
METRIC = "val/dice_mean"


def _tree(base, with_runs: bool) -> str:
  """`base` laid out like the repository: the pyproject.toml marker and a copy of the notebooks."""
  os.makedirs(os.path.join(base, "notebooks"))
  with open(os.path.join(base, "pyproject.toml"), "w") as f:
    f.write('[project]\nname = "notebook-test-tree"\n')
  for name in NOTEBOOKS:
    shutil.copy(os.path.join(ROOT, "notebooks", name), os.path.join(base, "notebooks", name))
  if with_runs:
    _make_runs(os.path.join(base, "runs"))
  return str(base)


def _quick(arg: str, **overrides):
  config = config_lib.load_config(f"{EXPERIMENT}:{arg}")
  config.mesh = (("data", 1),)
  config.eval_every_steps = 2  # two validations in 4 steps: a learning curve, not a point
  return config_lib.apply_overrides(config, trials_lib.override_args(overrides)) if overrides else config


def _make_runs(runs: str) -> None:
  """runs/demo (the README demo's 3D U-Net, quick) and runs/sweep2d: the first and last trials of the README's
  2D sweep (`get_sweep`), trained in this process, recorded in sweep.json and reported as the launcher does."""
  train.main(_quick("quick=true"), os.path.join(runs, "demo"))
  spec = f"{EXPERIMENT}:quick=true,dims=2"
  grid = trials_lib.load_sweep(spec)
  sweep_dir = os.path.join(runs, "sweep2d")
  state = trials_lib.SweepState(sweep_dir, dict(config=spec, config_path=spec, backend="local", metric=METRIC,
                                                mode="max"), [grid[0], grid[-1]])
  for index, record in enumerate(state.records):
    train.main(_quick("quick=true,dims=2", **record["overrides"]), record["workdir"])
    state.update(index, status="finished")
  report.write_report(sweep_dir, METRIC, "max")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
  """A tree with the runs the notebooks open by default."""
  return _tree(tmp_path_factory.mktemp("repo"), with_runs=True)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> str:
  """A tree without runs/."""
  return _tree(tmp_path_factory.mktemp("bare"), with_runs=False)


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch):
  # The kernel inherits this environment: no overrides unless a test sets one, Jupyter's inline plots, and
  # this checkout's medjax.
  for name in ("MEDJAX_WORKDIR", "MEDJAX_SWEEP_DIR", "MPLBACKEND"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _execute(tree: str, name: str, cells=None, probe: str = ""):
  """Runs notebooks/`name` of `tree` from `tree/notebooks` (its first `cells` cells, plus a `probe` cell);
  returns the executed notebook (never written anywhere)."""
  notebook = nbformat.read(os.path.join(tree, "notebooks", name), as_version=4)
  notebook.cells = notebook.cells[:cells]
  if probe:
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(tree, "notebooks")}})
  client.execute()
  return notebook


def _text(notebook) -> str:
  return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))


def _images(notebook) -> int:
  return sum("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
             for out in cell.get("outputs", []))


def _trial_names(repo: str) -> list:
  with open(os.path.join(repo, "runs", "sweep2d", "sweep.json")) as f:
    return [t["name"] for t in json.load(f)["trials"]]


# ------------------------------------------------------------------------------------------ the files


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_without_outputs_or_absolute_paths(name):
  with open(os.path.join(ROOT, "notebooks", name)) as f:
    raw = f.read()
  notebook = nbformat.reads(raw, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
  assert ROOT not in raw and "/home/" not in raw and "/tmp/" not in raw


# ------------------------------------------------------------------------------------------ load_checkpoint


def test_load_checkpoint_opens_runs_demo_of_the_repository_from_notebooks(repo):
  probe = "print(fig.get_suptitle()); print([t.get_text() for t in fig.legends[0].get_texts()])"
  notebook = _execute(repo, "load_checkpoint.ipynb", probe=probe)
  text = _text(notebook)
  demo = os.path.join(os.path.realpath(repo), "runs", "demo")
  assert f"run: {demo}\n" in text and f"unet at step 4 from {demo}\n" in text
  assert "Dice organ:" in text and "Dice lesion:" in text
  assert _images(notebook) == 1
  # The figure: the slice in the title, the classes in the legend.
  assert "unet, step 4: validation case 0, axial slice z=" in text and " of 16 (Dice organ " in text
  assert "['0 background', '1 organ', '2 lesion']" in text


def test_load_checkpoint_takes_medjax_workdir_relative_to_the_repository(repo, monkeypatch):
  trial = os.path.join("runs", "sweep2d", _trial_names(repo)[0])
  monkeypatch.setenv("MEDJAX_WORKDIR", trial)
  text = _text(_execute(repo, "load_checkpoint.ipynb", cells=3))  # the intro, where the run is, loading it
  assert f"unet at step 4 from {os.path.join(os.path.realpath(repo), trial)}\n" in text


# ------------------------------------------------------------------------------------------ compare_runs


def test_compare_runs_opens_runs_sweep2d_of_the_repository_from_notebooks(repo):
  probe = ("print(labels); print(fig.get_suptitle()); print([ax.get_title() for ax in fig.axes]); "
           "print([t.get_text() for t in fig.legends[0].get_texts()])")
  notebook = _execute(repo, "compare_runs.ipynb", probe=probe)
  text = _text(notebook)
  sweep = os.path.join(os.path.realpath(repo), "runs", "sweep2d")
  with open(os.path.join(sweep, "results.csv")) as f:
    assert f.readline().startswith(f"name,status,lr,model.features,best {METRIC},")
  first, last = "lr=0.005, model.features=(4, 8)", "lr=0.001, model.features=(8, 16)"
  assert f"sweep: {sweep}\n" in text and f"2 trials, ranked by the best {METRIC} (max):" in text
  assert all(f"  {label}" in text for label in (first, last))
  assert f"[{first!r}, {last!r}]" in text  # the learning curves' legend, in sweep order
  assert f"step 4 (best by {METRIC}), {METRIC} " in text  # both checkpoints loaded
  assert text.count("validation case 0 Dice background ") == 2
  assert "validation case 0, 2D image: the best checkpoints of two trials" in text
  assert "'image', 'reference', " in text and "\\nstep 4: Dice organ " in text
  assert "['0 background', '1 organ', '2 lesion']" in text
  assert _images(notebook) == 2  # learning curves, predictions side by side


def test_compare_runs_takes_medjax_sweep_dir_moved_and_without_its_report(repo, bare, monkeypatch):
  # A sweep copied elsewhere (sweep.json still names the old trial folders) before its report was written.
  moved = os.path.join(bare, "elsewhere", "my_sweep")
  shutil.copytree(os.path.join(repo, "runs", "sweep2d"), moved, ignore=shutil.ignore_patterns("results.*"))
  monkeypatch.setenv("MEDJAX_SWEEP_DIR", moved)  # absolute; the bare tree has no runs/sweep2d
  notebook = _execute(bare, "compare_runs.ipynb", cells=4)  # the intro, where the sweep is, the table, curves
  text = _text(notebook)
  assert f"sweep: {os.path.realpath(moved)}\n" in text and "results.csv not written yet" in text
  assert f"2 trials, ranked by the best {METRIC} (max):" in text and " best 0." in text
  assert "no metrics.jsonl" not in text and _images(notebook) == 1


# ------------------------------------------------------------------------------------------ not there yet


@pytest.mark.parametrize("name, variable, expected", [
    pytest.param("load_checkpoint.ipynb", None,
     "No run at {tree}/runs/demo yet: create it with `python -m medjax.main --config experiments/synthetic_unet.py "
     "--workdir runs/demo` in {tree} (a few minutes on a CPU), or set MEDJAX_WORKDIR to another run's folder.", id="load_checkpoint"),
    pytest.param("load_checkpoint.ipynb", "MEDJAX_WORKDIR",
     "No medjax run at {tree}/runs/nothing (from MEDJAX_WORKDIR): point it at a folder written by "
     "`python -m medjax.main --workdir ...`, or unset it to open runs/demo.", id="load_checkpoint-variable"),
    pytest.param("compare_runs.ipynb", None,
     "No sweep at {tree}/runs/sweep2d yet: run it with `python -m medjax.tools.sweep --config "
     "experiments/synthetic_unet.py:dims=2 --workdir runs/sweep2d --parallel 2` in {tree}, or set "
     "MEDJAX_SWEEP_DIR to another sweep's folder.", id="compare_runs"),
])
def test_a_missing_run_is_one_sentence_in_the_first_cell(bare, monkeypatch, name, variable, expected):
  if variable:
    monkeypatch.setenv(variable, "runs/nothing")
  notebook = nbformat.read(os.path.join(bare, "notebooks", name), as_version=4)
  with pytest.raises(nbclient.exceptions.CellExecutionError):
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(bare, "notebooks")}}).execute()
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  (error,) = code[0].outputs
  assert error.output_type == "error" and error.ename == "NotFound"
  assert error.traceback == [expected.format(tree=os.path.realpath(bare))]  # the message, no traceback
  assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code[1:])
