"""The PyTorch peer loop (GPU-machine timing tool): runs one epoch on fake files where torch is installed."""

import numpy as np
import pytest

from benchmarks import medmnist_torch


def _fake_npz(path, spatial, n=(8, 4, 4)):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, count in zip(("train", "val", "test"), n):
    arrays[f"{split}_images"] = rng.integers(0, 256, (count,) + spatial, dtype=np.uint8)
    arrays[f"{split}_labels"] = np.arange(count, dtype=np.uint8).reshape(-1, 1) % 2  # both classes present
  np.savez(path, **arrays)


def test_load_split_scales_and_repeats_channels(tmp_path):
  _fake_npz(tmp_path / "breastmnist.npz", (28, 28))
  images, labels = medmnist_torch.load_split(np.load(tmp_path / "breastmnist.npz"), "val", 2)
  assert images.shape == (4, 3, 28, 28) and labels.shape == (4,) and labels.dtype == np.int64
  assert images.min() >= -1.0 and images.max() <= 1.0
  np.testing.assert_array_equal(images[:, 0], images[:, 2])


@pytest.mark.parametrize("subset,spatial", [("breastmnist", (28, 28)), ("adrenalmnist3d", (28, 28, 28))])
def test_one_epoch_on_cpu(tmp_path, subset, spatial):
  torch = pytest.importorskip("torch")
  _fake_npz(tmp_path / f"{subset}.npz", spatial)
  result = medmnist_torch.run(subset, str(tmp_path), epochs=1, device="cpu", num_workers=0, seed=0)
  assert result["steps"] == 1 and result["wall_s"] > 0 and result["torch"] == torch.__version__
  assert 0.0 <= result["test_best_auc"] <= 1.0 and 0.0 <= result["test_best_acc"] <= 1.0


def test_same_parameter_count_as_medjax_resnet18():
  pytest.importorskip("torch")
  jax = pytest.importorskip("jax")
  from medjax import models
  ours = models.build_model("resnet18", dict(spatial_dims=2, num_classes=2, small_input=True))
  shapes = jax.eval_shape(lambda: ours.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 28, 28, 3)), train=False))
  expected = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
  assert expected == 11_169_858  # torchvision's 11,689,512 with a 3x3 stem and a 2-class head
  peer = medmnist_torch.build_resnet18(2, 3, 2)
  assert sum(p.numel() for p in peer.parameters()) == expected
