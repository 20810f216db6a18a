"""ResNet-18 classifying synthetic phantoms by lesion (absent / bright / dark), 2D or 3D.

Run:
  python -m medjax.main --config experiments/synthetic_resnet.py:dims=2 --workdir runs/lesions2d
  python -m medjax.main --config experiments/synthetic_resnet.py:quick=true --workdir /tmp/quick_cls
  python -m medjax.tools.sweep --config experiments/synthetic_resnet.py --workdir runs/tpe --backend optuna --num_trials 20
  python -m medjax.tools.sweep --config experiments/synthetic_resnet.py:cv=5 --workdir runs/cv --parallel 2
      # 5-fold cross-validation (over train + val, patient-level, stratified) of two learning rates
"""

import ml_collections as mlc

from medjax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dims=2, size=32, steps=300, cv=0, quick=False)
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 25, 100, 100

  c.data = dict(name="synthetic_lesions", spatial_dims=arg.dims, image_size=arg.size, num_classes=3,
                num_train=1024, num_val=128, num_test=128)
  if arg.cv:  # cross-validation folds over train + val; `get_sweep` sets data.fold per trial
    c.data.fold, c.data.num_folds = 0, arg.cv
  c.input = dict(batch_size=32, eval_batch_size=64)

  c.model_name = "resnet18"
  c.model = dict(spatial_dims=arg.dims, num_classes=3, small_input=True, width=16)
  c.compute_dtype = "float32"
  c.loss = dict(name="xent", label_smoothing=0.0)

  c.optim = dict(name="adamw", wd=1e-4)
  c.lr = 1e-3
  c.schedule = dict(decay="cosine", warmup_steps=20)
  c.grad_clip_norm = None
  c.grad_accum_steps = 1
  c.ema_decay = 0.0

  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.checkpoint = dict(max_to_keep=2, keep_best=1, async_save=True)

  if arg.quick:
    c.total_steps = 4
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 4, 2
    c.data.image_size, c.data.num_train, c.data.num_val = 16, 16, 8
    c.input.batch_size, c.input.eval_batch_size = 8, 8
    c.model.width = 4
    c.schedule.warmup_steps = 1
  return c


def get_sweep(arg=None):
  """With `cv=k`: k-fold cross-validation of two learning rates. Otherwise a search space for optuna (or
  `--num_trials` random draws): learning rate, weight decay, width."""
  from medjax import sweep  # only sweeps need it
  c = get_config(arg)
  folds = config_lib.parse_arg(arg, dims=2, size=32, steps=300, cv=0, quick=False).cv
  if folds:
    return sweep.product(sweep.kfold(folds), lr=[c.lr, c.lr / 3])
  return {"lr": sweep.loguniform(c.lr / 10, c.lr * 10), "optim.wd": sweep.choice([0.0, 1e-4, 1e-3]),
          "model.width": sweep.choice([c.model.width, 2 * c.model.width])}
