r"""Attribution speed, medjax.interpret next to Captum: maps per second of Grad-CAM and integrated gradients.

Written for medjax. Both frameworks explain the same network with the same weights and batch: a ResNet-18
(medjax "resnet18"; torchvision's `resnet18` with medjax's random weights exported by `medjax.transfer.to_torch`)
at 224x224x3, and a 3D ResNet-18 (medjax "resnet18" with `spatial_dims=3`) at 64^3x1. The 3D Captum rows are
skipped: `medjax.transfer.supported()` has no torch 3D ResNet-18 mapping (MONAI's `resnet18` is not among the
mapped MONAI models), so there is no torch model with the same weights.

Methods (one map per image; class targets 0, 1, 0, ...):
- Grad-CAM of the last stage (medjax `grad_cam(layer="stage4_block1", upsample=None)`, Captum
  `LayerGradCam(model, model.layer4)`): one forward and one backward pass.
- integrated gradients, `--ig_steps` (64) Gauss-Legendre points, zero baseline, batched over the path in chunks
  of `--ig_batch_steps` points (medjax `integrated_gradients(batch_steps=...)`, Captum
  `IntegratedGradients.attribute(internal_batch_size=ig_batch_steps * batch)`, which counts images).

Timing: the first call alone gives `compile_s` (medjax: tracing + XLA compilation + one run; Captum: the first
call, which has no compilation), then `--warmup` untimed calls, then the median of `--repeats` calls, each
ended by `jax.block_until_ready` (medjax). maps/s = batch / median. Both frameworks use the machine's cores:
XLA's CPU backend its default thread pool, torch `--threads` intra-op threads (default `os.cpu_count()`).
On a CPU shared with other jobs the numbers are noisy, and torch's intra-op threads may spin against the other
jobs (`--threads 1` avoids that; tests/conftest.py's torch_one_thread). On XLA:CPU (2026-12-07, jax 0.10.2) a
gradient pass inside `lax.scan` took ~2.8x as long as the same pass outside a loop, so several path chunks are slow
there and one chunk (`--ig_batch_steps` = `--ig_steps`) is fast (medjax/interpret/loops.py).
Without `--device_count_independent` the medjax batch is sharded over every local JAX device when it divides evenly
(data parallel, e.g. several GPUs); with it, medjax runs on one device, as Captum does, so the numbers do not depend
on how many devices the machine has.

  python -m benchmarks.interpret_speed --device_count_independent
  python -m benchmarks.interpret_speed --quick --device_count_independent   # tiny sizes, seconds (the test)

prints a header line (versions, threads, devices) and one Markdown table row per (model, method, framework):
model, input x batch, method, framework, compile s, median s, maps/s, ratio medjax/Captum (maps/s of medjax over
Captum's, on the medjax rows). Captum rows are left out, with a note, when captum or torchvision is missing (the
`peers` extra: pip install -e ".[peers]"); this module imports torch only inside its functions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

LAYER = "stage4_block1"  # the last stage block of medjax's resnet18 (torchvision's layer4 output)
NUM_CLASSES = 3
HEADER = ("| model | input x batch | method | framework | compile s | median s | maps/s | medjax/Captum |\n"
          "|---|---|---|---|---|---|---|---|")


class Case(NamedTuple):
  name: str
  spatial_dims: int
  input_shape: Tuple[int, ...]  # spatial..., channels (medjax's order)
  batch_size: int


def cases(quick: bool, batch_2d: int, batch_3d: int, size_2d: int, size_3d: int) -> List[Case]:
  if quick:
    return [Case("ResNet-18 2D", 2, (32, 32, 3), 1), Case("ResNet-18 3D", 3, (32, 32, 32, 1), 1)]
  return [Case("ResNet-18 2D", 2, (size_2d, size_2d, 3), batch_2d),
          Case("ResNet-18 3D", 3, (size_3d,) * 3 + (1,), batch_3d)]


def _captum():
  """(torch, torchvision, captum.attr) or None where the peers are not installed."""
  try:
    import captum.attr
    import torch
    import torchvision
  except ImportError:
    return None
  return torch, torchvision, captum.attr


def _time(call: Callable[[], Any], warmup: int, repeats: int) -> Tuple[float, float]:
  """(seconds of the first call, median seconds of `repeats` calls after `warmup` more)."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def medjax_setup(case: Case, seed: int = 0):
  """(model, variables, images, targets) in numpy: He-scaled random weights, random running statistics."""
  import jax
  import numpy as np

  from medjax import models
  model = models.build_model("resnet18", {"num_classes": NUM_CLASSES, "spatial_dims": case.spatial_dims})
  x = jax.ShapeDtypeStruct((1,) + case.input_shape, jax.numpy.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0.0, 0.1, leaf.shape)
    return value.astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  images = rng.normal(size=(case.batch_size,) + case.input_shape).astype(np.float32)
  targets = (np.arange(case.batch_size) % 2).astype(np.int32)
  return model, variables, images, targets


