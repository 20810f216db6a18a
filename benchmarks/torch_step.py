r"""PyTorch/MONAI peer of `python -m medjax.tools.benchmark`: one model's training step (or forward pass), timed.

Written for medjax (not copied from any other benchmark). Each case builds the PyTorch/MONAI network that
matches a medjax row of benchmarks/benchmarks.md, with the same input shape, batch size, number of classes,
loss kind and optimizer (Adam 1e-4), and random inputs and labels made on the device once, so host
transfers are not timed. The medjax command each case pairs with (`CASES[name].medjax`):

  unet3d      python -m medjax.tools.benchmark --model unet --input_shape 32,32,32,1 --batch_size 2 \
      --kwargs "spatial_dims=3,num_classes=3,features=(8,16,32,64),blocks_per_stage=1"
  resnet18    python -m medjax.tools.benchmark --model resnet18 --input_shape 28,28,3 --batch_size 32 \
      --kwargs "spatial_dims=2,num_classes=2,small_input=True"
  unetr       python -m medjax.tools.benchmark --model unetr --input_shape 32,32,32,1 --batch_size 1 \
      --kwargs "num_classes=3,image_size=32,feature_size=8,hidden_size=96,num_layers=4,num_heads=4,mlp_dim=384"
  swin_unetr  python -m medjax.tools.benchmark --model swin_unetr --input_shape 64,64,64,1 --batch_size 1 \
      --kwargs "num_classes=3,feature_size=12" --steps 10

The networks (parameter counts equal to medjax's: tests/benchmarks/test_torch_step.py):
- unet3d: medjax's nnU-Net-style U-Net (strided first conv per stage, bias-free 3x3x3 convs, instance norm
  with affine, leaky ReLU 0.01, kernel-2 stride-2 transposed-conv upsampling with bias, concatenated skips,
  1x1 head). With `--blocks_per_stage 2` it is MONAI's `DynUNet` (the same design, two convs per stage);
  MONAI has no one-conv-per-stage version, so the default (1, as the medjax row) is written here in torch.
- resnet18: torchvision's `resnet18` with the 28 px stem (3x3 stride-1 conv, no max-pool), 2 classes.
- unetr: MONAI's `UNETR` (patch 16); MONAI fixes 12 transformer blocks, so the ViT keeps the first
  `num_layers` and the skips read medjax's default blocks (`j * num_layers // 4 + 1`, MONAI's 4, 7, 10 at 12).
- swin_unetr: MONAI's `SwinUNETR` (v1, window 7, depths 2-2-2-2, heads 3-6-12-24), at 64^3, not at the
  32^3 of the benchmarks.md row: at 32^3 its deepest decoder block sees a 1x1x1 map, where torch's instance
  norm raises ("Expected more than 1 spatial element"), in training and in `eval()` alike (medjax normalises
  the single voxel to 0 and runs). The medjax side of this pair is therefore the 64^3 command above.

Loss as medjax's tool: Dice + cross-entropy on random labels for the segmentation cases (MONAI's `DiceCELoss`,
softmax, background left out of the Dice, per-example Dice, smoothing 1e-5: medjax's "dice_xent"
defaults), cross-entropy for resnet18. A step is forward, loss, backward, `optimizer.step()`, with
gradients set to None; `--mode forward` times `model.eval()` forward passes under `torch.no_grad()`.

Timing: the first step alone gives `compile_s` (first-call wall time: lazy initialisation, cuDNN
autotuning, and the `torch.compile` compilation with `--compile`; medjax's `compile_s` is XLA's compile
without running it), then `--warmup` untimed steps, then the median of `--steps` steps, each ended by
`torch.cuda.synchronize()` on a GPU (as medjax blocks on every step), `time.perf_counter` around it.
`--amp` runs forward and loss under bf16 autocast with float32 parameters (medjax's `--dtype bfloat16`).
On a GPU cuDNN autotuning is on and float32 matmuls and convolutions may use TF32 (`--no_tf32` turns that
off), as JAX's default precision allows on NVIDIA GPUs. On a CPU shared with other jobs, `--threads 1` avoids
torch's intra-op threads spinning against them (2 threads on a loaded 2-core machine ran ~40x slower).

  python -m benchmarks.torch_step --case unet3d --device cpu [--threads N]
  python -m benchmarks.torch_step --case unet3d --device cuda [--amp] [--compile] [--channels_last]

prints one JSON line: mode, compile_s, median_ms, samples_per_s, steps_timed, peak_memory_bytes (GPU),
params, the case, shapes and options, the torch / torchvision / monai versions and the device. Needs the
`peers` extra (pip install -e ".[peers]"); this module imports torch only inside its functions, so `--help`
and the case table work without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

_BENCH = "python -m medjax.tools.benchmark"


class Case(NamedTuple):
  """A benchmarked network and the medjax row it pairs with."""
  description: str
  input_shape: Tuple[int, ...]  # spatial..., channels (medjax's order; NCHW / NCDHW inside torch)
  batch_size: int
  num_classes: int
  loss: str  # "dice_xent" (dense logits) or "xent" (class logits)
  medjax: str  # the medjax command this case pairs with
  steps: int = 20


CASES: Dict[str, Case] = {
    "unet3d": Case(
        "U-Net 3D, features 8/16/32/64, 1 conv per stage (medjax's design in torch)",
        (32, 32, 32, 1), 2, 3, "dice_xent",
        f"{_BENCH} --model unet --input_shape 32,32,32,1 --batch_size 2 "
        '--kwargs "spatial_dims=3,num_classes=3,features=(8,16,32,64),blocks_per_stage=1"'),
    "resnet18": Case(
        "torchvision ResNet-18, 3x3 stride-1 stem without max-pool, 2 classes",
        (28, 28, 3), 32, 2, "xent",
        f"{_BENCH} --model resnet18 --input_shape 28,28,3 --batch_size 32 "
        '--kwargs "spatial_dims=2,num_classes=2,small_input=True"'),
    "unetr": Case(
        "MONAI UNETR, image 32, feature 8, hidden 96, 4 layers, 4 heads, MLP 384",
        (32, 32, 32, 1), 1, 3, "dice_xent",
        f"{_BENCH} --model unetr --input_shape 32,32,32,1 --batch_size 1 "
        '--kwargs "num_classes=3,image_size=32,feature_size=8,hidden_size=96,num_layers=4,num_heads=4,mlp_dim=384"'),
    "swin_unetr": Case(
        "MONAI SwinUNETR (v1), feature size 12, 64^3 (MONAI cannot run the 32^3 row)",
        (64, 64, 64, 1), 1, 3, "dice_xent",
        f"{_BENCH} --model swin_unetr --input_shape 64,64,64,1 --batch_size 1 "
        '--kwargs "num_classes=3,feature_size=12" --steps 10', steps=10),
}
UNET_FEATURES = (8, 16, 32, 64)
UNETR_SIZES = dict(feature_size=8, hidden_size=96, num_layers=4, num_heads=4, mlp_dim=384)
SWIN_FEATURE_SIZE = 12


def _torch():
  try:
    import torch
  except ImportError as e:
    raise SystemExit("benchmarks/torch_step.py needs PyTorch and MONAI (pip install -e '.[peers]'); medjax "
                     "does not.") from e
  return torch


def build_unet(spatial_dims: int, in_channels: int, num_classes: int, features: Sequence[int] = UNET_FEATURES,
               blocks_per_stage: int = 1):
  """medjax's `unet` in torch: MONAI's DynUNet for 2 convs per stage, the same design written here otherwise."""
  torch = _torch()
  nn = torch.nn
  levels = len(features)
  if blocks_per_stage == 2:
    if levels < 3:
      raise ValueError(f"MONAI's DynUNet (blocks_per_stage=2) needs at least 3 levels, got features {features}.")
    from monai.networks.nets import DynUNet
    return DynUNet(spatial_dims, in_channels, num_classes, kernel_size=[3] * levels,
                   strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
                   filters=list(features), trans_bias=True)
  if blocks_per_stage < 1:
    raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}.")
  conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
  norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
  up = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]

  def stage(cin: int, cout: int, stride: int):
    layers = []
    for i in range(blocks_per_stage):
      layers += [conv(cin if i == 0 else cout, cout, 3, stride if i == 0 else 1, 1, bias=False),
                 norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*layers)

  class UNet(nn.Module):
    """Encoder stages (the first conv of each strided by 2 below level 0), up-convs, decoder stages, 1x1 head."""

    def __init__(self):
      super().__init__()
      widths = [in_channels] + list(features)
      self.encoders = nn.ModuleList(stage(widths[i], widths[i + 1], 1 if i == 0 else 2) for i in range(levels))
      self.ups = nn.ModuleList(up(features[i + 1], features[i], 2, 2, bias=True) for i in range(levels - 1))
      self.decoders = nn.ModuleList(stage(2 * features[i], features[i], 1) for i in range(levels - 1))
      self.head = conv(features[0], num_classes, 1, bias=True)

    def forward(self, x):
      skips = []
      for encoder in self.encoders:
        x = encoder(x)
        skips.append(x)
      for i in reversed(range(levels - 1)):
        x = self.decoders[i](torch.cat([self.ups[i](x), skips[i]], dim=1))
      return self.head(x)

  return UNet()


def build_resnet18(in_channels: int, num_classes: int):
  """torchvision's ResNet-18 with the small-input stem (medjax `small_input=True`)."""
  torch = _torch()
  import torchvision
  model = torchvision.models.resnet18(num_classes=num_classes)
  model.conv1 = torch.nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
  model.maxpool = torch.nn.Identity()
  return model


