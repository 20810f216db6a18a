"""Self-supervised pretraining of the MedMNIST ResNet-18 on the 2D MedMNIST images we hold, without labels:
PneumoniaMNIST (chest X-ray) and BreastMNIST (ultrasound) train images pooled (`pooled_images`), 28 px,
grayscale repeated to 3 channels as experiments/medmnist_resnet.py's 2D runs, so its encoder is exactly that
experiment's ResNet-18 and loads into it with `init=` (README "Self-supervised pretraining").

Arguments (`--config experiments/medmnist_simclr.py:k=v,...`):
  method    "simclr" (default) | "byol" | "moco" | "rotation"
  steps     optimizer steps (default 400)
  batch     images per step (default 128; contrastive methods see 2 views of each)
  lr        peak learning rate of AdamW (default 1e-3; 5-step x 10 warmup, cosine decay)
  temperature  NT-Xent / InfoNCE temperature (default 0.2)
  seed      0
  data_dir  folder of the official .npz files (default ../shared/data/medmnist, from the repository root)
  quick     true: 4 steps of a narrow model on batch 8 (still reads data_dir)

Run, then evaluate the encoder on BreastMNIST by linear probe, fine-tuning and scratch at the same budget:
  python -m medjax.main --config experiments/medmnist_simclr.py --workdir runs/ssl/simclr_r18
  python -m medjax.tools.probe --config experiments/medmnist_resnet.py:recipe=finetune \\
      --init runs/ssl/simclr_r18 --workdir runs/ssl/probe_breast --seeds 0,1,2
Validation: the pretext loss on the pooled validation images ("val/pretext_loss"); the best one is kept.
"""

import os

import ml_collections as mlc

from medjax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data", "medmnist")

METHODS = ("simclr", "byol", "moco", "rotation")
SUBSETS = ("pneumoniamnist", "breastmnist")
# Views for 28 px images: a zoom-in crop of up to 1.75x with a small rotation and a shift of up to 3 px, a
# horizontal flip (up/down carries anatomy), and intensity jitter; edge padding, as the fine-tuning recipe.
VIEWS = dict(flip=dict(p=0.5, axes=(-1,)),
             affine=dict(p=1.0, rotate_deg=15.0, scale=(1.0, 1.75), translate=3.0),
             brightness=dict(p=0.8, range=(0.6, 1.4)), contrast=dict(p=0.8, range=(0.6, 1.4)),
             gamma=dict(p=0.5, range=(0.7, 1.5)), blur=dict(p=0.3, sigma=(0.1, 0.8)),
             noise=dict(p=0.3, std=(0.0, 0.1)), image_pad="edge")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="simclr", steps=400, batch=128, lr=1e-3, temperature=0.2, seed=0,
                             data_dir=DEFAULT_DATA_DIR, quick=False)
  if arg.method not in METHODS:
    raise config_lib.ConfigError(f"experiments/medmnist_simclr.py: method must be one of {METHODS}, got "
                                 f"{arg.method!r}.")
  # The downstream experiment's model, so that the encoder loads into it.
  downstream = config_lib.load_config(os.path.join(HERE, "medmnist_resnet.py") + f":quick={arg.quick}")
  data_dir = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(arg.data_dir)))

  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100
  c.tags = dict(experiment="medmnist_simclr", method=arg.method, quick=arg.quick)
  c.data = dict(name="pooled_images", members=tuple(
      dict(name="medmnist", subset=s, size=28, data_dir=data_dir, channels=3) for s in SUBSETS))
  c.input = dict(batch_size=arg.batch, eval_batch_size=arg.batch)
  c.model_name, c.model = downstream.model_name, downstream.model.to_dict()
  c.compute_dtype = "float32"
  c.pretext = dict(name=arg.method)
  if arg.method != "rotation":
    c.pretext.views = VIEWS
  if arg.method in ("simclr", "moco"):
    c.pretext.temperature = arg.temperature

  c.optim = dict(name="adamw", wd=1e-4)
  c.lr = arg.lr
  c.schedule = dict(decay="cosine", warmup_steps=max(1, arg.steps // 20))
  c.grad_clip_norm = None
  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.best_metric, c.best_mode = "val/pretext_loss", "min"
  c.checkpoint = dict(max_to_keep=1, keep_best=1, async_save=True)

  if arg.quick:
    c.total_steps, c.schedule.warmup_steps = 4, 1
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.input.batch_size = c.input.eval_batch_size = 8
    if arg.method != "rotation":
      c.pretext.update(projection_dim=16, hidden_dim=32)
  return c


def get_sweep(arg=None):
  """Three seeds of the pretraining."""
  del arg
  return [{"seed": 0}, {"seed": 1}, {"seed": 2}]