def _place(variables, images, targets, device_count_independent: bool):
  """Device arrays: on the first device, or the batch sharded over every local device when it divides evenly."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  devices = jax.local_devices()
  if device_count_independent or len(devices) == 1 or images.shape[0] % len(devices):
    put = lambda a: jax.device_put(a, devices[0])
    return jax.tree.map(put, variables), put(images), put(targets), 1
  mesh = Mesh(devices, ("data",))
  replicated, batch = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  return (jax.device_put(variables, replicated), jax.device_put(images, batch), jax.device_put(targets, batch),
          len(devices))


def time_medjax(case: Case, method: str, ig_steps: int, ig_batch_steps: int, warmup: int, repeats: int,
                device_count_independent: bool, setup=None) -> Dict[str, Any]:
  import jax

  from medjax.interpret import grad_cam, integrated_gradients
  model, variables, images, targets = setup or medjax_setup(case)
  variables, images, targets, devices = _place(variables, images, targets, device_count_independent)
  if method == "grad_cam":
    call = lambda: jax.block_until_ready(grad_cam(model, variables, images, targets, layer=LAYER, upsample=None))
  else:
    call = lambda: jax.block_until_ready(integrated_gradients(
        model, variables, images, targets, steps=ig_steps, method="gausslegendre", batch_steps=ig_batch_steps))
  compile_s, median = _time(call, warmup, repeats)
  return {"compile_s": compile_s, "median_s": median, "maps_per_s": case.batch_size / median, "devices": devices}


def torchvision_model(peers, variables):
  """torchvision's resnet18 with the medjax `variables` (`medjax.transfer.to_torch`), eval mode, float32."""
  import numpy as np

  from medjax import transfer
  torch, torchvision, _ = peers
  model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
  state_dict = transfer.to_torch(variables, "resnet18")
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
  return model.eval().float()


def time_captum(peers, case: Case, method: str, ig_steps: int, ig_batch_steps: int, warmup: int, repeats: int,
                setup) -> Dict[str, Any]:
  import numpy as np
  torch, _, attr = peers
  _, variables, images, targets = setup
  model = torchvision_model(peers, variables)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1)))
  target = targets.tolist()
  if method == "grad_cam":
    explainer = attr.LayerGradCam(model, model.layer4)
    call = lambda: explainer.attribute(x, target=target)
  else:
    explainer = attr.IntegratedGradients(model)
    call = lambda: explainer.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=ig_steps,
                                       method="gausslegendre", internal_batch_size=ig_batch_steps * case.batch_size)
  compile_s, median = _time(call, warmup, repeats)
  return {"compile_s": compile_s, "median_s": median, "maps_per_s": case.batch_size / median}


def _no_3d_peer_note() -> str:
  """Why the 3D Captum rows are skipped: `medjax.transfer` maps no torch 3D ResNet-18 (checked, not assumed)."""
  from medjax import transfer
  mapped = sorted(source for source, name in transfer.supported() if name == "resnet18")
  return (f"skipped: medjax.transfer maps resnet18 only to {'/'.join(mapped)} (2D); no torch 3D ResNet-18 with the "
          "same weights")


