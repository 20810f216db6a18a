"""MedMNIST v2 classification with ResNet-18/50 (2D, 3D, ACS or 2.5D convolutions) or a CNN-ViT hybrid:
the official MedMNIST protocol, or an improved recipe with the same splits and selection rule.

Arguments (`--config experiments/medmnist_resnet.py:k=v,...`):
  subset    MedMNIST subset, "breastmnist" (default), "pneumoniamnist", "adrenalmnist3d", ... (not ChestMNIST:
            multi-label needs another loss and metric)
  model     "resnet18" (default) | "resnet50" | "vit_hybrid" (the improved recipe's third model)
  conv      "auto" (default: "2d" for a 2D subset, "3d" for a 3D one) | "2d" | "3d" (full k^3 kernels) |
            "acs" | "2.5d" (2D kernels on volumes, medjax.models.acs; ResNets on 3D subsets only)
  size      28 (default) | 64 (MedMNIST+ files; 2D subsets also 128 and 224)
  seed      0
  recipe    "official" (default) | "improved" | "finetune" (a short fine-tuning recipe, below; 20 epochs)
  epochs    the recipe's (100, the official count; 20 for "finetune"); the improved recipe also converges in
            fewer (e.g. 30)
  tta       false (default) | true: evaluate (validation, so also the selection, and test) on the mean
            logits of each image and its left-right mirror (`config.eval_flips`)
  mixup     0 (default: off) | alpha > 0: improved recipe only, mixup (Zhang et al., ICLR 2018) on every batch
            with lam ~ Beta(alpha, alpha), one-hot targets mixed the same way (then label-smoothed)
  balance   0 (default: every training image once per epoch) | power in (0, 1]: improved recipe only,
            class-balanced draws with replacement, each image drawn with probability ~ count(class)^-power
            (`input.sampler="balanced"`): 1 gives equal class shares, 0.5 ("square-root" sampling) moves
            BreastMNIST's 27/73 malignant/benign training shares to 38/62
  init      "" (default: from scratch) | a pretrained run's workdir or a weight file: `config.init_from` with a
            new head (exclude "head"), the best-validation step of a workdir; 2D weights into a "3d" model are
            inflated (I3D average), into "acs" / "2.5d" models loaded as they are, RGB kernels summed for
            1-channel volumes. Relative paths are taken from the repository root.
  teacher   "" (default) | a trained run's workdir: knowledge distillation (`config.distillation`, Hinton et al.
            2015): the loss is (1 - kd_alpha) cross-entropy + kd_alpha T^2 KL to the teacher's softened outputs at
            T = kd_t (defaults 0.9 and 4, the KD baseline of Tian et al. 2020); relative paths from the
            repository root
  kd_t, kd_alpha  see `teacher`
  sparsity  0 (default: dense) | s in (0, 1): gradual global magnitude pruning to s of the conv and dense kernels
            (stem and head kept dense) during the run (`config.pruning`, Zhu & Gupta 2017: cubic schedule,
            masks updated every epoch, `s` reached after 3/4 of the run, then fine-tuned with the masks
            fixed); EMA weights are off (they would not stay sparse)
  qat       false (default) | true: quantization-aware training, every conv and dense layer fake-quantized to
            int8 weights and activations (`config.quantization`, Qwix, straight-through gradients)
  init_head false (default) | true: with `init`, also load the head (compressing a model for its own task:
            prune or quantize a trained run, then fine-tune it with recipe=finetune)
  data_dir  folder of the official .npz files; default ../shared/data/medmnist; a relative path is taken
            from the repository root, so a run works from any directory
  random_labels  false (default) | true: the training labels randomly permuted over the training images (seed
            `seed`; val/test untouched): the data randomisation test of saliency maps (Adebayo et al. 2018),
            README "Interpretability"
  quick     true: 4 steps, narrow one-block-per-stage model (with `init`: the pretrained one), for smoke tests
            (still reads data_dir)

Official protocol (MedMNIST v2, Yang et al., Scientific Data 10, 41 (2023), and its `experiments`
repository): 100 epochs, batch 128 (2D) / 32 (3D), Adam lr 1e-3 without weight decay, lr x0.1 at epochs
50 and 75, cross-entropy, inputs (x / 255 - 0.5) / 0.5, grayscale repeated to 3 channels for 2D (1 channel
for 3D, the official default), no augmentation, the 28 px ResNet with a 3x3 stride-1 stem and no max-pool
(the official script uses it at every size unless images are resized to 224), validation every epoch and
the best-validation-AUC checkpoint evaluated on test (`config.test_split`: "test/..." metrics for the last
state, "test_best/..." for the best one). 3D models: the same 2D ResNet with inflated 3D kernels ("3d"),
ACS convolutions ("acs") or 2.5D ones ("2.5d"). One epoch is ceil(N_train / batch) optimizer steps (the
PyTorch loader's partial last batch becomes a full batch drawn from the next epoch's permutation).

Improved recipe: the same batch, splits and selection rule (100 epochs unless `epochs` says otherwise),
plus on-device augmentation (horizontal flip, small affine, brightness/contrast), AdamW (weight decay 0.05)
with a 5-epoch warmup and cosine decay, label smoothing 0.1, and an EMA (decay 0.99 after the step's
warm-up) of the weights and of the batch statistics, used for evaluation.

Fine-tuning recipe ("finetune"): the improved recipe's augmentation, label smoothing and EMA, AdamW (weight
decay 0.05) at 1e-3 for the new head with layer-wise decay 0.75 down the ResNet (stage 4: 0.75, ..., stem:
0.75^5 = 0.24 of it; `config.optim.layer_decay`), a 2-epoch warmup and cosine decay over 20 epochs (the
`epochs` argument's default for this recipe).

Transfer (issue 19): ResNet-18 pretrained on PneumoniaMNIST (chest X-ray) for 10 epochs of the official
recipe, then BreastMNIST (ultrasound) from it or from scratch (README "Transfer learning"):
  python -m medjax.main --config experiments/medmnist_resnet.py:subset=pneumoniamnist,epochs=10 \
      --workdir runs/tl/pneu_r18_e10_s0
  python -m medjax.tools.sweep --config experiments/medmnist_resnet.py:recipe=finetune,init=runs/tl/pneu_r18_e10_s0 \
      --workdir runs/tl/breast_ft_pneu
  python -m medjax.tools.sweep --config experiments/medmnist_resnet.py:recipe=finetune --workdir runs/tl/breast_ft_scratch
  python -m medjax.main --config experiments/medmnist_resnet.py:subset=adrenalmnist3d,init=runs/tl/pneu_r18_e10_s0,quick=true \
      --workdir /tmp/adrenal_inflated   # 2D -> 3D inflation

Runs (from the repository root; each writes `results.json` and `config.json` in its workdir):
  python -m medjax.main --config experiments/medmnist_resnet.py:subset=breastmnist --workdir runs/mm/breast_r18_s0
  python -m medjax.main --config experiments/medmnist_resnet.py:subset=pneumoniamnist,model=resnet50,seed=1 \
      --workdir runs/mm/pneu_r50_s1
  python -m medjax.main --config experiments/medmnist_resnet.py:subset=adrenalmnist3d,conv=acs \
      --workdir runs/mm/adrenal_acs_s0
  python -m medjax.main --config experiments/medmnist_resnet.py:subset=breastmnist,recipe=improved,model=vit_hybrid \
      --workdir runs/mm/breast_vith_improved_s0
  python -m medjax.main --config experiments/medmnist_resnet.py:recipe=improved,epochs=60,mixup=0.4,tta=true \
      --workdir runs/mm/breast_r18_improved_mix_tta_s0
  python -m medjax.main --config experiments/medmnist_resnet.py:model=resnet50 --workdir runs/kd/r50_s0  # teacher
  python -m medjax.main --config experiments/medmnist_resnet.py:teacher=runs/kd/r50_s0 --workdir runs/kd/r18_kd_s0
  python -m medjax.main --config experiments/medmnist_resnet.py:model=resnet50,quick=true --workdir /tmp/t_quick
  python -m medjax.main --config experiments/medmnist_resnet.py:teacher=/tmp/t_quick,quick=true --workdir /tmp/kd_q
Compression by fine-tuning a trained run (README "Compression"; 20 epochs each):
  python -m medjax.main --config experiments/medmnist_resnet.py:recipe=finetune,init=runs/tl/breast_official_scratch_s0,init_head=true,sparsity=0.8 \
      --workdir runs/compress/breast_prune80_ft
  python -m medjax.main --config experiments/medmnist_resnet.py:recipe=finetune,init=runs/tl/breast_official_scratch_s0,init_head=true,qat=true \
      --workdir runs/compress/breast_qat_ft
  python -m medjax.main \
      --config experiments/medmnist_resnet.py:recipe=improved,epochs=60,mixup=0.4,tta=true,balance=0.5 \
      --workdir runs/mm/breast_r18_improved_mix_tta_bal05_s0   # beats the published BreastMNIST row (README)
  python -m benchmarks.paper_table --runs runs/mm --out runs/mm/table.md
Three seeds: `get_sweep` returns [{"seed": 0}, {"seed": 1}, {"seed": 2}].
"""

