r"""DP-SGD step speed: medjax's private train step against its non-private one, and Opacus against torch, on the
same CPU in one command (issue 22's benchmark).

Written for medjax. The medjax steps are `medjax.steps.train_step` jitted by `build.jit_train_step`, built from
experiments/medmnist_dp.py exactly as medjax/train.py builds a run (ResNet-18, GroupNorm, 28x28x1, 2 classes,
Adam 1e-3, expected batch 128):
- medjax non-private: `eps=0`, batch 128;
- medjax DP-SGD: `eps=8` (sigma from the RDP accountant over breastmnist's N = 546 and 150 steps), the step's
  gradient `build.differential_privacy(...).gradient_fn`, resolved per-example norms ("ghost" for this model).
  The step runs on Poisson batches padded to their bucket (`plan.batch_bucket`, about one binomial standard
  deviation): every bucket size a step falls in with probability >= 1% is timed, and the step time is their
  probability-weighted mean, so two figures: expected images/s = 128 / step time (the honest throughput, used
  for the ratio) and processed slots/s = mean slots / step time;
- medjax DP-SGD, vmap: the same with `per_example_norms="vmap"` (jax-privacy's vmap(grad) clipping), in
  microbatches of `--vmap_microbatch` (the per-example gradients of ResNet-18 take 45 MB an example);
- torch non-private and Opacus (when torch, torchvision and opacus import): torchvision's ResNet-18 with
  GroupNorm of gcd(C, 32) groups (medjax's `make_norm("group")`), 3x3 stride-1 stem without max-pool, 1 input
  channel, 2 classes (parameter count equal to medjax's), Adam 1e-3, a fixed batch of 128; Opacus 1.6's
  `PrivacyEngine.make_private` (hook-based `GradSampleModule`, clipping norm 1, medjax's sigma, Poisson
  sampling off so every step sees exactly 128 images, i.e. no padding is charged to Opacus).
Random inputs and labels of those shapes, placed once; the data pipeline is not timed.

Timing: the first call alone gives `compile/first s` (XLA compile plus one step for medjax, the first eager
step for torch), then `--warmup` untimed steps, then the median of `--repeats` steps, each ended by
`jax.block_until_ready` (torch on the CPU is synchronous); for the DP rows, each bucket is timed so and the
medians are weighted by the buckets' probabilities. The ratio column is a row's expected images/s
over its own framework's non-private images/s; the two headline ratios follow the table.

  python -m benchmarks.dp_speed                 # the issue's table: 26 min on a busy 2-core CPU (vmap: 20 min)
  python -m benchmarks.dp_speed --quick         # width 8, 16x16, batch 8, seconds (the test)
  python -m benchmarks.dp_speed --repeats 7 --warmup 2 --torch_threads 2 [--skip_vmap] [--skip_torch]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "medmnist_dp.py"
NUM_EXAMPLES = 546  # breastmnist's training split, the experiment's default subset (sets q and the padding)
MAX_GROUPS = 32  # medjax's GroupNorm: gcd(C, 32) groups
WIDTH = 64  # torchvision's ResNet-18, as the benchmark names it (the experiment's default is 32)
MIN_BUCKET_PROBABILITY = 0.01  # Poisson batch buckets rarer than this are not timed
HEADER = ("| step | batch: expected / processed | compile/first s | median s | images/s (expected) | "
          "processed slots/s | ratio to its own non-private |\n|---|---|---|---|---|---|---|")


class _ShapeSource:
  """Stands in for the training split where `build.differential_privacy` reads it: its length and one example."""

  def __init__(self, num_examples: int, image_shape):
    self.num_examples, self.image_shape = num_examples, tuple(image_shape)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    return {"image": np.zeros(self.image_shape, np.float32), "label": np.int32(0)}


def make_config(eps: float, *, quick: bool, norms: Optional[str] = None, vmap_microbatch: int = 0):
  """experiments/medmnist_dp.py at `eps` (0: non-private); `quick`: width 8, 16x16, batch 8."""
  from medjax import config_lib

  config = config_lib.load_config(os.path.join(ROOT, "experiments", f"{CONFIG}:eps={eps:g},width={WIDTH}"))
  if quick:
    config.model.width = 8
    config.data.size = 16
    config.input.batch_size = 8
  if norms is not None:
    config.privacy.per_example_norms = norms
    if norms == "vmap" and vmap_microbatch:
      config.privacy.microbatch_size = vmap_microbatch
  return config


def _median_timing(step: Callable[[], Any], warmup: int, repeats: int) -> Dict[str, float]:
  """compile_s (the first call), then the median of `repeats` calls after `warmup` untimed ones."""
  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return {"compile_s": first, "median_s": statistics.median(times)}


def medjax_step(config, *, num_examples: int, warmup: int, repeats: int) -> Dict[str, Any]:
  """Times the config's train step (DP-SGD's when `config.privacy` is set) on random data."""
  import jax

  from medjax import build, sharding

  start = time.perf_counter()
  batch_size = int(config.input.batch_size)
  size, channels = int(config.data.size), int(config.data.channels)
  image = np.zeros((size, size, channels), np.float32)
  model, objective = build.model(config), build.objective(config)
  tx, _ = build.optimizer(config)
  mesh = build.mesh(config)
  run = build.settings(config)
  init = build.init_state_fn(model, tx, image, use_ema=run.ema_decay > 0)
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract_state, mesh, run.sharding)
  dp = build.differential_privacy(config, model, objective, abstract_state, _ShapeSource(num_examples, image.shape),
                                  mesh)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(0))
  step = build.jit_train_step(model, objective, tx, mesh, state_sharding, accum_steps=run.grad_accum_steps,
                              ema_decay=run.ema_decay, augment_fn=build.augment_fn(config),
                              freeze_batch_stats=run.freeze_batch_stats, gradient_fn=dp and dp.gradient_fn)
  # Under DP every bucket a step pads to with probability >= 1% is timed, weighted by its probability.
  distribution = dp.plan.slot_distribution() if dp else {batch_size: 1.0}
  timed = {size: p for size, p in distribution.items() if p >= MIN_BUCKET_PROBABILITY}
  rng = np.random.default_rng(0)
  holder = {"state": state}
  per_size = {}
  for size in sorted(timed, key=lambda size: -timed[size]):
    batch = {"image": rng.normal(size=(size,) + image.shape).astype(np.float32),
             "label": rng.integers(0, int(config.model.num_classes), size=(size,)).astype(np.int32)}
    if dp:  # sampled examples fill the bucket but for its last few slots, which are padding
      batch["example_valid"] = (np.arange(size) < size - dp.plan.batch_bucket // 2).astype(np.float32)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))

    def call(batch=batch):
      holder["state"], metrics = step(holder["state"], batch)
      jax.block_until_ready(metrics)

    per_size[size] = _median_timing(call, warmup, repeats)
  weight = sum(timed.values())
  result = {"compile_s": per_size[max(timed, key=timed.get)]["compile_s"],
            "median_s": sum(p * per_size[size]["median_s"] for size, p in timed.items()) / weight,
            "setup_s": time.perf_counter() - start}
  slots = sum(p * size for size, p in timed.items()) / weight
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  result.update(expected=batch_size, slots=slots, params=params, norms=dp.norms if dp else None,
                buckets={size: (p, per_size[size]["median_s"]) for size, p in sorted(timed.items())},
                noise_multiplier=dp.plan.noise_multiplier if dp else None,
                microbatch=dp.plan.microbatch_size if dp else None)
  return result


def torch_available() -> Optional[str]:
  """None when torch, torchvision and opacus all import, else the reason they do not."""
  try:
    import opacus  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  except ImportError as e:
    return str(e)
  return None


def torch_resnet18(width: int = 64, in_channels: int = 1, num_classes: int = 2):
  """medjax's ResNet-18 (small_input, norm="group") in torch: torchvision's ResNet with BasicBlocks (at width 64,
  `torchvision.models.resnet.ResNet(block, [2, 2, 2, 2])`; other widths, the quick mode, the same layout
  assembled from the blocks), GroupNorm of gcd(C, 32) groups, a 3x3 stride-1 stem without max-pool.

  The blocks are torchvision's with an out-of-place forward: its in-place ReLU and `out += identity` modify the
  output of a module Opacus hooks, which autograd refuses ("Output 0 of BackwardHookFunction is a view and is
  being modified inplace"). Both torch rows run this same network."""
  import torch
  from torchvision.models import resnet

  nn = torch.nn

  class Block(resnet.BasicBlock):
    """torchvision's BasicBlock, the same parameters, computed out of place."""

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  def norm(channels: int):
    return nn.GroupNorm(math.gcd(channels, MAX_GROUPS), channels)

  if width == 64:
    model = resnet.ResNet(Block, [2, 2, 2, 2], num_classes=num_classes, norm_layer=norm)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.relu.inplace = False
    model.maxpool = nn.Identity()
    return model
  layers: List[Any] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
  cin = width
  for i in range(4):
    cout = width * 2 ** i
    for j in range(2):
      stride = 2 if (i > 0 and j == 0) else 1
      down = None
      if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
      layers.append(Block(cin, cout, stride, down, norm_layer=norm))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers)


