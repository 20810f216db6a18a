"""U-Net on the synthetic phantom segmentation set (organs + small lesions), 2D or 3D. The README's demo.

Run:
  python -m medjax.main --config experiments/synthetic_unet.py --workdir runs/demo              # 3D demo
  python -m medjax.main --config experiments/synthetic_unet.py:dims=2 --workdir runs/demo2d
  python -m medjax.main --config experiments/synthetic_unet.py:model=unetr,size=28 --workdir runs/unetr
      # a small UNETR (4^3 patches) instead of the U-Net; num_train=N keeps N labelled training cases;
      # test=true also scores the test phantoms (last step and best-validation checkpoint)
  python -m medjax.main --config experiments/synthetic_unet.py:quick=true --workdir /tmp/quick  # smoke test
  python -m medjax.main --config experiments/synthetic_unet.py:aug=true --workdir runs/demo_aug  # + on-device augmentation
  python -m medjax.tools.sweep --config experiments/synthetic_unet.py:dims=2 --workdir runs/sweep2d --parallel 2  # get_sweep
  python -m medjax.main --config experiments/synthetic_unet.py:size=48,patch=32 --workdir runs/patches
      # 32^3 training patches cut from 48^3 cases, 1/3 centred on foreground (add device_crop=true to cut
      # them on the accelerator from cached cases); validation predicts each whole case with a sliding window
      # (config.inference; roi = the patch), or with validation=patches scores one foreground patch per case
      # (val/pseudo_dice_mean, as nnU-Net names it)
  python -m medjax.tools.plan --dataset synthetic_phantoms --kwargs "spatial_dims=3,image_size=48" --out runs/plan
  python -m medjax.main --config experiments/synthetic_unet.py:size=48,plan=runs/plan/plan.json --workdir runs/planned
      # patch size, batch size and U-Net kernels / strides / widths from the plan

The default 3D run is sized for a 2-core CPU (32^3 patches, a 3-level U-Net): a few minutes, reaching a
validation mean foreground Dice above 0.85. On a GPU, raise `size`, `features` and `steps`.
"""

import ml_collections as mlc

from medjax import config_lib

MODELS = ("unet", "unetr")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dims=3, size=32, steps=400, model="unet", num_train=480, test=False, aug=False,
                             patch=0, device_crop=False, plan="", validation="whole_case", quick=False)
  if arg.model not in MODELS:
    raise config_lib.ConfigError(f"experiments/synthetic_unet.py: model must be one of {MODELS}, got {arg.model!r}.")
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100

  c.data = dict(name="synthetic_phantoms", spatial_dims=arg.dims, image_size=arg.size, num_classes=3,
                num_train=arg.num_train, num_val=24, num_test=24,
                dark_lesion_prob=0.0)  # bright lesions only: learnable within the CPU demo's few minutes
  c.input = dict(batch_size=2 if arg.dims == 3 else 16, eval_batch_size=8 if arg.dims == 3 else 24)

  c.model_name = arg.model
  if arg.model == "unet":
    c.model = dict(spatial_dims=arg.dims, num_classes=3, features=(8, 16, 32, 64), blocks_per_stage=1,
                   norm="instance")
  else:  # a small UNETR: 4^d-voxel patches (2 decoder levels), 4 transformer blocks of width 96
    c.model = dict(spatial_dims=arg.dims, num_classes=3, image_size=(arg.size,) * arg.dims, patch_size=4,
                   feature_size=8, hidden_size=96, num_layers=4, num_heads=4, mlp_dim=192)
  c.compute_dtype = "float32"
  c.loss = dict(name="dice_xent", batch_dice=True)

  c.optim = dict(name="adamw", wd=1e-5)
  c.lr = 5e-3
  c.schedule = dict(decay="cosine", warmup_steps=20)
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  c.ema_decay = 0.0

  # Off in the CPU demo (it converges in fewer steps without); applied on device inside the train step.
  c.augment = dict(flip=dict(p=0.5), affine=dict(p=0.3, rotate_deg=15.0, scale=(0.85, 1.2)),
                   gamma=dict(p=0.3, range=(0.7, 1.5)), noise=dict(p=0.2, std=(0.0, 0.1))) if arg.aug else {}

  if arg.patch:
    c.input.patch_size = (arg.patch,) * arg.dims
    c.input.device_crop = arg.device_crop
    c.validation = arg.validation
  if arg.plan:
    config_lib.apply_plan(c, config_lib.read_plan(arg.plan))

  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="segmentation")
  c.best_metric, c.best_mode = "val/dice_mean", "max"
  if arg.test:  # the 24 test phantoms, scored at the last step and at the best-validation checkpoint
    c.test_split = "test"
  c.checkpoint = dict(max_to_keep=2, keep_best=1, async_save=True)

  if arg.quick:  # every experiment carries its own smoke test
    c.total_steps = 4
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 4, 2
    c.data.image_size, c.data.num_train, c.data.num_val = 16, 8, 4
    c.input.batch_size, c.input.eval_batch_size = 2, 2
    # A plan fixes the number of levels (kernel_size / strides); keep them and only narrow the widths.
    if arg.model == "unetr":
      c.model.update(hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16, feature_size=4,
                     image_size=(c.input.patch_size[0] if arg.patch else 16,) * arg.dims)
    else:
      c.model.features = tuple(max(2, f // 8) for f in c.model.features) if arg.plan else (4, 8)
    if arg.patch:
      c.input.patch_size = (8,) * arg.dims
    c.schedule.warmup_steps = 1
  return c


def get_sweep(arg=None):
  """Learning rate x network width: a 2 x 2 grid around this config's values (see medjax/sweep)."""
  from medjax import sweep  # only sweeps need it
  c = get_config(arg)
  widths = [tuple(c.model.features), tuple(2 * f for f in c.model.features)]
  return sweep.product(lr=[c.lr, c.lr / 5], **{"model.features": widths})