import math
import os

import ml_collections as mlc

from medjax import config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data", "medmnist")

# subset -> (spatial_dims, num_classes, official train split size); MedMNIST v2 (Yang et al. 2023), Table 1.
# Kept here because experiment files import no JAX code; tests check it against medjax's SubsetInfo table.
SUBSETS = {
    "pathmnist": (2, 9, 89996), "dermamnist": (2, 7, 7007), "octmnist": (2, 4, 97477),
    "pneumoniamnist": (2, 2, 4708), "retinamnist": (2, 5, 1080), "breastmnist": (2, 2, 546),
    "bloodmnist": (2, 8, 11959), "tissuemnist": (2, 8, 165466), "organamnist": (2, 11, 34581),
    "organcmnist": (2, 11, 13000), "organsmnist": (2, 11, 13940),
    "organmnist3d": (3, 11, 971), "nodulemnist3d": (3, 2, 1158), "adrenalmnist3d": (3, 2, 1188),
    "fracturemnist3d": (3, 3, 1027), "vesselmnist3d": (3, 2, 1335), "synapsemnist3d": (3, 2, 1230),
}
SIZES = {2: (28, 64, 128, 224), 3: (28, 64)}
MODELS = ("resnet18", "resnet50", "vit_hybrid")
CONVS = {2: ("2d",), 3: ("3d", "acs", "2.5d")}
RECIPES = ("official", "improved", "finetune")
FINETUNE_EPOCHS = 20
# ResNet parameter groups from input to output, for the fine-tuning recipe's layer-wise learning-rate decay.
RESNET_LAYER_GROUPS = ("stem_*", "stage1_*", "stage2_*", "stage3_*", "stage4_*", "head")
EPOCHS = 100
BATCH = {2: 128, 3: 32}