def unetr_skip_layers(num_layers: int, levels: int = 4) -> List[int]:
  """medjax's default UNETR skip blocks (1-based), `j * num_layers // levels + 1`: (4, 7, 10) for 12 layers."""
  return [min(num_layers, j * num_layers // levels + 1) for j in range(1, levels)]


def build_unetr(in_channels: int, num_classes: int, image_size: int, feature_size: int = 8, hidden_size: int = 96,
                num_layers: int = 4, num_heads: int = 4, mlp_dim: int = 384):
  """MONAI's UNETR with its ViT cut to `num_layers` blocks and the skips read from medjax's blocks."""
  torch = _torch()
  from monai.networks.nets import UNETR
  skips = [i - 1 for i in unetr_skip_layers(num_layers)]

  class ShallowUNETR(UNETR):
    """MONAI's UNETR forward with the skip hidden states at `skips` (MONAI's forward reads 3, 6, 9)."""

    def forward(self, x_in):
      x, hidden = self.vit(x_in)
      enc1 = self.encoder1(x_in)
      enc2 = self.encoder2(self.proj_feat(hidden[skips[0]]))
      enc3 = self.encoder3(self.proj_feat(hidden[skips[1]]))
      enc4 = self.encoder4(self.proj_feat(hidden[skips[2]]))
      dec3 = self.decoder5(self.proj_feat(x), enc4)
      return self.out(self.decoder2(self.decoder3(self.decoder4(dec3, enc3), enc2), enc1))

  model = ShallowUNETR(in_channels, num_classes, image_size, feature_size=feature_size, hidden_size=hidden_size,
                       mlp_dim=mlp_dim, num_heads=num_heads)
  model.vit.blocks = torch.nn.ModuleList(list(model.vit.blocks)[:num_layers])
  return model


def build_swin_unetr(in_channels: int, num_classes: int, feature_size: int = SWIN_FEATURE_SIZE):
  """MONAI's SwinUNETR v1 with its defaults (medjax's `swin_unetr` mirrors that layout)."""
  from monai.networks.nets import SwinUNETR
  return SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=feature_size, spatial_dims=3)


def build_model(case: str, input_shape: Sequence[int], num_classes: int, features: Sequence[int] = UNET_FEATURES,
                blocks_per_stage: int = 1):
  """The torch module of `case` for inputs of `input_shape` (spatial..., channels)."""
  spatial, channels = tuple(input_shape[:-1]), int(input_shape[-1])
  if case == "unet3d":
    factor = 2 ** (len(features) - 1)
    if any(n % factor for n in spatial):
      raise ValueError(f"unet3d: every spatial size must be divisible by {factor}, got {spatial}.")
    return build_unet(len(spatial), channels, num_classes, features, blocks_per_stage)
  if case == "resnet18":
    if len(spatial) != 2:
      raise ValueError(f"resnet18 is 2D (torchvision), got input shape {tuple(input_shape)}.")
    return build_resnet18(channels, num_classes)
  if case == "unetr":
    if len(set(spatial)) != 1:
      raise ValueError(f"unetr: the image must be a cube here, got {spatial}.")
    return build_unetr(channels, num_classes, spatial[0], **UNETR_SIZES)
  if case == "swin_unetr":
    return build_swin_unetr(channels, num_classes)
  raise ValueError(f"Unknown case {case!r}; choose from {', '.join(CASES)}.")


def _loss_fn(kind: str):
  torch = _torch()
  if kind == "xent":
    return torch.nn.CrossEntropyLoss()
  from monai.losses import DiceCELoss
  dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=False, smooth_nr=1e-5,
                       smooth_dr=1e-5)
  return lambda logits, labels: dice_ce(logits, labels[:, None])


