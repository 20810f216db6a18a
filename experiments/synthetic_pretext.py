"""Self-supervised pretraining on 3D volumes without labels, for segmentation of the synthetic phantoms:
masked image modelling of a UNETR, or Models Genesis restoration of a U-Net. The images are the phantoms'
training volumes and, with `adrenal=true` (default), the AdrenalMNIST3D volumes (28^3 CT crops, all splits'
train images), pooled without labels (`pooled_images`). The encoder is experiments/synthetic_unet.py's model
at the same size, so it loads there with `init_from` (README "Self-supervised pretraining").

Arguments (`--config experiments/synthetic_pretext.py:k=v,...`):
  method    "mae" (default: masked image modelling, UNETR, 4^3 patches, 75% masked, per-patch normalised
            targets) | "genesis" (Models Genesis corruptions and restoration, U-Net) | "rotation" (U-Net)
  model     the encoder: "auto" (default: unetr for mae, unet otherwise) | "unet" | "unetr"
  size      volume side (default 28, AdrenalMNIST3D's); the phantoms are generated at this size
  steps     optimizer steps (default 300); batch 4 volumes
  adrenal   true (default) | false: phantoms only
  seed      0
  data_dir  folder of the official MedMNIST .npz files (default ../shared/data/medmnist)
  quick     true: 4 steps of a narrow model, phantoms only (no data files needed)

Run (pretraining, then fine-tuning on 16 labelled phantoms against scratch at equal steps, 3 seeds):
  python -m medjax.main --config experiments/synthetic_pretext.py:method=mae --workdir runs/ssl/mae_unetr
  python -m medjax.tools.probe --config experiments/synthetic_unet.py:model=unetr,size=28,num_train=16,test=true \\
      --init runs/ssl/mae_unetr --workdir runs/ssl/probe_unetr --seeds 0,1,2 --head seg_head \\
      --variants scratch,finetune
  python -m medjax.main --config experiments/synthetic_pretext.py:method=genesis --workdir runs/ssl/genesis_unet
  python -m medjax.tools.probe --config experiments/synthetic_unet.py:size=28,num_train=16,test=true \\
      --init runs/ssl/genesis_unet --workdir runs/ssl/probe_unet --seeds 0,1,2 --head seg_head \\
      --variants scratch,finetune
"""

import os

import ml_collections as mlc

from medjax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data", "medmnist")
METHODS = ("mae", "genesis", "rotation")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="mae", model="auto", size=28, steps=300, adrenal=True, seed=0,
                             data_dir=DEFAULT_DATA_DIR, quick=False)
  if arg.method not in METHODS:
    raise config_lib.ConfigError(f"experiments/synthetic_pretext.py: method must be one of {METHODS}, got "
                                 f"{arg.method!r}.")
  model = ("unetr" if arg.method == "mae" else "unet") if arg.model == "auto" else arg.model
  downstream = config_lib.load_config(os.path.join(HERE, "synthetic_unet.py")
                                      + f":model={model},size={arg.size},quick={arg.quick}")
  phantoms = dict(downstream.data.to_dict(), num_train=480)
  members = [phantoms]
  if arg.adrenal and not arg.quick:
    data_dir = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(arg.data_dir)))
    members.append(dict(name="medmnist", subset="adrenalmnist3d", size=28, data_dir=data_dir))
    if arg.size != 28:
      raise config_lib.ConfigError("experiments/synthetic_pretext.py: AdrenalMNIST3D volumes are 28^3; use size=28 "
                                   "or adrenal=false.")

  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100
  c.tags = dict(experiment="synthetic_pretext", method=arg.method, model=model, adrenal=arg.adrenal,
                quick=arg.quick)
  c.data = dict(name="pooled_images", members=tuple(members))
  c.input = dict(batch_size=4, eval_batch_size=8)
  c.model_name, c.model = downstream.model_name, downstream.model.to_dict()
  c.compute_dtype = "float32"
  c.pretext = dict(name=arg.method)
  if arg.method == "mae":
    c.pretext.update(patch_size=4, mask_ratio=0.75, norm_pix=True)

  c.optim = dict(name="adamw", wd=0.05 if arg.method == "mae" else 1e-5)
  c.lr = 1e-3
  c.schedule = dict(decay="cosine", warmup_steps=max(1, arg.steps // 20))
  c.grad_clip_norm = 1.0
  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.best_metric, c.best_mode = "val/pretext_loss", "min"
  c.checkpoint = dict(max_to_keep=1, keep_best=1, async_save=True)

  if arg.quick:
    c.total_steps, c.schedule.warmup_steps = 4, 1
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.input.batch_size = c.input.eval_batch_size = 2
  return c
