"""Helpers for tests/test_import_contracts.py.

- `lint(root)` runs import-linter (`.importlinter` of `root`) on the `medjax` package under `root` in a fresh
  interpreter with `root` first on the path, so a copy made by `copy_repo` is analysed instead of the
  installed package, and splits the report by contract.
- `module_cycles(root)`: import cycles between single modules (a package counts as its `__init__`), which
  import-linter's `acyclic_siblings` does not report when a submodule imports its own package's `__init__`.
- `experiment_import_violations(path)`: the imports of an experiment file that are not allowed there.
- `heavy_modules_after_loading(paths)`: what loading each experiment (and its sweep) pulls into sys.modules.

Run as a script (`python tests/import_contract_testing.py cycles|load EXPERIMENT...`) it prints JSON; the
tests run it that way, in a subprocess, so that the copy of the package is the one found.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "medjax"
CONFIG_NAME = ".importlinter"
CONFIG = ROOT / CONFIG_NAME

# Contract 6: the modules allowed to import medjax.train, medjax.main and medjax.tools.
ENTRY_POINTS = ("medjax.main", "medjax.tools", "medjax.sweep")

# Experiment files (rule 8): what they may import, besides the standard library and each other.
EXPERIMENT_ALLOWED = ("ml_collections", "medjax.config_lib")
# ... and what they may import only inside a function (get_sweep): JAX-free helpers.
EXPERIMENT_ALLOWED_LAZY = ("medjax.sweep",)
# Loading an experiment (config or sweep) must leave these out of sys.modules.
HEAVY_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax", "chex", "tensorflow", "tensorflow_datasets",
                 "grain", "torch")

_LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


# ----------------------------------------------------------------------------------------- import-linter

def read_contracts(config: Path = CONFIG) -> Dict[str, dict]:
  """The contracts of `config` by id: {"name", "type", and the contract's options as lists or strings}."""
  from importlinter import api
  return {c["id"]: c for c in api.read_configuration(str(config))["contracts_options"]}


def top_level_modules(root: Path = ROOT) -> List[str]:
  """`medjax.x` for each module and subpackage directly under `root/medjax`."""
  names = []
  for entry in sorted((root / PACKAGE).iterdir()):
    if entry.suffix == ".py" and entry.stem != "__init__":
      names.append(f"{PACKAGE}.{entry.stem}")
    elif entry.is_dir() and (entry / "__init__.py").is_file():
      names.append(f"{PACKAGE}.{entry.name}")
  return names


@dataclasses.dataclass
class Report:
  """A lint-imports run: exit code, full text, and per contract name its verdict and broken-contract text."""
  returncode: int
  output: str
  status: Dict[str, str]    # contract name -> "KEPT" | "BROKEN"
  sections: Dict[str, str]  # contract name -> its part of the "Broken contracts" report ("" when kept)

  def broken(self, name: str) -> bool:
    return self.status.get(name) == "BROKEN"


def parse_report(output: str, names: Sequence[str]) -> Report:
  lines = output.splitlines()
  status = {}
  for line in lines:
    for name in names:
      for verdict in ("KEPT", "BROKEN"):
        if line == f"{name} {verdict}" or line.startswith(f"{name} {verdict} ["):  # "[0.001s]" with timings
          status[name] = verdict
  # A broken contract's section starts with its name underlined by dashes and runs to the next such header.
  headers = [(i, line) for i, line in enumerate(lines[:-1])
             if line in names and lines[i + 1] == "-" * len(line)]
  sections = {}
  for k, (i, name) in enumerate(headers):
    end = headers[k + 1][0] if k + 1 < len(headers) else len(lines)
    sections[name] = "\n".join(lines[i + 2:end]).strip() + "\n"
  return Report(0, output, status, sections)


def lint(root: Path = ROOT, contract_ids: Sequence[str] = (), timeout: float = 120) -> Report:
  """Runs lint-imports with `root/.importlinter` on the medjax package under `root`."""
  cmd = [sys.executable, "-c", _LINT, "--no-cache", "--no-logo", str(root / CONFIG_NAME)]
  for contract_id in contract_ids:
    cmd += ["--contract", contract_id]
  result = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout,
                          check=False)
  output = result.stdout + result.stderr
  contracts = read_contracts(root / CONFIG_NAME)
  report = parse_report(output, [c["name"] for c in contracts.values()])
  report.returncode = result.returncode
  return report


