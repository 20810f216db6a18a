r"""Pretext step speed: images per second of a self-supervised train step against a supervised step of the same
encoder and batch (issue 21's benchmark).

Written for medjax. Each step is `medjax.steps.train_step` compiled with `jax.jit` through `build.jit_train_step`,
from the experiment configs themselves, so what is timed is what a run trains:
- supervised: experiments/medmnist_resnet.py (ResNet-18, 28x28x3, cross-entropy, the improved recipe's
  on-device augmentation);
- SimCLR / BYOL: experiments/medmnist_simclr.py, the same ResNet-18 and batch; every image becomes two
  augmented views, so the encoder runs on twice the images (plus the projector; BYOL also its momentum
  network's forward pass).
- 3D: experiments/synthetic_unet.py's UNETR (28^3, supervised Dice + cross-entropy) against
  experiments/synthetic_pretext.py's masked image modelling of it (same batch).
Random inputs of the configs' shapes; the data pipeline is not timed.

Timing: the first call alone gives `compile_s`, then `--warmup` untimed steps, then the median of `--repeats`
steps, each ended by `jax.block_until_ready`. images/s = batch / median (input images, not views). The ratio
column is the pretext step's images/s over the supervised one's of the same row group.

  python -m benchmarks.pretext_speed --batch 64
  python -m benchmarks.pretext_speed --quick        # tiny models, seconds (the test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("| encoder | input x batch | step | compile s | median s | images/s | pretext/supervised |\n"
          "|---|---|---|---|---|---|---|")


def cases(quick: bool, batch: int, batch_3d: int) -> List[Tuple[str, str, str, int]]:
  """(encoder, step name, config spec, batch): supervised first within each encoder."""
  q = ",quick=true" if quick else ""
  return [("ResNet-18 2D", "supervised", f"medmnist_resnet.py:recipe=improved{q}", batch),
          ("ResNet-18 2D", "simclr", f"medmnist_simclr.py:method=simclr{q}", batch),
          ("ResNet-18 2D", "byol", f"medmnist_simclr.py:method=byol{q}", batch),
          ("UNETR 3D", "supervised", f"synthetic_unet.py:model=unetr,size=28{q}", batch_3d),
          ("UNETR 3D", "mae", f"synthetic_pretext.py:method=mae,adrenal=false{q}", batch_3d)]


def time_step(spec: str, batch_size: int, warmup: int, repeats: int) -> Dict[str, float]:
  """Compile and time one config's train step on random data; returns compile_s, median_s, images_per_s."""
  import jax
  import numpy as np

  from medjax import build, config_lib, sharding

  config = config_lib.load_config(os.path.join(ROOT, "experiments", spec))
  config.input.batch_size = batch_size
  model, objective = build.model(config), build.objective(config)
  tx, _ = build.optimizer(config)
  mesh = build.mesh(config)
  data = config.data
  if data.name == "pooled_images":
    data = data.members[0]
  size = data.get("size", data.get("image_size"))
  dims = 3 if "3d" in str(data.get("subset", "")) else int(data.get("spatial_dims", 2))
  channels = int(data.get("channels", 1) or 1)
  image = np.zeros((size,) * dims + (channels,), np.float32)
  init = build.init_state_fn(model, tx, image, use_ema=build.settings(config).ema_decay > 0)
  state_sharding = sharding.state_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh,
                                            build.settings(config).sharding)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  step = build.jit_train_step(model, objective, tx, mesh, state_sharding, augment_fn=build.augment_fn(config),
                              ema_decay=build.settings(config).ema_decay)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size,) + image.shape).astype(np.float32)}
  if config.get("pretext") is None:
    num_classes = int(config.model.num_classes)
    label_shape = (batch_size,) if data.name == "medmnist" else (batch_size,) + image.shape[:-1]
    batch["label"] = rng.integers(0, num_classes, size=label_shape).astype(np.int32)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"compile_s": compile_s, "median_s": median, "images_per_s": batch_size / median,
          "shape": image.shape}


def main(argv=None) -> List[str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=64, help="2D images per step")
  parser.add_argument("--batch_3d", type=int, default=4, help="3D volumes per step")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="the experiments' quick models, batch 8 / 2")
  args = parser.parse_args(argv)
  import jax
  batch, batch_3d = (8, 2) if args.quick else (args.batch, args.batch_3d)
  print(f"jax {jax.__version__}, devices: {jax.devices()}")
  print(HEADER)
  rows, supervised = [], {}
  for encoder, name, spec, size in cases(args.quick, batch, batch_3d):
    result = time_step(spec, size, args.warmup, args.repeats)
    if name == "supervised":
      supervised[encoder] = result["images_per_s"]
      ratio = "1.00"
    else:
      ratio = f"{result['images_per_s'] / supervised[encoder]:.2f}"
    shape = "x".join(map(str, result["shape"]))
    row = (f"| {encoder} | {shape} x {size} | {name} | {result['compile_s']:.1f} | {result['median_s']:.4f} | "
           f"{result['images_per_s']:.1f} | {ratio} |")
    print(row, flush=True)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
