"""medjax.tools.convert_weights: torch layout -> medjax names -> torch layout, exact, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import transfer
from medjax.tools import cli, convert_weights
from tests.transfer import transfer_testing

KWARGS = {"num_classes": 3, "width": 4}


def _run(capsys, *argv):
  cli.call(convert_weights.main, convert_weights._FLAGS, ["convert_weights", *argv])
  return capsys.readouterr()


def test_torchvision_file_to_medjax_names_and_back_is_exact(tmp_path, capsys):
  variables = transfer_testing.random_variables("resnet18", KWARGS)
  state_dict = transfer.to_torch(variables, "resnet18")
  transfer.save_state_dict(tmp_path / "tv.npz", state_dict)
  out = _run(capsys, f"--input={tmp_path / 'tv.npz'}", f"--output={tmp_path / 'mj.safetensors'}",
             "--model=resnet18", "--kwargs=width=4")
  flat = transfer.load_state_dict(tmp_path / "mj.safetensors")
  assert out.out.strip() == f"{tmp_path / 'mj.safetensors'}: {len(flat)} tensors (medjax names)"
  assert "params/stem_conv/kernel" in flat and "batch_stats/stem_norm/var" in flat
  for path, value in transfer.flatten(variables).items():
    np.testing.assert_array_equal(flat["/".join(path)], value)
  _run(capsys, f"--input={tmp_path / 'mj.safetensors'}", f"--output={tmp_path / 'back.npz'}", "--model=resnet18",
       "--to=torch")
  back = transfer.load_state_dict(tmp_path / "back.npz")
  assert sorted(back) == sorted(state_dict)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(back[name], value)


def test_user_errors_are_one_line(tmp_path, capsys):
  variables = transfer_testing.random_variables("resnet18", KWARGS)
  transfer.save_state_dict(tmp_path / "tv.npz", transfer.to_torch(variables, "resnet18"))
  with pytest.raises(SystemExit) as exit_info:
    _run(capsys, f"--input={tmp_path / 'tv.npz'}", f"--output={tmp_path / 'x.safetensors'}", "--model=resnet34",
         "--kwargs=width=4")
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert err.startswith("medjax.tools.convert_weights: error: the torchvision state dict does not fit medjax resnet34")
  with pytest.raises(SystemExit):
    _run(capsys, f"--input={tmp_path / 'tv.npz'}", f"--output={tmp_path / 'y.npz'}", "--model=resnet18", "--to=torch")
  assert "holds PyTorch names, not medjax ones" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    _run(capsys, f"--input={tmp_path / 'none.pth'}", f"--output={tmp_path / 'y.npz'}", "--model=resnet18")
  assert "weight file not found" in capsys.readouterr().err
