"""The notebooks run headless against a tiny run made here."""

import os

import nbclient
import nbformat

from medjax import config_lib, train

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_load_checkpoint_notebook_runs(tmp_path, monkeypatch):
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "synthetic_unet.py") + ":quick=true")
  config.mesh = (("data", 1),)
  workdir = tmp_path / "run"
  train.main(config, str(workdir))

  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "load_checkpoint.ipynb"), as_version=4)
  monkeypatch.setenv("MEDJAX_WORKDIR", str(workdir))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.path.abspath(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))
  assert "unet at step 4" in text
  assert "Dice organ:" in text
