"""benchmarks/interpret_speed.py: a --quick run (32^2 / 32^3, batch 1, 4 IG steps) prints the Markdown table, with
Captum rows when captum is installed and notes where it is not or where no torch peer exists (3D)."""

import os

from benchmarks import interpret_speed

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_METHODS = ("Grad-CAM (layer4)", "IG 4 steps gausslegendre, chunks of 2")


def _cells(line):
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _rows(lines):
  return {(c[0], c[2], c[3].split(" (")[0]): c for c in map(_cells, lines) if c[0].startswith("ResNet-18")}


def test_quick_run_prints_a_row_per_model_method_and_framework(capsys):
  threads = None
  try:
    import torch
    threads = torch.get_num_threads()
  except ImportError:
    pass
  try:
    # One torch thread: two on a loaded 2-core CI machine run far slower (tests/conftest.py, torch_one_thread).
    lines = interpret_speed.main(["--quick", "--device_count_independent", "--threads", "1"])
  finally:
    if threads is not None:
      torch.set_num_threads(threads)
  printed = capsys.readouterr().out
  assert interpret_speed.HEADER in printed and all(line in printed for line in lines)
  rows = _rows(lines)
  assert set(rows) == {(model, method, framework) for model in ("ResNet-18 2D", "ResNet-18 3D")
                       for method in _METHODS for framework in ("medjax", "Captum")}
  for key, cells in rows.items():
    assert len(cells) == 8
    if key[2] == "medjax":
      assert float(cells[4]) >= 0 and float(cells[5]) > 0 and float(cells[6]) > 0
  has_captum = interpret_speed._captum() is not None
  for method in _METHODS:
    captum_2d = rows["ResNet-18 2D", method, "Captum"]
    if has_captum:
      assert float(captum_2d[6]) > 0
      assert float(rows["ResNet-18 2D", method, "medjax"][7]) > 0  # the medjax/Captum ratio
    else:
      assert captum_2d[7] == "Captum not installed"
    assert rows["ResNet-18 3D", method, "Captum"][7].startswith("skipped" if has_captum else "Captum not installed")
