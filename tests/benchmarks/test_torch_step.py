"""The PyTorch/MONAI step peer (GPU-machine timing tool): its case table without torch, tiny CPU runs with it."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from benchmarks import torch_step

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_KEYS = ("mode", "compile_s", "median_ms", "samples_per_s", "steps_timed", "params", "device", "torch", "monai")


PEER_MODULES = ("monai",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def _medjax_args(command):
  args = shlex.split(command)
  return {args[i][2:]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}


def _no_peers(code):
  """Runs `code` in a fresh interpreter where importing torch, torchvision or monai fails."""
  blocker = "import sys; sys.modules.update(dict.fromkeys(('torch', 'torchvision', 'monai')))\n"
  return subprocess.run([sys.executable, "-c", blocker + code], cwd=_ROOT, capture_output=True, text=True,
                        timeout=120)


def test_help_and_case_table_need_no_torch():
  result = _no_peers("from benchmarks import torch_step\n"
                     "assert not {'torch', 'monai'} & {k for k, v in sys.modules.items() if v is not None}\n"
                     "print(sorted(torch_step.CASES))\n"
                     "torch_step.main(['--help'])")
  assert result.returncode == 0, result.stderr
  assert "['resnet18', 'swin_unetr', 'unet3d', 'unetr']" in result.stdout
  assert "--case" in result.stdout and "--channels_last" in result.stdout


def test_without_torch_the_run_says_what_to_install():
  result = _no_peers("from benchmarks import torch_step\ntorch_step.main(['--case', 'unet3d', '--device', 'cpu'])")
  assert result.returncode != 0 and "pip install" in result.stderr


@pytest.mark.parametrize("case", sorted(torch_step.CASES))
def test_each_case_pairs_with_its_medjax_command(case):
  spec = torch_step.CASES[case]
  args = _medjax_args(spec.medjax)
  assert spec.medjax.startswith("python -m medjax.tools.benchmark ")
  assert tuple(int(s) for s in args["input_shape"].split(",")) == spec.input_shape
  assert int(args["batch_size"]) == spec.batch_size
  assert f"num_classes={spec.num_classes}" in args["kwargs"]
  assert int(args.get("steps", 20)) == spec.steps
  assert " ".join(spec.medjax.split()) in " ".join(torch_step.__doc__.replace("\\\n", " ").split())


def test_unetr_skip_layers_are_medjax_defaults():
  assert torch_step.unetr_skip_layers(12) == [4, 7, 10]  # MONAI's hidden_states_out[3], [6], [9]
  assert torch_step.unetr_skip_layers(4) == [2, 3, 4]


@pytest.mark.parametrize("case,overrides", [
    ("unet3d", dict(input_shape=(16, 16, 16, 1), features=(4, 8))),
    ("unet3d", dict(input_shape=(16, 16, 16, 1), features=(2, 4, 8), blocks_per_stage=2, mode="forward")),
    ("resnet18", dict(input_shape=(8, 8, 3), batch_size=2)),
    ("unetr", dict(input_shape=(32, 32, 32, 1))),
])
def test_tiny_cpu_run_reports_positive_numbers(torch_one_thread, case, overrides):
  torch = torch_one_thread
  report = torch_step.run(case, device="cpu", steps=2, warmup=0, threads=1, **overrides)
  json.dumps(report)
  for key in _KEYS:
    assert key in report
  assert report["mode"] == overrides.get("mode", "train") and report["steps_timed"] == 2
  assert report["compile_s"] > 0 and report["median_ms"] > 0 and report["samples_per_s"] > 0
  assert report["device"] == "cpu" and report["torch"] == torch.__version__ and report["peak_memory_bytes"] is None
  assert report["threads"] == 1


def test_command_line_prints_one_json_line(torch_one_thread, capsys):
  torch_step.main(["--case", "unet3d", "--device", "cpu", "--input_shape", "8,8,8,1", "--features", "2,4",
                   "--batch_size", "1", "--steps", "1", "--warmup", "0", "--amp", "--threads", "1"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report["dtype"] == "bfloat16" and report["input_shape"] == [1, 8, 8, 8, 1] and report["samples_per_s"] > 0
  assert report["model"] == "U-Net 3D, features 2/4, 1 conv(s) per stage (medjax's design in torch)"


@pytest.mark.parametrize("case,overrides", [
    ("unet3d", {}), ("unet3d", dict(blocks_per_stage=2)), ("resnet18", {}), ("unetr", {}), ("swin_unetr", {})])
def test_same_parameter_count_as_the_medjax_model(case, overrides):
  """The peers are the same networks: parameter counts equal medjax's (UNETR: but MONAI's unused norms)."""
  pytest.importorskip("torch")
  pytest.importorskip("monai")
  jax = pytest.importorskip("jax")
  from medjax import config_lib
  from medjax.tools import model_info
  spec = torch_step.CASES[case]
  args = _medjax_args(spec.medjax)
  kwargs = {**config_lib.parse_kwargs(args["kwargs"]), **overrides}
  shapes = model_info.abstract_variables(model_info.build(args["model"], kwargs), spec.input_shape)
  expected = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
  peer = torch_step.build_model(case, spec.input_shape, spec.num_classes, **overrides)
  extra = 0
  if case == "unetr":  # MONAI's TransformerBlock always makes a cross-attention LayerNorm (2 x hidden), unused
    extra = 2 * torch_step.UNETR_SIZES["hidden_size"] * torch_step.UNETR_SIZES["num_layers"]
  assert sum(p.numel() for p in peer.parameters()) == expected + extra