def torch_steps(*, width: int, size: int, batch_size: int, noise_multiplier: float, clip_norm: float,
                warmup: int, repeats: int, threads: int) -> Dict[str, Dict[str, Any]]:
  """Times torch's plain step and Opacus' DP step of `torch_resnet18` on one random batch."""
  import torch
  from opacus import PrivacyEngine

  previous = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    with warnings.catch_warnings():
      # Opacus' reminder that its secure RNG is off, and torch's that the full backward hooks fire on outputs
      # (the images need no gradient): both expected here.
      warnings.filterwarnings("ignore", message="Secure RNG turned off")
      warnings.filterwarnings("ignore", message="Full backward hook is firing")
      torch.manual_seed(0)
      images = torch.randn(batch_size, 1, size, size)
      labels = torch.randint(0, 2, (batch_size,))
      loss_fn = torch.nn.CrossEntropyLoss()
      results = {}
      for name in ("torch", "opacus"):
        model = torch_resnet18(width)
        model.train()
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name == "opacus":
          loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size)
          model, optimizer, _ = PrivacyEngine().make_private(
              module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
              max_grad_norm=clip_norm, poisson_sampling=False)

        def call(model=model, optimizer=optimizer):
          optimizer.zero_grad(set_to_none=True)
          loss_fn(model(images), labels).backward()
          optimizer.step()

        result = _median_timing(call, warmup, repeats)
        result.update(expected=batch_size, slots=batch_size, params=params, threads=torch.get_num_threads())
        results[name] = result
      return results
  finally:
    torch.set_num_threads(previous)