def copy_repo(dest: Path, root: Path = ROOT) -> Path:
  """Copies the medjax package and .importlinter of `root` into `dest` (no caches); returns `dest`."""
  shutil.copytree(root / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  shutil.copy(root / CONFIG_NAME, dest / CONFIG_NAME)
  return dest


def append_code(path: Path, code: str) -> int:
  """Appends `code` (one or more lines) to the file; returns the line number of its last line."""
  text = path.read_text()
  if not text.endswith("\n"):
    text += "\n"
  text += "\n" + code.rstrip("\n") + "\n"
  path.write_text(text)
  return text.count("\n")


def _env(root: Path) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
  env["COLUMNS"] = "1000"  # import-linter prints through rich, which wraps long lines at 80 columns otherwise
  env["NO_COLOR"] = "1"
  return env


def _run_script(root: Path, *args: str, timeout: float = 120) -> dict:
  result = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=timeout, check=False)
  if result.returncode:
    raise RuntimeError(f"{Path(__file__).name} {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
  return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------- module cycles

def module_cycles(root: Path = ROOT) -> List[dict]:
  """Strongly connected components (>1 module) of the module-level import graph of the package under `root`.

  Each is {"modules": [...], "imports": ["a -> b (l.N)", ...]} with the imports inside the component.
  """
  return _run_script(root, "cycles")["cycles"]


def _find_module_cycles() -> List[dict]:
  import grimp
  graph = grimp.build_graph(PACKAGE, cache_dir=None)
  modules = sorted(graph.modules)
  edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
  cycles = []
  for component in _strongly_connected_components(modules, edges):
    if len(component) < 2:
      continue
    members = set(component)
    imports = []
    for importer in sorted(component):
      for imported in edges[importer]:
        if imported in members:
          details = graph.get_import_details(importer=importer, imported=imported)
          lines = ", ".join(f"l.{d['line_number']}" for d in details)
          imports.append(f"{importer} -> {imported} ({lines})")
    cycles.append({"modules": sorted(component), "imports": imports})
  return cycles


def _strongly_connected_components(nodes: Sequence[str], edges: Dict[str, List[str]]) -> List[List[str]]:
  """Tarjan's algorithm, iterative (no recursion limit on long chains)."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  on_stack = set()
  components = []
  for start in nodes:
    if start in index:
      continue
    work = [(start, 0)]
    while work:
      node, i = work.pop()
      if i == 0:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
      successors = edges.get(node, [])
      if i < len(successors):
        work.append((node, i + 1))
        nxt = successors[i]
        if nxt not in index:
          work.append((nxt, 0))
        elif nxt in on_stack:
          low[node] = min(low[node], index[nxt])
        continue
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        components.append(component)
      if work:
        parent = work[-1][0]
        low[parent] = min(low[parent], low[node])
  return components


# ------------------------------------------------------------------------------------------ experiments

def experiment_import_violations(path: Path) -> List[str]:
  """`file:line: import x` for each import of an experiment file that rule 8 does not allow.

  Allowed anywhere: the standard library, ml_collections, medjax.config_lib and the other experiment files;
  inside a function only: EXPERIMENT_ALLOWED_LAZY (JAX-free helpers such as medjax.sweep for get_sweep).
  """
  path = Path(path)
  siblings = {p.stem for p in path.parent.glob("*.py")}
  tree = ast.parse(path.read_text(), filename=str(path))
  lazy_lines = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      lazy_lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
  violations = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [(alias.name, f"import {alias.name}") for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        names = ", ".join(alias.name for alias in node.names)
        violations.append(f"{path.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {names} "
                          "(relative)")
        continue
      # `from medjax import config_lib` imports the module medjax.config_lib (the name may be a module).
      names = [(f"{node.module}.{alias.name}", f"from {node.module} import {alias.name}") for alias in node.names]
    else:
      continue
    for name, statement in names:
      if not _experiment_may_import(name, lazy=node.lineno in lazy_lines, siblings=siblings):
        violations.append(f"{path.name}:{node.lineno}: {statement}")
  return sorted(violations, key=lambda v: int(v.split(":")[1]))


def _experiment_may_import(name: str, lazy: bool, siblings: set) -> bool:
  def under(prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)
  top = name.split(".")[0]
  if top == PACKAGE:
    return under(EXPERIMENT_ALLOWED) or (lazy and under(EXPERIMENT_ALLOWED_LAZY))
  return (top in sys.stdlib_module_names or under(EXPERIMENT_ALLOWED) or top in siblings
          or top == "experiments" or top == "__future__")


def heavy_modules_after_loading(paths: Sequence[Path], root: Path = ROOT) -> Dict[str, dict]:
  """Per experiment, in one fresh interpreter: {"config": the HEAVY_MODULES that `config_lib.load_config(path)`
  (no argument) brought into sys.modules, "sweep": those that `medjax.sweep.trials.load_sweep(path)` (what the
  sweep launcher calls) then brought, or None without get_sweep}."""
  return _run_script(root, "load", *[str(p) for p in paths])


def _load_experiments(paths: Sequence[str]) -> Dict[str, dict]:
  def heavy():
    return {m for m in sys.modules if m in HEAVY_MODULES}
  from medjax import config_lib
  results = {}
  for path in paths:
    before = heavy()
    config_lib.load_config(path)
    result = {"config": sorted(heavy() - before), "sweep": None}
    tree = ast.parse(Path(path).read_text())
    if any(isinstance(n, ast.FunctionDef) and n.name == "get_sweep" for n in tree.body):
      from medjax.sweep import trials
      before = heavy()
      trials.load_sweep(path)
      result["sweep"] = sorted(heavy() - before)
    results[path] = result
  return results


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # the package under the working directory first (PYTHONPATH also says so)
  if sys.argv[1] == "cycles":
    print(json.dumps({"cycles": _find_module_cycles()}))
  elif sys.argv[1] == "load":
    print(json.dumps(_load_experiments(sys.argv[2:])))
  else:
    raise SystemExit(f"unknown command {sys.argv[1]!r}")
