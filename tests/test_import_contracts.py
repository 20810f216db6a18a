"""The import rules of medjax (.importlinter) hold, and each one fails on a deliberately bad import.

Contracts (ids in .importlinter): 1 models-no-training, 2 steps-no-config, 3a losses-are-leaves,
3b metrics-are-leaves, 4 data-no-models-or-training, 5 config-lib-imports-nothing,
6 only-entry-points-import-train, 7 no-cycles, L layers. Checked here beyond import-linter: 7b cycles between
single modules (a submodule importing its own package's `__init__`), and 8 experiment files (their imports,
and that loading them leaves JAX unloaded).

Each negative test copies the package to tmp_path, appends one bad import and runs the contract on the copy:
the contract must be broken there and its report must name the new import (with its line), which the report
of the real tree does not. So the negative tests hold whether or not the real tree keeps the contract today.
"""

import glob
import os
from pathlib import Path

import pytest

from tests import import_contract_testing as ict

EXPERIMENTS = sorted(Path(p) for p in glob.glob(str(ict.ROOT / "experiments" / "*.py")))


def _lazy(statement):
  """`statement` inside a function: import-linter counts imports in function bodies too."""
  return f"def _deliberately_bad_import():\n  {statement}\n"


@pytest.fixture(scope="module")
def contracts():
  return ict.read_contracts()


@pytest.fixture(scope="module")
def real_report():
  """One lint-imports run over every contract on the real tree."""
  return ict.lint()


def test_contracts_hold(contracts, real_report):
  names = [c["name"] for c in contracts.values()]
  assert set(real_report.status) == set(names), (
      f"lint-imports did not check every contract (a configuration error?):\n{real_report.output}")
  broken = [name for name in names if real_report.broken(name)]
  assert not broken and real_report.returncode == 0, (
      f"Broken import contracts: {broken}\n\n{real_report.output}")


def test_every_top_level_module_is_classified(contracts):
  """A new top-level module must be placed in the contracts that list modules one by one (import-linter
  errors on a listed module that does not exist, so these lists cannot name modules ahead of time)."""
  modules = set(ict.top_level_modules())
  sources = set(contracts["only-entry-points-import-train"]["source_modules"])
  assert sources | set(ict.ENTRY_POINTS) == modules, (
      f"contract only-entry-points-import-train: add {sorted(modules - sources - set(ict.ENTRY_POINTS))} to "
      f"source_modules (unless it is an entry point); remove {sorted(sources - modules)}")
  # Contracts that allow a few modules and forbid all the others.
  allowed = {
      "models-no-training": {"medjax.models", "medjax.registry", "medjax.typing"},
      "losses-are-leaves": {"medjax.losses", "medjax.metrics", "medjax.registry", "medjax.typing", "medjax.atomic"},
      "metrics-are-leaves": {"medjax.metrics", "medjax.registry", "medjax.typing"},
  }
  for contract_id, allowed_modules in allowed.items():
    forbidden = {m for m in contracts[contract_id]["forbidden_modules"] if m.startswith("medjax.")}
    assert forbidden == modules - allowed_modules, (
        f"contract {contract_id}: add {sorted(modules - allowed_modules - forbidden)} to forbidden_modules; "
        f"remove {sorted(forbidden - (modules - allowed_modules))}")
  layered = {f"medjax.{name.strip().strip('()')}" for layer in contracts["layers"]["layers"]
             for name in layer.replace("|", ":").split(":")}
  assert layered == modules, f"contract layers: add {sorted(modules - layered)}, remove {sorted(layered - modules)}"


def test_unmodified_copy_gives_the_real_verdicts(tmp_path, real_report):
  """The negative tests analyse a copy under tmp_path: without changes it must lint like the real tree."""
  report = ict.lint(ict.copy_repo(tmp_path))
  assert report.status == real_report.status, report.output


