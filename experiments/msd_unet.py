"""3D U-Net on a Medical Segmentation Decathlon task, nnU-Net style: planned patch and topology, foreground-
biased patches, Dice + CE with deep supervision, 5-fold cross-validation.

Needs the task folder on disk (http://medicaldecathlon.com; nothing is downloaded), e.g.
data/msd/Task04_Hippocampus/{dataset.json, imagesTr/, labelsTr/, imagesTs/}. Run:
  python -m medjax.tools.plan --dataset msd --kwargs "data_dir='data/msd',task='Task04_Hippocampus',patch_size=(32,32,32)" --out runs/plan_hippo
  python -m medjax.main --config experiments/msd_unet.py:task=Task04_Hippocampus,data_dir=data/msd,plan=runs/plan_hippo/plan.json,fold=0 --workdir runs/hippo_f0
  python -m medjax.main --config experiments/msd_unet.py:quick=true,data_dir=DIR --workdir /tmp/q   # smoke test
Sweep over the folds: `python -m medjax.tools.sweep --config experiments/msd_unet.py:... --workdir runs/hippo_cv`.

Without a plan the patch is `patch` voxels per axis and cases keep their own spacing.
"""

import ml_collections as mlc

from medjax import config_lib

# (modality, class names) of the ten MSD tasks (Antonelli et al., Nature Communications 13, 4128, 2022).
TASKS = {
    "Task01_BrainTumour": (("FLAIR", "T1w", "t1gd", "T2w"), ("background", "edema", "non_enhancing", "enhancing")),
    "Task02_Heart": (("MRI",), ("background", "left_atrium")),
    "Task03_Liver": (("CT",), ("background", "liver", "cancer")),
    "Task04_Hippocampus": (("MRI",), ("background", "anterior", "posterior")),
    "Task05_Prostate": (("T2", "ADC"), ("background", "peripheral_zone", "transition_zone")),
    "Task06_Lung": (("CT",), ("background", "cancer")),
    "Task07_Pancreas": (("CT",), ("background", "pancreas", "cancer")),
    "Task08_HepaticVessel": (("CT",), ("background", "vessel", "tumour")),
    "Task09_Spleen": (("CT",), ("background", "spleen")),
    "Task10_Colon": (("CT",), ("background", "colon_cancer")),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, task="Task04_Hippocampus", data_dir="data/msd", plan="", fold=0, num_folds=5,
                             patch=64, steps=25_000, batch=2, validation="whole_case", quick=False)
  if arg.task not in TASKS:
    raise config_lib.ConfigError(f"msd_unet: unknown task {arg.task!r}; known: {', '.join(TASKS)}.")
  modalities, class_names = TASKS[arg.task]
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 50, 250, 250

  c.data = dict(name="msd", data_dir=arg.data_dir, task=arg.task, fold=arg.fold, num_folds=arg.num_folds,
                patch_size=(arg.patch,) * 3, crop_nonzero=True)
  c.input = dict(batch_size=arg.batch, eval_batch_size=arg.batch, patch_size=(arg.patch,) * 3,
                 foreground_fraction=0.33)

  c.model_name = "unet"
  c.model = dict(spatial_dims=3, num_classes=len(class_names), features=(32, 64, 128, 256, 320),
                 blocks_per_stage=2, norm="instance", deep_supervision=2)
  if arg.plan:
    plan = config_lib.read_plan(arg.plan)
    config_lib.apply_plan(c, plan)
    c.data.plan_path = arg.plan
    c.data.patch_size = tuple(plan["patch_size"])
    c.model.deep_supervision = max(0, min(2, len(c.model.features) - 2))
  c.compute_dtype = "bfloat16"
  c.loss = dict(name="dice_xent", batch_dice=True)

  c.optim = dict(name="sgd", momentum=0.99, nesterov=True, wd=3e-5)  # nnU-Net's optimiser
  c.lr = 1e-2
  c.schedule = dict(decay="polynomial", power=0.9)
  c.grad_clip_norm = 12.0
  c.augment = dict(flip=dict(p=0.5), affine=dict(p=0.2, rotate_deg=30.0, scale=(0.7, 1.4)),
                   gamma=dict(p=0.3, range=(0.7, 1.5)), noise=dict(p=0.1, std=(0.0, 0.1)),
                   blur=dict(p=0.2), brightness=dict(p=0.15), contrast=dict(p=0.15), low_res=dict(p=0.25))

  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="segmentation")
  # Whole validation cases through a sliding window (the score `evaluate` gives); validation=patches scores one
  # foreground patch per case instead: cheaper, optimistic, logged as val/pseudo_dice_mean (nnU-Net's name).
  c.validation = arg.validation
  c.inference = dict(overlap=0.5)
  c.best_metric = "val/pseudo_dice_mean" if arg.validation == "patches" else "val/dice_mean"
  c.best_mode = "max"
  c.checkpoint = dict(max_to_keep=2, keep_best=1, async_save=True)

  if arg.quick:
    c.total_steps = 4
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 4, 2
    c.input.patch_size = c.data.patch_size = (16, 16, 16)
    c.input.batch_size = c.input.eval_batch_size = 2
    c.model.features, c.model.deep_supervision = (4, 8, 16), 1
    c.model.kernel_size, c.model.strides = 3, 2  # a plan's per-level lists would not fit the 3 levels
    c.compute_dtype = "float32"
  return c


def get_sweep(arg=None):
  """The cross-validation folds of this configuration."""
  arg = config_lib.parse_arg(arg, task="Task04_Hippocampus", data_dir="data/msd", plan="", fold=0, num_folds=5,
                             patch=64, steps=25_000, batch=2, validation="whole_case", quick=False)
  return [{"data.fold": f} for f in range(arg.num_folds)]
