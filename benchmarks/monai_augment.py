r"""MONAI peer of medjax's on-device augmentation: samples/s of the same chain as CPU dictionary transforms.

Written for medjax (not copied from any other benchmark). From one synthetic CT-like volume of `--size`^3
with a 3-class label map, each item is 2 random `--patch`^3 patches (`RandCropByPosNegLabeld`, one centred
on foreground and one on background, from foreground / background indices computed once, as a cached
`FgBgToIndicesd` would) run through MONAI's equivalent of `medjax.augment.SEGMENTATION_CHAIN`, in medjax's
order (one spatial warp -> blur -> low_res -> brightness -> contrast -> gamma -> noise):

  medjax (augment.SEGMENTATION_CHAIN)          MONAI here
  flip p 0.5 per axis                          RandFlipd(prob=0.5) for each of the 3 axes
  affine p 0.2, rotate +-30 deg per plane,     RandAffined(prob=0.2, rotate_range=pi/6 per axis, scale_range
    scale 0.7-1.4 (> 1 zooms in)                 (1/1.4 - 1, 1/0.7 - 1) per axis: MONAI's scale > 1 zooms out
                                                 and is drawn per axis, medjax's isotropically)
  elastic p 0.2, control points every 8        Rand3DElasticd(prob=0.2, sigma_range=(4, 4), magnitude_range
    voxels, displacement std 0-2 voxels          (0, m)): MONAI smooths dense uniform offsets with a Gaussian;
                                                 sigma 4 gives a correlation length (~2 sigma) of the control
                                                 spacing, m (`elastic_magnitude`: ~185) a std of 2 voxels
  blur p 0.2, sigma 0.5-1                      RandGaussianSmoothd(prob=0.2, sigma 0.5-1 per axis)
  low_res p 0.25, factor 1-2                   RandSimulateLowResolutiond(prob=0.25, zoom_range=(0.5, 1))
  brightness p 0.15, x 0.75-1.25               RandScaleIntensityd(prob=0.15, factors=(-0.25, 0.25))
  contrast p 0.15, 0.75-1.25, range kept       RandScaleIntensityFixedMeand(prob=0.15, factors=(-0.25, 0.25),
                                                 preserve_range=True)
  gamma p 0.3, 0.7-1.5 (log-uniform)           RandAdjustContrastd(prob=0.3, gamma=(0.7, 1.5)) (uniform)
  noise p 0.1, std 0-0.1                       RandGaussianNoised(prob=0.1, std=0.1) (std drawn in 0-0.1)

Images bilinear and labels nearest, zeros outside the volume, as medjax's defaults; MONAI's metadata
tracking stays on (its default). It pairs with the medjax row "the chain alone, 2 x 128^3" of
benchmarks/benchmarks.md (`MEDJAX_COMMAND`; `--size 128 --patch 128` makes the crop trivial, for the
chain alone):

  python -m medjax.tools.benchmark --model unet --input_shape 128,128,128,1 --batch_size 2 \
      --kwargs "spatial_dims=3,num_classes=3,features=(8,16,32,64),blocks_per_stage=1" --modes augment --augment

Measured: one process (`chain(item)` called in a loop: `compile_s` is the first call, then `--warmup`
untimed calls, `median_ms` the median of `--steps` calls and `samples_per_s` patches per second over all
timed calls; the transforms fire at random, so the mean, not the median, is the throughput), and MONAI's
DataLoader with `--workers` worker processes (`loader_samples_per_s`: patches per second after the first
batch, whose wait, worker start-up included, is `loader_first_batch_s`).

  python -m benchmarks.monai_augment --size 256 --patch 128 --workers 8

prints one JSON line. Needs the `peers` extra (pip install -e ".[peers]"); torch and MONAI are imported inside
the functions, so `--help` works without them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

MEDJAX_COMMAND = ('python -m medjax.tools.benchmark --model unet --input_shape 128,128,128,1 --batch_size 2 '
                  '--kwargs "spatial_dims=3,num_classes=3,features=(8,16,32,64),blocks_per_stage=1" '
                  "--modes augment --augment")
PATCHES_PER_ITEM = 2  # the medjax row's batch
ELASTIC_SIGMA = 4.0  # voxels; medjax's control points every 8 voxels
ELASTIC_STD = 2.0  # voxels; the top of medjax's magnitude range (0, 2)
TRANSFORMS = ("RandCropByPosNegLabeld", "RandFlipd x3", "RandAffined", "Rand3DElasticd", "RandGaussianSmoothd",
              "RandSimulateLowResolutiond", "RandScaleIntensityd", "RandScaleIntensityFixedMeand",
              "RandAdjustContrastd", "RandGaussianNoised")


def _monai():
  try:
    import monai
    import torch
  except ImportError as e:
    raise SystemExit("benchmarks/monai_augment.py needs PyTorch and MONAI (pip install -e '.[peers]'); medjax "
                     "does not.") from e
  return torch, monai


def ct_like_volume(size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(image (1, S, S, S) float32 in [-1, 1] (HU / 1000, clipped), label (1, S, S, S) float32 in {0, 1, 2}).

  Air around an elliptic body of soft tissue, two lungs, a spine, an organ (label 1) holding a lesion
  (label 2), and 20 HU of noise.
  """
  rng = np.random.default_rng(seed)
  z, y, x = (a.astype(np.float32) for a in np.ogrid[-1:1:size * 1j, -1:1:size * 1j, -1:1:size * 1j])

  def ellipsoid(cz, cy, cx, rz, ry, rx):
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0

  hu = np.full((size,) * 3, -1000.0, np.float32)
  hu[ellipsoid(0, 0, 0, 0.95, 0.7, 0.85)] = 40.0
  hu[ellipsoid(-0.3, -0.05, -0.4, 0.5, 0.4, 0.25) | ellipsoid(-0.3, -0.05, 0.4, 0.5, 0.4, 0.25)] = -850.0
  hu[np.broadcast_to(((y - 0.45) / 0.1) ** 2 + (x / 0.1) ** 2 <= 1.0, hu.shape)] = 700.0
  organ = ellipsoid(0.35, 0.0, -0.3, 0.3, 0.3, 0.35)
  lesion = ellipsoid(0.4, 0.05, -0.35, 0.08, 0.08, 0.08)
  hu[organ] = 60.0
  hu[lesion] = 110.0
  hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
  image = np.clip(hu / 1000.0, -1.0, 1.0)[None]
  label = np.zeros((1,) + (size,) * 3, np.float32)
  label[0][organ] = 1.0
  label[0][lesion] = 2.0
  return image, label