# (contract id, file to append to, bad code, texts the contract's report must then contain; {line} is the
# line of the last appended line, i.e. of the import statement).
BAD_IMPORTS = [
    ("models-no-training", "medjax/models/unet.py", "from medjax import train",
     ("medjax.models is not allowed to import medjax.train:", "medjax.models.unet -> medjax.train (l.{line})")),
    ("models-no-training", "medjax/models/layers.py", _lazy("from medjax.data import pipeline"),
     ("medjax.models is not allowed to import medjax.data:",
      "medjax.models.layers -> medjax.data.pipeline (l.{line})")),
    ("steps-no-config", "medjax/steps.py", "import ml_collections",
     ("medjax.steps is not allowed to import ml_collections:", "medjax.steps -> ml_collections (l.{line})")),
    ("steps-no-config", "medjax/steps.py", _lazy("from medjax import config_lib"),
     ("medjax.steps is not allowed to import medjax.config_lib:", "medjax.steps -> medjax.config_lib (l.{line})")),
    ("losses-are-leaves", "medjax/losses/overlap.py", "from medjax import models",
     ("medjax.losses is not allowed to import medjax.models:", "medjax.losses.overlap -> medjax.models (l.{line})")),
    ("metrics-are-leaves", "medjax/metrics/counts.py", "from medjax.losses import overlap",
     ("medjax.metrics is not allowed to import medjax.losses:",
      "medjax.metrics.counts -> medjax.losses.overlap (l.{line})")),
    ("data-no-models-or-training", "medjax/data/pipeline.py", "from medjax.models import unet",
     ("medjax.data is not allowed to import medjax.models:", "medjax.data.pipeline -> medjax.models.unet (l.{line})")),
    ("data-no-models-or-training", "medjax/data/datasets/base.py", _lazy("from medjax import config_lib"),
     ("medjax.data is not allowed to import medjax.config_lib:",
      "medjax.data.datasets.base -> medjax.config_lib (l.{line})")),
    ("config-lib-imports-nothing", "medjax/config_lib.py", _lazy("from medjax import registry"),
     ("medjax.config_lib is not allowed to import medjax.registry:",
      "medjax.config_lib -> medjax.registry (l.{line})")),
    ("config-lib-imports-nothing", "medjax/config_lib.py", "import jax.numpy as jnp",
     ("medjax.config_lib is not allowed to import jax:", "medjax.config_lib -> jax (l.{line})")),
    ("only-entry-points-import-train", "medjax/checkpoint/__init__.py", _lazy("from medjax import train"),
     ("medjax.checkpoint is not allowed to import medjax.train:", "medjax.checkpoint -> medjax.train (l.{line})")),
    ("only-entry-points-import-train", "medjax/evaluators/base.py", "from medjax.tools import evaluate",
     ("medjax.evaluators is not allowed to import medjax.tools:",
      "medjax.evaluators.base -> medjax.tools.evaluate (l.{line})")),
    # medjax.models imports medjax.registry: registry -> models closes a cycle between top-level modules.
    ("no-cycles", "medjax/registry.py", _lazy("from medjax import models"),
     ("No cycles are allowed in medjax.\n",)),
    # calibration imports _checks: _checks -> calibration closes a cycle inside medjax.metrics.
    ("no-cycles", "medjax/metrics/_checks.py", "from medjax.metrics import calibration",
     ("No cycles are allowed in medjax.metrics.\n",)),
    ("layers", "medjax/typing.py", _lazy("from medjax import build"),
     ("medjax.typing is not allowed to import medjax.build:", "medjax.typing -> medjax.build (l.{line})")),
    # medjax.transfer sits with models and data: it may import models, never checkpoint, build or training.
    ("layers", "medjax/transfer/files.py", _lazy("from medjax import checkpoint"),
     ("medjax.transfer is not allowed to import medjax.checkpoint:",
      "medjax.transfer.files -> medjax.checkpoint (l.{line})")),
    ("models-no-training", "medjax/models/vgg.py", "from medjax import transfer",
     ("medjax.models is not allowed to import medjax.transfer:", "medjax.models.vgg -> medjax.transfer (l.{line})")),
]


@pytest.mark.parametrize("contract_id,path,code,expected", BAD_IMPORTS,
                         ids=[f"{c}:{os.path.basename(p)}{'(in-function)' if code.startswith('def ') else ''}"
                              for c, p, code, _ in BAD_IMPORTS])
def test_contract_fails_on_bad_import(tmp_path, contracts, real_report, contract_id, path, code, expected):
  name = contracts[contract_id]["name"]
  root = ict.copy_repo(tmp_path)
  line = ict.append_code(root / path, code)
  expected = [text.format(line=line) for text in expected]
  assert expected[-1] not in real_report.sections.get(name, ""), (
      f"the real tree already reports {expected[-1]!r}: pick another bad import for this test")
  report = ict.lint(root, [contract_id])
  assert report.returncode != 0 and report.broken(name), (
      f"{contract_id} still holds after appending to {path}:\n{code}\n{report.output}")
  assert f"{name} BROKEN" in report.output
  for text in expected:
    assert text in report.sections[name], f"{text!r} not in the report of {name}:\n{report.output}"


