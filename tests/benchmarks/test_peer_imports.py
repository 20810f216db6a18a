"""The benchmark scripts that call PyTorch peers import them only inside their functions, so importing a module
(its docstring, its argument parser, the medjax side) works without the `peers` extra."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("module,peers", [("benchmarks.torch_step", ("torch", "monai")),
                                          ("benchmarks.interpret_speed", ("torch", "captum"))])
def test_module_import_does_not_import_the_peers(module, peers):
  result = subprocess.run([sys.executable, "-c", f"import sys; import {module}; "
                           f"print(*[name in sys.modules for name in {peers!r}])"], cwd=_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["False"] * len(peers)