def elastic_magnitude(sigma: float = ELASTIC_SIGMA, displacement_std: float = ELASTIC_STD) -> float:
  """Rand3DElastic magnitude giving displacements of std `displacement_std` voxels: its offsets are uniform in
  [-1, 1] (variance 1/3), smoothed by a normalised Gaussian of `sigma` truncated at 3 sigma, in 3 dimensions."""
  radius = int(3.0 * sigma + 0.5)
  taps = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (taps / sigma) ** 2)
  w /= w.sum()
  return displacement_std / (math.sqrt(1.0 / 3.0) * float(np.sum(w ** 2)) ** 1.5)


def build_chain(patch: int, num_samples: int = PATCHES_PER_ITEM, seed: int = 0):
  """MONAI's Compose: the 2-patch crop, then the SEGMENTATION_CHAIN equivalents (module docstring)."""
  _monai()
  from monai import transforms as mt
  keys = ("image", "label")
  modes = ("bilinear", "nearest")
  chain = mt.Compose([
      mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(patch,) * 3, pos=1.0, neg=1.0,
                                num_samples=num_samples, fg_indices_key="label_fg_indices",
                                bg_indices_key="label_bg_indices"),
      *[mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
      mt.RandAffined(keys, prob=0.2, rotate_range=(math.pi / 6,) * 3, scale_range=((1 / 1.4 - 1, 1 / 0.7 - 1),) * 3,
                     mode=modes, padding_mode="zeros"),
      mt.Rand3DElasticd(keys, sigma_range=(ELASTIC_SIGMA, ELASTIC_SIGMA), magnitude_range=(0.0, elastic_magnitude()),
                        prob=0.2, mode=modes, padding_mode="zeros"),
      mt.RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
      mt.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)),
      mt.RandScaleIntensityd("image", factors=(-0.25, 0.25), prob=0.15),
      mt.RandScaleIntensityFixedMeand("image", factors=(-0.25, 0.25), fixed_mean=True, preserve_range=True,
                                      prob=0.15),
      mt.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
      mt.RandGaussianNoised("image", prob=0.1, mean=0.0, std=0.1),
  ])
  chain.set_random_state(seed=seed)
  return chain