# ------------------------------------------------------------------------- 7b. cycles between modules

def _format_cycles(cycles):
  return "\n".join(f"cycle {c['modules']}:\n  " + "\n  ".join(c["imports"]) for c in cycles)


def test_no_module_level_cycles():
  """No cycle between single modules. Beyond contract 7: a submodule that imports its own package (for a
  name the `__init__` re-exports) while the `__init__` imports it is a cycle acyclic_siblings misses."""
  cycles = ict.module_cycles()
  assert not cycles, f"Import cycles between modules:\n{_format_cycles(cycles)}"


def test_module_level_cycle_check_fails_on_init_reexport_cycle(tmp_path):
  root = ict.copy_repo(tmp_path)
  # medjax/metrics/__init__.py imports medjax.metrics.counts; counts importing a re-export closes a cycle.
  line = ict.append_code(root / "medjax/metrics/counts.py", _lazy("from medjax.metrics import roc_auc"))
  cycles = ict.module_cycles(root)
  new = [c for c in cycles if "medjax.metrics.counts" in c["modules"]]
  assert new and new[0]["modules"] == ["medjax.metrics", "medjax.metrics.counts"], _format_cycles(cycles)
  assert f"medjax.metrics.counts -> medjax.metrics (l.{line})" in new[0]["imports"]


# -------------------------------------------------------------------------------- 8. experiment files

@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_imports_only_config_helpers(path):
  """Experiment files import the standard library, ml_collections, medjax.config_lib and each other (and
  JAX-free helpers such as medjax.sweep inside get_sweep): they load in a fraction of a second, no JAX."""
  assert ict.experiment_import_violations(path) == []


def test_experiment_import_check_fails_on_bad_imports(tmp_path):
  (tmp_path / "common.py").write_text("X = 1\n")
  bad = tmp_path / "bad_experiment.py"
  bad.write_text(
      "import os\n"                                    # 1 stdlib: fine
      "import ml_collections as mlc\n"                 # 2 fine
      "from medjax import config_lib\n"                # 3 fine
      "import common\n"                                # 4 another experiment file: fine
      "import jax\n"                                   # 5
      "from medjax import config_lib, models\n"        # 6 (models)
      "import numpy as np\n"                           # 7
      "from medjax import sweep\n"                     # 8 JAX-free, but only inside a function
      "from . import common\n"                         # 9
      "def get_sweep(arg=None):\n"
      "  from medjax import sweep\n"                   # 11 fine
      "  from medjax.data import datasets\n"           # 12
      "  return []\n")
  assert ict.experiment_import_violations(bad) == [
      "bad_experiment.py:5: import jax",
      "bad_experiment.py:6: from medjax import models",
      "bad_experiment.py:7: import numpy",
      "bad_experiment.py:8: from medjax import sweep",
      "bad_experiment.py:9: from . import common (relative)",
      "bad_experiment.py:12: from medjax.data import datasets",
  ]


def test_experiments_load_without_jax():
  """In a fresh interpreter, loading each experiment's config (default argument) and then its sweep, as the
  sweep launcher does, imports none of jax, flax, optax, orbax, tensorflow, ... (see ict.HEAVY_MODULES)."""
  loaded = ict.heavy_modules_after_loading(EXPERIMENTS)
  heavy = {path: result for path, result in loaded.items() if result["config"] or result["sweep"]}
  assert not heavy, f"loading these experiments imported heavy modules: {heavy}"


def test_jax_check_fails_on_an_experiment_that_imports_jax(tmp_path):
  bad = tmp_path / "jax_experiment.py"
  bad.write_text("import ml_collections as mlc\n\n\ndef get_config(arg=None):\n"
                 "  import jax  # a lazy import still loads JAX when the config is built\n"
                 "  return mlc.ConfigDict(dict(n=jax.device_count()))\n")
  loaded = ict.heavy_modules_after_loading([bad])
  assert "jax" in loaded[str(bad)]["config"], loaded