def _version(module: str) -> Optional[str]:
  """`module.__version__`, None where it is not installed (resnet18 needs no MONAI, the others no torchvision)."""
  try:
    return __import__(module).__version__
  except ImportError:
    return None


def _device_name(torch, device: str) -> str:
  if device.startswith("cuda"):
    return torch.cuda.get_device_name(torch.device(device))
  return "cpu"


def run(case: str, device: Optional[str] = None, mode: str = "train", batch_size: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None, steps: Optional[int] = None, warmup: int = 3,
        amp: bool = False, torch_compile: bool = False, channels_last: bool = False, tf32: bool = True,
        features: Sequence[int] = UNET_FEATURES, blocks_per_stage: int = 1, num_classes: Optional[int] = None,
        seed: int = 0, threads: Optional[int] = None) -> Dict[str, Any]:
  """Times `case` (defaults from `CASES`); returns the JSON-ready report."""
  torch = _torch()
  spec = CASES[case]
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  batch_size = batch_size or spec.batch_size
  input_shape = tuple(input_shape or spec.input_shape)
  steps = steps or spec.steps
  num_classes = num_classes or spec.num_classes
  if mode not in ("train", "forward"):
    raise ValueError(f"mode must be 'train' or 'forward', got {mode!r}.")
  cuda = device.startswith("cuda")
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  if cuda:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
  model = build_model(case, input_shape, num_classes, features, blocks_per_stage).to(device)
  params = sum(p.numel() for p in model.parameters())
  spatial = input_shape[:-1]
  memory_format = torch.contiguous_format
  if channels_last:
    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}[len(spatial)]
    model = model.to(memory_format=memory_format)
  image = torch.randn((batch_size, input_shape[-1]) + spatial, device=device).contiguous(memory_format=memory_format)
  label_shape = (batch_size,) + (spatial if spec.loss == "dice_xent" else ())
  labels = torch.randint(0, num_classes, label_shape, device=device)
  step_model = torch.compile(model) if torch_compile else model
  loss_fn = _loss_fn(spec.loss)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
  autocast = lambda: torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=amp)

  def train_step():
    with autocast():
      logits = step_model(image)
    loss = loss_fn(logits.float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  def forward_step():
    with torch.no_grad(), autocast():
      step_model(image)

  if mode == "train":
    model.train()
    call = train_step
  else:
    model.eval()
    call = forward_step

  def timed() -> float:
    start = time.perf_counter()
    call()
    if cuda:
      torch.cuda.synchronize()
    return time.perf_counter() - start

  if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  compile_s = timed()
  for _ in range(warmup):
    timed()
  times = [timed() for _ in range(steps)]
  median = statistics.median(times)
  model_name = spec.description
  if case == "unet3d" and (tuple(features), blocks_per_stage) != (UNET_FEATURES, 1):
    widths = "/".join(str(f) for f in features)
    model_name = (f"U-Net {len(spatial)}D, features {widths}, {blocks_per_stage} conv(s) per stage"
                  + (" (MONAI DynUNet)" if blocks_per_stage == 2 else " (medjax's design in torch)"))
  return {"framework": "torch", "case": case, "model": model_name, "mode": mode,
          "input_shape": [batch_size] + list(input_shape), "num_classes": num_classes, "loss": spec.loss,
          "params": params, "dtype": "bfloat16" if amp else "float32", "compile": torch_compile,
          "channels_last": channels_last, "tf32": bool(tf32 and cuda), "compile_s": compile_s,
          "median_ms": median * 1e3, "samples_per_s": batch_size / median, "steps_timed": len(times),
          "threads": torch.get_num_threads(), "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "device": _device_name(torch, device), "torch": torch.__version__, "torchvision": _version("torchvision"),
          "monai": _version("monai"), "medjax_command": spec.medjax}


def _ints(text: str) -> Tuple[int, ...]:
  return tuple(int(s) for s in text.split(",") if s.strip())


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.torch_step", description=__doc__.split("\n\n", 1)[0],
                              epilog="cases: " + "; ".join(f"{k}: {v.description}" for k, v in CASES.items()))
  p.add_argument("--case", choices=sorted(CASES), required=True)
  p.add_argument("--mode", choices=("train", "forward"), default="train")
  p.add_argument("--batch_size", type=int, default=None, help="default: the case's (the medjax row's)")
  p.add_argument("--input_shape", type=_ints, default=None,
                 help="spatial...,channels as medjax writes it, e.g. 32,32,32,1 (default: the case's)")
  p.add_argument("--num_classes", type=int, default=None, help="default: the case's")
  p.add_argument("--steps", type=int, default=None, help="timed steps, the median is reported (default: as medjax)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
  p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
  p.add_argument("--amp", action="store_true", help="bf16 autocast (medjax's --dtype bfloat16)")
  p.add_argument("--compile", action="store_true", help="torch.compile the model (counted in compile_s)")
  p.add_argument("--channels_last", action="store_true", help="channels-last memory format for model and input")
  p.add_argument("--no_tf32", action="store_true", help="no TF32 for float32 matmuls and convs on the GPU")
  p.add_argument("--features", type=_ints, default=UNET_FEATURES, help="unet3d widths (default 8,16,32,64)")
  p.add_argument("--blocks_per_stage", type=int, default=1, help="unet3d convs per stage (2: MONAI DynUNet)")
  p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
  p.add_argument("--seed", type=int, default=0)
  return p


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parser().parse_args(argv)
  report = run(args.case, args.device, args.mode, args.batch_size, args.input_shape, args.steps, args.warmup,
               args.amp, args.compile, args.channels_last, not args.no_tf32, args.features, args.blocks_per_stage,
               args.num_classes, args.seed, args.threads)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