def make_item(size: int, seed: int = 0) -> Dict[str, Any]:
  """The volume as one data dict with its foreground / background indices (computed once, untimed)."""
  _monai()
  from monai import transforms as mt
  image, label = ct_like_volume(size, seed)
  return mt.FgBgToIndicesd("label")({"image": image, "label": label})


def run(size: int = 256, patch: int = 128, workers: int = 8, steps: int = 20, warmup: int = 2,
        loader_items: int = 64, seed: int = 0, threads: Optional[int] = None) -> Dict[str, Any]:
  """Times the chain in this process and through a DataLoader; returns the JSON-ready report."""
  torch, monai = _monai()
  from monai.data import DataLoader, Dataset
  if threads:
    torch.set_num_threads(threads)
  if patch > size:
    raise ValueError(f"--patch {patch} is larger than --size {size}.")
  item = make_item(size, seed)
  chain = build_chain(patch, seed=seed)

  def call() -> float:
    start = time.perf_counter()
    out = chain(item)
    assert len(out) == PATCHES_PER_ITEM and tuple(out[0]["image"].shape) == (1,) + (patch,) * 3
    return time.perf_counter() - start

  compile_s = call()
  for _ in range(warmup):
    call()
  times = [call() for _ in range(steps)]

  loader = DataLoader(Dataset([item] * (loader_items + 1), transform=build_chain(patch, seed=seed + 1)),
                      batch_size=1, num_workers=workers, shuffle=False)
  start = time.perf_counter()
  first_s, first_end, count = None, start, 0
  for batch in loader:
    if first_s is None:
      first_s = time.perf_counter() - start
      first_end = time.perf_counter()
      continue
    count += batch["image"].shape[0]
  loader_s = time.perf_counter() - first_end
  return {"framework": "monai", "mode": "augment", "chain": "SEGMENTATION_CHAIN", "transforms": list(TRANSFORMS),
          "size": size, "patch": patch, "samples_per_item": PATCHES_PER_ITEM, "compile_s": compile_s,
          "median_ms": statistics.median(times) * 1e3, "mean_ms": statistics.mean(times) * 1e3,
          "samples_per_s": PATCHES_PER_ITEM * len(times) / sum(times), "steps_timed": len(times),
          "torch_threads": torch.get_num_threads(), "workers": workers, "loader_items_timed": loader_items,
          "loader_first_batch_s": first_s, "loader_samples_per_s": count / loader_s if loader_s > 0 else None,
          "device": "cpu", "cpu_count": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__,
          "medjax_command": MEDJAX_COMMAND}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.monai_augment", description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--size", type=int, default=256, help="side of the synthetic volume")
  p.add_argument("--patch", type=int, default=128, help="side of the 2 patches each item yields")
  p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
  p.add_argument("--steps", type=int, default=20, help="timed calls in this process")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
  p.add_argument("--loader_items", type=int, default=64, help="timed DataLoader items (after the first)")
  p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of this process (default: "
                 "torch's; DataLoader workers use 1)")
  p.add_argument("--seed", type=int, default=0)
  return p


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parser().parse_args(argv)
  report = run(args.size, args.patch, args.workers, args.steps, args.warmup, args.loader_items, args.seed, args.threads)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
