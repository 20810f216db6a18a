"""PyTorch peer of `experiments/medmnist_resnet.py`'s official protocol, for wall-time comparisons.

An equivalent torch loop with its DataLoader (written for medjax; it is not the MedMNIST authors' script):
the same ResNet-18 (3x3 stride-1 stem, no max-pool; 2D, or 3D with inflated k^3 kernels), Adam 1e-3,
lr x0.1 at 50% and 75% of the epochs, batch 128 (2D) / 32 (3D), cross-entropy, inputs (x/255 - 0.5)/0.5,
grayscale repeated to 3 channels in 2D, validation AUC every epoch, a copy of the best-validation weights
evaluated on test. Needs torch (and scikit-learn for the AUC), which the GPU machines have; medjax itself
does not depend on torch. ACS convolutions have no torch counterpart here.

  python benchmarks/medmnist_torch.py --subset pneumoniamnist --data_dir DIR [--epochs 100] [--device cuda]

prints one JSON line: wall_s (the whole run: data loading, training, evaluations), train_s, steps_per_s,
and the best-validation and last-epoch test AUC / ACC.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Dict, Tuple

import numpy as np


def _torch():
  try:
    import torch
  except ImportError as e:
    raise SystemExit("benchmarks/medmnist_torch.py needs PyTorch (pip install torch); medjax does not.") from e
  return torch


def build_resnet18(spatial_dims: int, in_channels: int, num_classes: int):
  """ResNet-18 with the 28 px stem (3x3, stride 1, no max-pool), as torch modules of rank `spatial_dims`."""
  torch = _torch()
  nn = torch.nn
  conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
  norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
  pool = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]

  class Block(nn.Module):

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, cout, 3, stride, 1, bias=False), norm(cout)
      self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1, bias=False), norm(cout)
      self.shortcut = nn.Identity()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  layers = [conv(in_channels, 64, 3, 1, 1, bias=False), norm(64), nn.ReLU()]
  cin = 64
  for i, width in enumerate((64, 128, 256, 512)):
    for j in range(2):
      layers.append(Block(cin, width, 2 if (i > 0 and j == 0) else 1))
      cin = width
  layers += [pool(1), nn.Flatten(), nn.Linear(512, num_classes)]
  return nn.Sequential(*layers)


def load_split(npz, split: str, spatial_dims: int) -> Tuple[np.ndarray, np.ndarray]:
  """(images float32 (N, C, *spatial) in [-1, 1], labels int64 (N,)) of one official split."""
  images = npz[f"{split}_images"].astype(np.float32) / 255.0
  images = (images - 0.5) / 0.5
  images = images[:, None]  # (N, 1, *spatial); MedMNIST's grayscale files carry no channel axis
  if spatial_dims == 2:
    images = np.repeat(images, 3, axis=1)
  return images, npz[f"{split}_labels"].reshape(-1).astype(np.int64)


def evaluate(model, loader, device) -> Dict[str, float]:
  """Test-style metrics: ROC-AUC (binary, or one-vs-rest macro) and accuracy (0.5 / argmax)."""
  torch = _torch()
  from sklearn import metrics
  model.eval()
  probs, labels = [], []
  with torch.no_grad():
    for x, y in loader:
      probs.append(torch.softmax(model(x.to(device, non_blocking=True)), -1).float().cpu().numpy())
      labels.append(y.numpy())
  p, y = np.concatenate(probs), np.concatenate(labels)
  if p.shape[1] == 2:
    return {"auc": float(metrics.roc_auc_score(y, p[:, 1])), "acc": float(np.mean((p[:, 1] > 0.5) == y))}
  return {"auc": float(metrics.roc_auc_score(y, p, multi_class="ovr")), "acc": float(np.mean(p.argmax(1) == y))}


def run(subset: str, data_dir: str, epochs: int, device: str, num_workers: int, seed: int,
        size: int = 28) -> Dict[str, float]:
  """Trains and evaluates one official-protocol run; returns the timing and the test metrics."""
  torch = _torch()
  start = time.perf_counter()
  torch.manual_seed(seed)
  np.random.seed(seed)
  name = subset if size == 28 else f"{subset}_{size}"
  path = os.path.join(data_dir, f"{name}.npz")
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: put the official MedMNIST file there or pass --data_dir.")
  npz = np.load(path)
  spatial_dims = npz["train_images"].ndim - 1
  batch = 128 if spatial_dims == 2 else 32
  splits = {s: load_split(npz, s, spatial_dims) for s in ("train", "val", "test")}
  num_classes = int(splits["train"][1].max()) + 1

  def loader(split: str, train: bool):
    x, y = splits[split]
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return torch.utils.data.DataLoader(data, batch_size=batch if train else 2 * batch, shuffle=train,
                                       num_workers=num_workers, pin_memory=device.startswith("cuda"))

  loaders = {s: loader(s, s == "train") for s in splits}
  model = build_resnet18(spatial_dims, splits["train"][0].shape[1], num_classes).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.5 * epochs), int(0.75 * epochs)], 0.1)
  loss_fn = torch.nn.CrossEntropyLoss()
  best_auc, best_weights, steps = -math.inf, None, 0
  train_s = 0.0
  for _ in range(epochs):
    model.train()
    epoch_start = time.perf_counter()
    for x, y in loaders["train"]:
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
      loss.backward()
      optimizer.step()
      steps += 1
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    train_s += time.perf_counter() - epoch_start
    schedule.step()
    val_auc = evaluate(model, loaders["val"], device)["auc"]
    if val_auc > best_auc:
      best_auc, best_weights = val_auc, copy.deepcopy(model.state_dict())
  last = evaluate(model, loaders["test"], device)
  if best_weights is not None:  # None when no validation AUC was finite
    model.load_state_dict(best_weights)
  best = evaluate(model, loaders["test"], device)
  return {"subset": subset, "framework": "torch", "torch": torch.__version__, "device": device,
          "epochs": epochs, "steps": steps, "wall_s": round(time.perf_counter() - start, 1),
          "train_s": round(train_s, 1), "steps_per_s": round(steps / train_s, 2), "best_val_auc": best_auc,
          "test_best_auc": best["auc"], "test_best_acc": best["acc"], "test_last_auc": last["auc"],
          "test_last_acc": last["acc"]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--subset", default="breastmnist")
  parser.add_argument("--data_dir", default=os.path.join("..", "shared", "data", "medmnist"))
  parser.add_argument("--size", type=int, default=28)
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--device", default="cuda")
  parser.add_argument("--num_workers", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(json.dumps(run(args.subset, args.data_dir, args.epochs, args.device, args.num_workers, args.seed,
                       args.size)), flush=True)


if __name__ == "__main__":
  main()