def _row(case: Case, method: str, framework: str, result: Optional[Dict[str, Any]], ratio: Optional[float],
         note: str = "") -> str:
  shape = "x".join(str(n) for n in case.input_shape) + f" x {case.batch_size}"
  if result is None:
    return f"| {case.name} | {shape} | {method} | {framework} | - | - | - | {note} |"
  ratio_text = "" if ratio is None else f"{ratio:.2f}"
  return (f"| {case.name} | {shape} | {method} | {framework} | {result['compile_s']:.1f} | {result['median_s']:.3f} "
          f"| {result['maps_per_s']:.2f} | {ratio_text} |")


def run(args) -> List[str]:
  """Times every (case, method, framework); returns the printed lines (header and table rows)."""
  import jax
  peers = _captum()
  threads = args.threads or os.cpu_count()
  lines = []
  versions = f"jax {jax.__version__}, devices {jax.local_device_count()} x {jax.devices()[0].platform}"
  if peers is not None:
    torch = peers[0]
    torch.set_num_threads(threads)
    import captum
    versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads), captum {captum.__version__}"
  else:
    versions += ", Captum rows skipped (captum / torchvision not installed: pip install -e '.[peers]')"
  methods = {"grad_cam": "Grad-CAM (layer4)", "ig": f"IG {args.ig_steps} steps gausslegendre, "
                                                    f"chunks of {args.ig_batch_steps}"}
  lines += [f"interpret_speed: {versions}; warmup {args.warmup}, median of {args.repeats}", "", HEADER]
  for line in lines:
    print(line, flush=True)
  for case in cases(args.quick, args.batch_2d, args.batch_3d, args.size_2d, args.size_3d):
    if case.spatial_dims not in args.dims:
      continue
    setup = medjax_setup(case)
    for method in args.methods:
      ours = time_medjax(case, method, args.ig_steps, args.ig_batch_steps, args.warmup, args.repeats,
                         args.device_count_independent, setup)
      theirs, note = None, ""
      if peers is None:
        note = "Captum not installed"
      elif case.spatial_dims == 3:
        note = _no_3d_peer_note()
      else:
        theirs = time_captum(peers, case, method, args.ig_steps, args.ig_batch_steps, args.warmup, args.repeats,
                             setup)
      ratio = None if theirs is None else ours["maps_per_s"] / theirs["maps_per_s"]
      framework = "medjax" + (f" ({ours['devices']} devices)" if ours["devices"] > 1 else "")
      rows = [_row(case, methods[method], framework, ours, ratio),
              _row(case, methods[method], "Captum", theirs, None, note)]
      for row in rows:
        print(row, flush=True)
      lines += rows
  return lines


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.interpret_speed", description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes (32^2 / 32^3, batch 1) for the smoke test")
  p.add_argument("--device_count_independent", "--device-count-independent", action="store_true",
                 help="medjax on one device (as Captum), not sharded over every local device")
  p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="which cases (2D, 3D)")
  p.add_argument("--methods", nargs="+", default=["grad_cam", "ig"], choices=["grad_cam", "ig"])
  p.add_argument("--size_2d", type=int, default=224)
  p.add_argument("--size_3d", type=int, default=64)
  p.add_argument("--batch_2d", type=int, default=8)
  p.add_argument("--batch_3d", type=int, default=2)
  p.add_argument("--ig_steps", type=int, default=64)
  p.add_argument("--ig_batch_steps", type=int, default=8,
                 help="path points per pass (medjax batch_steps; Captum internal_batch_size = this x batch)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
  p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
  p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default os.cpu_count())")
  return p


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
  args = parser().parse_args(argv)
  if args.quick:
    args.ig_steps, args.ig_batch_steps, args.warmup, args.repeats = min(args.ig_steps, 4), 2, 0, 1
  return run(args)


if __name__ == "__main__":
  main()