def _check(arg):
  """Resolves "auto" and raises ConfigError naming the bad argument."""
  def fail(message):
    raise config_lib.ConfigError(f"experiments/medmnist_resnet.py: {message}")

  if arg.subset not in SUBSETS:
    hint = " (multi-label: not supported here)" if arg.subset == "chestmnist" else ""
    fail(f"unknown subset {arg.subset!r}{hint}; choose from {', '.join(SUBSETS)}.")
  dims = SUBSETS[arg.subset][0]
  conv = {2: "2d", 3: "3d"}[dims] if arg.conv == "auto" else arg.conv
  if arg.model not in MODELS:
    fail(f"unknown model {arg.model!r}; choose from {', '.join(MODELS)}.")
  if conv not in CONVS[dims]:
    fail(f"conv={conv!r} does not fit the {dims}D subset {arg.subset!r}; choose from {', '.join(CONVS[dims])}.")
  if arg.model == "vit_hybrid" and conv in ("acs", "2.5d"):
    fail(f"conv={conv!r} exists for the ResNets only; vit_hybrid takes conv=auto.")
  if arg.size not in SIZES[dims]:
    fail(f"size={arg.size} is not a MedMNIST size of a {dims}D subset; choose from {SIZES[dims]}.")
  if arg.recipe not in RECIPES:
    fail(f"unknown recipe {arg.recipe!r}; choose from {', '.join(RECIPES)}.")
  return dims, conv


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, subset="breastmnist", model="resnet18", conv="auto", size=28, seed=0,
                             recipe="official", epochs=0, tta=False, mixup=0.0, balance=0.0, init="",
                             teacher="", kd_t=4.0, kd_alpha=0.9, sparsity=0.0, qat=False, init_head=False,
                             random_labels=False, data_dir=DEFAULT_DATA_DIR, quick=False)
  if not arg.epochs:  # the recipe's own length
    arg.epochs = FINETUNE_EPOCHS if arg.recipe == "finetune" else EPOCHS
  dims, conv = _check(arg)
  if arg.epochs < 1:
    raise config_lib.ConfigError(f"experiments/medmnist_resnet.py: epochs must be >= 1, got {arg.epochs}.")
  if arg.recipe == "finetune" and arg.model == "vit_hybrid":
    raise config_lib.ConfigError("experiments/medmnist_resnet.py: recipe=finetune's layer groups are the ResNet's; "
                                 "use model=resnet18 or resnet50.")
  if arg.mixup < 0 or (arg.mixup > 0 and arg.recipe != "improved"):
    raise config_lib.ConfigError(f"experiments/medmnist_resnet.py: mixup={arg.mixup} needs recipe=improved and "
                                 "alpha >= 0 (0 is off); the official protocol has no augmentation.")
  if not 0 <= arg.balance <= 1 or (arg.balance > 0 and arg.recipe != "improved"):
    raise config_lib.ConfigError(f"experiments/medmnist_resnet.py: balance={arg.balance} needs recipe=improved "
                                 "and a power in [0, 1] (0 is off); the official protocol samples every image "
                                 "once per epoch.")
  if not 0 <= arg.sparsity < 1:
    raise config_lib.ConfigError(f"experiments/medmnist_resnet.py: sparsity must be in [0, 1) (0 is dense), got "
                                 f"{arg.sparsity}.")
  if arg.init_head and not arg.init:
    raise config_lib.ConfigError("experiments/medmnist_resnet.py: init_head=true needs init (the run whose head "
                                 "to load).")
  num_classes, num_train = SUBSETS[arg.subset][1:]
  batch = BATCH[dims]
  steps_per_epoch = math.ceil(num_train / batch)

  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.epochs * steps_per_epoch
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps_per_epoch
  # Read by benchmarks/paper_table.py (with seed and data.*) to group runs.
  c.tags = dict(experiment="medmnist_resnet", subset=arg.subset, model=arg.model, conv=conv, size=arg.size,
                recipe=arg.recipe, epochs=arg.epochs, steps_per_epoch=steps_per_epoch, quick=arg.quick)
  if arg.random_labels:
    c.tags.random_labels = True
  if arg.tta:
    c.tags.tta = True
    c.eval_flips = ((), (dims - 1,))  # mirrors the last spatial axis, as the improved recipe's flips do

  data_dir = os.path.expanduser(arg.data_dir)
  c.data = dict(name="medmnist", subset=arg.subset, size=arg.size,
                data_dir=os.path.normpath(os.path.join(REPO_ROOT, data_dir)),  # absolute stays absolute
                channels=3 if dims == 2 else 1, verify_md5=True)
  if arg.random_labels:
    c.data.permute_train_labels = arg.seed
  c.input = dict(batch_size=batch, eval_batch_size=2 * batch)

  if arg.model == "vit_hybrid":
    c.model_name = "vit_hybrid"
    # Stride 4 at 28 px (7^2 / 7^3 tokens); at 64 px a 2D image keeps the small stem (16^2 tokens) and a
    # volume takes the 7x7 stride-2 stem + max-pool (4^3 tokens instead of 16^3).
    c.model = dict(num_classes=num_classes, spatial_dims=dims, image_size=arg.size,
                   small_input=arg.size == 28 or dims == 2, dropout=0.1)
  else:
    c.model_name = arg.model + ("" if conv in ("2d", "3d") else f"_{conv}")
    c.model = dict(num_classes=num_classes, spatial_dims=dims, small_input=True)
  c.compute_dtype = "float32"

  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.test_split = "test"
  c.checkpoint = dict(max_to_keep=1, keep_best=1, async_save=True)
  c.grad_clip_norm = None
  c.grad_accum_steps = 1

  if arg.recipe == "official":
    c.loss = dict(name="xent", label_smoothing=0.0)
    c.optim = dict(name="adam", wd=0.0)
    c.lr = 1e-3
    c.schedule = dict(decay="step", boundaries=(0.5, 0.75), factor=0.1)  # epochs 50 and 75 of 100
    c.ema_decay = 0.0
  else:
    c.loss = dict(name="xent", label_smoothing=0.1)
    c.optim = dict(name="adamw", wd=0.05)
    c.lr = 5e-4 if arg.model == "vit_hybrid" else 1e-3
    c.schedule = dict(decay="cosine", warmup_steps=(2 if arg.recipe == "finetune" else 5) * steps_per_epoch)
    if arg.recipe == "finetune":
      c.optim.update(layer_decay=0.75, layer_groups=RESNET_LAYER_GROUPS)
    c.ema_decay = 0.99  # with the step's (1 + t) / (10 + t) warm-up, so short runs forget the init
    # Horizontal flips only: up/down and slice order carry anatomy. Pixels outside the image copy the edge.
    c.augment = dict(flip=dict(p=0.5, axes=(-1,)),
                     affine=dict(p=0.5, rotate_deg=10.0, scale=(0.9, 1.1), translate=arg.size / 14),
                     brightness=dict(p=0.3, range=(0.9, 1.1)), contrast=dict(p=0.3, range=(0.9, 1.1)),
                     image_pad="edge")
    if arg.mixup > 0:
      c.augment.update(mixup=dict(p=1.0, alpha=float(arg.mixup)), num_classes=num_classes)
      c.tags.mixup = float(arg.mixup)
    if arg.balance > 0:
      c.input.update(sampler="balanced", balance_power=float(arg.balance))
      c.tags.balance = float(arg.balance)

  if arg.init:
    path = os.path.expanduser(arg.init)
    c.init_from = dict(path=os.path.normpath(os.path.join(REPO_ROOT, path)),
                       exclude=() if arg.init_head else ("head",))
    if conv == "3d":
      c.init_from.inflate = "average"
    c.tags.init = arg.init
  if arg.teacher:
    path = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(arg.teacher)))
    c.distillation = dict(teacher=path, temperature=float(arg.kd_t), alpha=float(arg.kd_alpha))
    c.tags.teacher = arg.teacher
  if arg.sparsity:
    # Masks recomputed once an epoch; the last quarter fine-tunes the final mask. EMA off: pruned weights' EMA
    # only decays towards zero (medjax.compress.pruning), and the run refuses the combination.
    c.pruning = dict(target=float(arg.sparsity), scope="global", exclude=("stem_conv", "head"),
                     frequency=steps_per_epoch, end_step=max(1, (3 * c.total_steps) // 4))
    c.ema_decay = 0.0
    c.tags.sparsity = float(arg.sparsity)
  if arg.qat:
    c.quantization = dict(mode="qat")
    c.tags.qat = True

  if arg.quick:
    c.total_steps = 4
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.input.batch_size, c.input.eval_batch_size = 8, 8
    if arg.sparsity:
      c.pruning.update(frequency=1, end_step=3)
    if arg.init:
      pass  # the pretrained model's architecture: only the run is short
    elif arg.model == "vit_hybrid":
      c.model.update(width=4, stage_sizes=(1, 1, 1), hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    else:
      c.model.update(width=4, stage_sizes=(1, 1, 1, 1))
    if arg.recipe != "official":
      c.schedule.warmup_steps = 1
  return c


def get_sweep(arg=None):
  """Three seeds of the configuration `arg` selects (overrides of config.seed)."""
  del arg
  return [{"seed": 0}, {"seed": 1}, {"seed": 2}]
