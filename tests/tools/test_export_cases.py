"""export_cases: a run's dataset cases written as image files, read back exactly."""

import os

import numpy as np
import pytest

from medjax import build, checkpoint, config_lib
from medjax.data import io
from medjax.tools import export_cases

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "synthetic_unet.py")


@pytest.mark.parametrize("dims,suffix", [(2, ".nrrd"), (3, ".nii.gz")])
def test_cases_round_trip(tmp_path, dims, suffix):
  config = config_lib.load_config(f"{EXPERIMENT}:dims={dims},quick=true,size=12")
  checkpoint.save_config(str(tmp_path), config)
  paths = export_cases.export(str(tmp_path), split="val", num=2, out=str(tmp_path / "cases"), suffix=suffix)
  source = build.dataset(config).source("val")
  assert [os.path.basename(p) for p in paths] == [f"val_0000{suffix}", f"val_0001{suffix}"]
  for index, path in enumerate(paths):
    example = source[index]
    image = io.read_image(path)
    label = io.read_image(os.path.join(tmp_path, "cases", "labels", os.path.basename(path)))
    expected_image, expected_label = example["image"][..., 0], example["label"]
    spacing = tuple(example["spacing_mm"])
    if dims == 2:
      expected_image, expected_label, spacing = expected_image[None], expected_label[None], (1.0,) + spacing
    np.testing.assert_array_equal(image.array, expected_image)
    np.testing.assert_array_equal(label.array, expected_label)
    np.testing.assert_allclose(image.spacing_mm, spacing, rtol=1e-6)


def test_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match="No config.json"):
    export_cases.export(str(tmp_path), out=str(tmp_path / "x"))
  checkpoint.save_config(str(tmp_path), config_lib.load_config(f"{EXPERIMENT}:dims=2,quick=true,size=12"))
  with pytest.raises(config_lib.ConfigError, match="no split 'tset'"):
    export_cases.export(str(tmp_path), split="tset", out=str(tmp_path / "x"))
  with pytest.raises(ValueError, match="--suffix '.png'"):
    export_cases.export(str(tmp_path), out=str(tmp_path / "x"), suffix=".png")
