"""The MONAI augmentation peer (timing tool): help without torch, the chain and a tiny run with it."""

import json
import os
import subprocess
import sys

import numpy as np

from benchmarks import monai_augment

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


PEER_MODULES = ("monai",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def test_help_needs_no_torch():
  code = ("import sys; sys.modules.update(dict.fromkeys(('torch', 'monai')))\n"
          "from benchmarks import monai_augment\nmonai_augment.main(['--help'])")
  result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "--workers" in result.stdout and "--patch" in result.stdout


def test_ct_like_volume_has_three_classes_in_range():
  image, label = monai_augment.ct_like_volume(32)
  assert image.shape == label.shape == (1, 32, 32, 32) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0
  assert set(np.unique(label).tolist()) == {0.0, 1.0, 2.0}


def test_pairs_with_the_medjax_augment_row():
  assert "--input_shape 128,128,128,1 --batch_size 2" in monai_augment.MEDJAX_COMMAND
  assert "--modes augment --augment" in monai_augment.MEDJAX_COMMAND
  assert monai_augment.PATCHES_PER_ITEM == 2


def test_elastic_magnitude_gives_the_displacement_std(torch_one_thread):
  torch = torch_one_thread
  from monai.networks.layers import GaussianFilter
  offsets = torch.rand((1, 3, 64, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
  smooth = GaussianFilter(3, monai_augment.ELASTIC_SIGMA, 3.0)(offsets)[0] * monai_augment.elastic_magnitude()
  assert 1.7 < float(smooth[:, 16:-16, 16:-16, 16:-16].std()) < 2.3


def test_every_transform_runs_and_keeps_shapes_and_labels(torch_one_thread):
  torch = torch_one_thread
  chain = monai_augment.build_chain(16)
  for transform in chain.transforms:
    if hasattr(transform, "prob"):
      transform.prob = 1.0  # all fire
  out = chain(monai_augment.make_item(32))
  assert len(out) == 2
  for patch in out:
    assert set(patch) == {"image", "label"}
    assert tuple(patch["image"].shape) == tuple(patch["label"].shape) == (1, 16, 16, 16)
    assert set(torch.unique(patch["label"]).tolist()) <= {0.0, 1.0, 2.0}  # nearest: no blended labels


def test_tiny_run_prints_one_json_line(torch_one_thread, capsys):
  import monai
  monai_augment.main(["--size", "32", "--patch", "16", "--workers", "1", "--steps", "3", "--warmup", "0",
                      "--loader_items", "2", "--threads", "1"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report["mode"] == "augment" and report["steps_timed"] == 3 and report["workers"] == 1
  for key in ("compile_s", "median_ms", "samples_per_s", "loader_samples_per_s", "loader_first_batch_s"):
    assert report[key] > 0
  assert report["monai"] == monai.__version__ and report["size"] == 32 and report["patch"] == 16
  assert report["torch_threads"] == 1
