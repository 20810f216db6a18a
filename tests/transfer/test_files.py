"""load_state_dict / save_state_dict: .safetensors and .npz without torch, .pt with it, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from medjax import transfer
from tests.transfer import transfer_testing


@pytest.fixture(scope="module")
def state_dict():
  """A medjax-exported torchvision state dict (tiny resnet18, widths 4..32), with its int64 counters."""
  variables = transfer_testing.random_variables("resnet18", {"num_classes": 5, "width": 4})
  return transfer.to_torch(variables, "resnet18")


def _assert_same(loaded, expected):
  assert sorted(loaded) == sorted(expected)
  for name, value in expected.items():
    assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value), name


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_then_load_is_exact(tmp_path, state_dict, suffix):
  path = tmp_path / f"weights{suffix}"
  transfer.save_state_dict(path, state_dict)
  loaded = transfer.load_state_dict(str(path))
  _assert_same(loaded, state_dict)
  assert loaded["conv1.weight"].shape == (4, 3, 7, 7) and loaded["bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_loaded_file_imports_to_the_variables_it_was_exported_from(tmp_path, suffix):
  variables = transfer_testing.random_variables("resnet50", {"num_classes": 3, "width": 2}, seed=1)
  path = tmp_path / f"weights{suffix}"
  transfer.save_state_dict(path, transfer.to_torch(variables, "resnet50"))
  imported = transfer.from_torch(transfer.load_state_dict(path), "resnet50", {"width": 2})
  _assert_same(_flat(imported), _flat(variables))


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: np.asarray(value)})
  return out


def test_missing_file_names_it(tmp_path):
  path = tmp_path / "absent.safetensors"
  with pytest.raises(FileNotFoundError, match=f"weight file not found: {path}"):
    transfer.load_state_dict(path)


def test_unknown_suffix_names_the_file_and_the_formats(tmp_path):
  path = tmp_path / "weights.h5"
  path.write_bytes(b"\x89HDF")
  with pytest.raises(transfer.WeightFileError) as info:
    transfer.load_state_dict(path)
  assert str(info.value) == (f"{path}: unknown weight file suffix '.h5'; expected one of "
                             "['.safetensors', '.npz', '.pt', '.pth']")


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_corrupt_file_names_it(tmp_path, suffix):
  path = tmp_path / f"weights{suffix}"
  path.write_bytes(b"not a weight file at all")
  with pytest.raises(transfer.WeightFileError, match=f"^{path}: cannot read the \\{suffix} weight file: "):
    transfer.load_state_dict(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pt_without_torch_names_the_file_and_the_install(tmp_path, monkeypatch, suffix):
  path = tmp_path / f"weights{suffix}"
  path.write_bytes(b"whatever")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=f"^{path}: reading a PyTorch weight file needs torch.*`pip install torch`"):
    transfer.load_state_dict(path)


# ---------------------------------------------------------------------------------------- with torch

def test_pt_round_trip_and_torch_save(tmp_path, state_dict):
  torch = pytest.importorskip("torch")
  path = tmp_path / "weights.pth"
  transfer.save_state_dict(path, state_dict)
  _assert_same(transfer.load_state_dict(path), state_dict)
  # A file torch wrote itself, with a bfloat16 tensor (numpy has none: read as float32, values kept).
  other = tmp_path / "other.pt"
  torch.save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0]).bfloat16()},
             other)
  loaded = transfer.load_state_dict(other)
  assert np.array_equal(loaded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert loaded["b"].dtype == np.float32 and np.array_equal(loaded["b"], [1.5, -2.0])


def test_pt_corrupt_or_not_a_state_dict_names_the_file(tmp_path):
  torch = pytest.importorskip("torch")
  corrupt = tmp_path / "corrupt.pt"
  corrupt.write_bytes(b"not a pickle")
  with pytest.raises(transfer.WeightFileError, match=f"^{corrupt}: cannot read the PyTorch weight file: "):
    transfer.load_state_dict(corrupt)
  nested = tmp_path / "checkpoint.pt"
  torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)}}, nested)
  with pytest.raises(transfer.WeightFileError, match=f"^{nested}: entry 'epoch' is a int, not a tensor"):
    transfer.load_state_dict(nested)


def test_importing_transfer_does_not_import_torch():
  code = "import sys, medjax.transfer; print('torch' in sys.modules, 'torchvision' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["False", "False"]