def _row(name: str, result: Dict[str, Any], baseline: Optional[float]) -> str:
  images = result["expected"] / result["median_s"]
  slots = result["slots"] / result["median_s"]
  ratio = "1.00" if baseline is None else f"{images / baseline:.2f}"
  return (f"| {name} | {result['expected']} / {result['slots']:.1f} | {result['compile_s']:.1f} | "
          f"{result['median_s']:.4f} | {images:.1f} | {slots:.1f} | {ratio} |")


def main(argv=None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.dp_speed", description=__doc__.split("\n\n")[0])
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
  parser.add_argument("--quick", action="store_true", help="width 8, 16x16, batch 8 (seconds; the test)")
  parser.add_argument("--num_examples", type=int, default=NUM_EXAMPLES,
                      help="training-set size N for the DP plan (q = 128 / N sets the padded batch)")
  parser.add_argument("--vmap_microbatch", type=int, default=32,
                      help="examples per vmap chunk of the vmap row (0: the whole padded batch at once)")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
  parser.add_argument("--skip_vmap", action="store_true", help="leave out the vmap row")
  parser.add_argument("--skip_torch", action="store_true", help="leave out the torch / Opacus rows")
  args = parser.parse_args(argv)
  import jax

  print(f"jax {jax.__version__}, devices: {jax.devices()}, cpu cores: {os.cpu_count()}", flush=True)
  common = dict(num_examples=args.num_examples, warmup=args.warmup, repeats=args.repeats)
  results: Dict[str, Dict[str, Any]] = {}
  configs = {"medjax": make_config(0, quick=args.quick), "medjax_dp": make_config(8, quick=args.quick)}
  if not args.skip_vmap:
    configs["medjax_vmap"] = make_config(8, quick=args.quick, norms="vmap", vmap_microbatch=args.vmap_microbatch)
  for key, config in configs.items():
    results[key] = medjax_step(config, **common)
    print(f"# {key}: {results[key]['median_s']:.4f} s a step ({results[key]['setup_s']:.0f} s in all)",
          file=sys.stderr, flush=True)
  dp = results["medjax_dp"]
  reason = "--skip_torch" if args.skip_torch else torch_available()
  if reason is None:
    config = make_config(0, quick=args.quick)
    results.update(torch_steps(width=int(config.model.get("width", 64)), size=int(config.data.size),
                               batch_size=int(config.input.batch_size), noise_multiplier=dp["noise_multiplier"],
                               clip_norm=float(make_config(8, quick=args.quick).privacy.clip_norm),
                               warmup=args.warmup, repeats=args.repeats, threads=args.torch_threads))
  else:
    print(f"torch / Opacus rows skipped: {reason}")
  buckets = ", ".join(f"{size}: p {p:.2f}, {t:.3f} s" for size, (p, t) in dp["buckets"].items())
  print(f"medjax params {dp['params']:,}; DP noise multiplier {dp['noise_multiplier']:.4f} (eps 8, N = "
        f"{args.num_examples}), Poisson batch buckets timed ({buckets}), {dp['slots']:.1f} slots a step on average"
        + (f"; torch params {results['torch']['params']:,}, {results['torch']['threads']} threads"
           if "torch" in results else ""))
  names = {"medjax": "medjax non-private", "medjax_dp": f"medjax DP-SGD ({dp['norms']} norms)",
           "medjax_vmap": "medjax DP-SGD (vmap, jax-privacy)", "torch": "torch non-private",
           "opacus": "Opacus DP-SGD (hooks)"}
  if "medjax_vmap" in results and results["medjax_vmap"]["microbatch"]:
    names["medjax_vmap"] = f"medjax DP-SGD (vmap, jax-privacy, microbatch {results['medjax_vmap']['microbatch']})"
  rows = [HEADER]
  for key, result in results.items():
    base = None
    if key in ("medjax_dp", "medjax_vmap"):
      base = results["medjax"]["expected"] / results["medjax"]["median_s"]
    elif key == "opacus":
      base = results["torch"]["expected"] / results["torch"]["median_s"]
    rows.append(_row(names[key], result, base))
  images = {k: r["expected"] / r["median_s"] for k, r in results.items()}
  headline = {"dp_over_non_private": images["medjax_dp"] / images["medjax"]}
  lines = [f"medjax DP-SGD / medjax non-private (expected images/s): {headline['dp_over_non_private']:.2f} "
           "(goal >= 0.5)"]
  if "opacus" in images:
    headline["dp_over_opacus"] = images["medjax_dp"] / images["opacus"]
    headline["dp_slots_over_opacus"] = dp["slots"] / dp["median_s"] / images["opacus"]
    lines.append(f"medjax DP-SGD expected images/s / Opacus DP-SGD images/s: {headline['dp_over_opacus']:.2f} "
                 f"(goal > 1; per processed slot: {headline['dp_slots_over_opacus']:.2f})")
  print("\n".join(rows + [""] + lines), flush=True)
  return {"results": results, "rows": rows, "headline": headline}


if __name__ == "__main__":
  main()
