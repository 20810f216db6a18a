"""DP-SGD on MedMNIST (BreastMNIST, PneumoniaMNIST) against non-private training of the same model: ResNet-18
with GroupNorm (BatchNorm has no per-example gradient), the same optimizer, batch and epochs.

Arguments (`--config experiments/medmnist_dp.py:k=v,...`):
  subset    "breastmnist" (default) | "pneumoniamnist"
  eps       8 (default) | 1 | 0: non-private; the target epsilon at delta = 1/N after all epochs (the noise
            multiplier is computed by dp-accounting's RDP accountant; medjax.privacy)
  clip      1.0: the per-example L2 clipping norm C
  epochs    30 (breastmnist) / 10 (pneumoniamnist) by default; batch  128 (the expected Poisson batch)
  width     32: the ResNet-18's first-stage channels (64 is torchvision's; 32 keeps 3 seeds x 3 settings x 2
            datasets within CPU hours, as in experiments/medmnist_federated.py; benchmarks/dp_speed.py uses 64)
  lr        1e-3 (Adam); seed  0; data_dir  ../shared/data/medmnist
  quick     true: synthetic lesions (no data needed), 4 steps, a ResNet-18 of width 8 with one block a stage

DP runs sample Poisson batches (each image with probability 128 / N per step, padded to a bucket of ~1 sd; the
step compiles once per bucket), clip every example's gradient
to C, add Gaussian noise N(0, sigma^2 C^2) to the sum and divide by the expected batch; epsilon is logged as
`privacy/epsilon` and written to results.json ("privacy"). Images are single-channel 28 px, no augmentation.

  python -m medjax.main --config experiments/medmnist_dp.py:subset=breastmnist,eps=8,seed=0 --workdir runs/dp/breast_e8_s0
  python -m medjax.main --config experiments/medmnist_dp.py:subset=breastmnist,eps=0,seed=0 --workdir runs/dp/breast_np_s0
  python -m medjax.main --config experiments/medmnist_dp.py:subset=pneumoniamnist,eps=1 --workdir runs/dp/pneu_e1_s0
  python -m medjax.main --config experiments/medmnist_dp.py:quick=true --workdir /tmp/dp_quick
Three seeds: `get_sweep` returns [{"seed": 0}, {"seed": 1}, {"seed": 2}].
"""

import math
import os

import ml_collections as mlc

from medjax import config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSETS = {"breastmnist": (546, 30), "pneumoniamnist": (4708, 10)}  # official train size, default epochs


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, subset="breastmnist", eps=8.0, clip=1.0, epochs=0, batch=128, width=32, lr=1e-3,
                             seed=0, data_dir=os.path.join("..", "shared", "data", "medmnist"), quick=False)
  if arg.subset not in SUBSETS:
    raise config_lib.ConfigError(f"experiments/medmnist_dp.py: subset must be one of {', '.join(SUBSETS)}, got "
                                 f"{arg.subset!r}.")
  if arg.eps < 0:
    raise config_lib.ConfigError(f"experiments/medmnist_dp.py: eps must be > 0, or 0 for non-private; got {arg.eps}.")
  num_train, default_epochs = SUBSETS[arg.subset]
  epochs = arg.epochs or default_epochs
  steps_per_epoch = math.ceil(num_train / arg.batch)

  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = epochs * steps_per_epoch
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps_per_epoch
  c.tags = dict(experiment="medmnist_dp", subset=arg.subset, eps=arg.eps, clip=arg.clip, epochs=epochs,
                quick=arg.quick)
  c.data = dict(name="medmnist", subset=arg.subset, size=28, channels=1,
                data_dir=os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(arg.data_dir))))
  c.input = dict(batch_size=arg.batch, eval_batch_size=256)
  c.model_name = "resnet18"
  c.model = dict(num_classes=2, small_input=True, norm="group", width=arg.width)
  c.compute_dtype = "float32"
  c.loss = "xent"
  c.optim = dict(name="adam")
  c.lr = arg.lr
  c.grad_clip_norm = None
  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.test_split = "test"
  c.checkpoint = dict(max_to_keep=1, keep_best=1, async_save=True)
  if arg.eps:
    c.privacy = dict(clip_norm=arg.clip, target_epsilon=arg.eps)
  if arg.quick:
    c.data = dict(name="synthetic_lesions", spatial_dims=2, image_size=16, num_classes=3, num_train=64, num_val=16,
                  num_test=16)
    c.model = dict(num_classes=3, small_input=True, norm="group", width=8, stage_sizes=(1, 1, 1, 1))
    c.input = dict(batch_size=16, eval_batch_size=16)
    c.total_steps = 4
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 4, 2
  return c


def get_sweep(arg=None):
  return [{"seed": s} for s in (0, 1, 2)]
