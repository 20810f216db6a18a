"""U-Net on the synthetic phantom segmentation set (organs + small lesions), 2D or 3D. The README's demo.

Run:
  python -m medjax.main --config experiments/synthetic_unet.py --workdir runs/demo              # 3D demo
  python -m medjax.main --config experiments/synthetic_unet.py:dims=2 --workdir runs/demo2d
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


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dims=3, size=32, steps=400, aug=False, patch=0, device_crop=False, plan="",
                             validation="whole_case", quick=False)
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100

  c.data = dict(name="synthetic_phantoms", spatial_dims=arg.dims, image_size=arg.size, num_classes=3,
                num_train=480, num_val=24, num_test=24,
                dark_lesion_prob=0.0)  # bright lesions only: learnable within the CPU demo's few minutes
  c.input = dict(batch_size=2 if arg.dims == 3 else 16, eval_batch_size=8 if arg.dims == 3 else 24)

  c.model_name = "unet"
  c.model = dict(spatial_dims=arg.dims, num_classes=3, features=(8, 16, 32, 64), blocks_per_stage=1,
                 norm="instance")
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
  c.checkpoint = dict(max_to_keep=2, keep_best=1, async_save=True)

  if arg.quick:  # every experiment carries its own smoke test
    c.total_steps = 4
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 4, 2
    c.data.image_size, c.data.num_train, c.data.num_val = 16, 8, 4
    c.input.batch_size, c.input.eval_batch_size = 2, 2
    # A plan fixes the number of levels (kernel_size / strides); keep them and only narrow the widths.
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
