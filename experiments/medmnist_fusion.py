"""Multimodal fusion on real data: one MedMNIST case at two resolutions (MedMNIST+ files `{subset}.npz` at 28 px
and `{subset}_64.npz` at 64 px) as two image modalities "px28" and "px64" of different shapes (issue 24's "two
image modalities made from the same case"; the files carry no clinical record, so there is no tabular source).
The data: `medmnist(sizes=...)` (medjax.data.datasets.medmnist), which checks that the files hold the same
cases in the same order; the model: "fusion" (medjax.models.fusion) with one small ResNet-18 encoder per size.

Runs (from the repository root; each writes results.json with val/ and test_best/ AUC and accuracy):
  python -m medjax.main --config experiments/medmnist_fusion.py:stem=large --workdir runs/mmf/concat_s0
  python -m medjax.main --config experiments/medmnist_fusion.py:stem=large,sources=px28 --workdir runs/mmf/px28_s0
  python -m medjax.main --config experiments/medmnist_fusion.py:stem=large,sources=px64 --workdir runs/mmf/px64_s0
  python -m medjax.main --config experiments/medmnist_fusion.py:stem=large,dropout=0.5 --workdir runs/mmf/concat_md_s0
  python -m medjax.tools.evaluate --workdir runs/mmf/concat_s0 --absent px64      # px64 missing at inference
  python -m medjax.tools.evaluate --workdir runs/mmf/concat_md_s0 --absent px64   # the same after ModDrop
  python -m medjax.main --config experiments/medmnist_fusion.py:stem=large,fusion=late_mean --workdir runs/mmf/late_s0
  python -m medjax.main --config experiments/medmnist_fusion.py:quick=true --workdir /tmp/mmf_quick
  python -m medjax.tools.sweep --config experiments/medmnist_fusion.py:stem=large --workdir runs/mmf/concat  # 3 seeds

Arguments (`--config experiments/medmnist_fusion.py:k=v,...`):
  fusion    "concat" (default) | "attention" | "cross_attention" | "late_mean" | "late_learned": the fusion
            types that need no record. "early" (channels) needs equal shapes and "film" a record: refused.
  sources   "px28+px64" (default) or one size alone, e.g. "px28" (the single-resolution baselines: only that
            file is read); any "px{size}" of the subset's MedMNIST sizes (2D subsets also px128, px224), joined
            by "+", in the order the model sees them
  subset    "adrenalmnist3d" (default) or another MedMNIST subset except ChestMNIST (multi-label); 2D subsets
            work the same way at (28, 64)
  stem      "small" (default: 3x3 stride-1 stem, no max-pool: the MedMNIST 28 px ResNet, `small_input`) |
            "large" (7x7 stride-2 stem + max-pool: a quarter of the resolution per axis after the stem)
  epochs    10 (default); one epoch is ceil(N_train / batch) steps, evaluated and checkpointed after each
  dropout   0 (default) | p in (0, 1): modality dropout (`augment.modality_dropout`) of each size with
            probability p, never a case's last one; needs two sources
  seed      0
  data_dir  folder of the official .npz files; default ../shared/data/medmnist, relative to the repository root
  quick     true: 4 steps of batch 8, width-4 encoders (still reads data_dir), for smoke tests

Recipe: the official MedMNIST protocol's optimizer (Yang et al., Scientific Data 10, 41 (2023)): Adam at 1e-3
without weight decay, x0.1 at 50% and 75% of the run, cross-entropy, no augmentation (modality dropout only when
asked), batch 32 (3D) / 128 (2D), images in [-1, 1] with their stored channels; the best-validation-AUC checkpoint
is evaluated on test. Encoder per size: "resnet18" at width 8 cut to one block per stage (a ResNet-10), group
norm (fusion refuses batch norm: absent modalities' zeros would enter the batch statistics).

What to expect: px64 holds everything px28 does (the same scans at two resolutions: on adrenalmnist3d's val
split, each 64 px volume resized to 28 px correlates at least 0.95 (mean 0.97) with its own 28 px volume and at
most 0.65 with its neighbour's), so fusion can only gain from the two encoders' different receptive fields; the
sharper test on real data is a modality missing at inference (`evaluate --absent px64`), with and without
modality dropout in training.

Cost (adrenalmnist3d, 1188 training cases: 38 steps an epoch; 2-core CPU shared with other jobs, load ~7): one
training step of batch 32 takes, in seconds, with stem=small: px28 7.8, px64 ~111, both 119; with stem=large:
px28 0.9, px64 11.1, both 13.4. So on such a CPU the 10-epoch runs above take about 100 min (both), 10 min
(px28), 80 min (px64), evaluations included; with stem=small, a run with px64 needs an accelerator (~13 h here).
quick=true (default stem) took 10 min there, most of it evaluating all 98 val and 298 test cases at 64^3.
"""

import math
import os

import ml_collections as mlc

from medjax import config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data", "medmnist")
WHERE = "experiments/medmnist_fusion.py"

# subset -> (spatial_dims, num_classes, official train split size); MedMNIST v2 (Yang et al. 2023), Table 1.
# Kept here because experiment files import no medjax code but config helpers; tests check it against medjax's
# SubsetInfo table. ChestMNIST is left out: multi-label needs another loss and metric.
SUBSETS = {
    "pathmnist": (2, 9, 89996), "dermamnist": (2, 7, 7007), "octmnist": (2, 4, 97477),
    "pneumoniamnist": (2, 2, 4708), "retinamnist": (2, 5, 1080), "breastmnist": (2, 2, 546),
    "bloodmnist": (2, 8, 11959), "tissuemnist": (2, 8, 165466), "organamnist": (2, 11, 34581),
    "organcmnist": (2, 11, 13000), "organsmnist": (2, 11, 13940),
    "organmnist3d": (3, 11, 971), "nodulemnist3d": (3, 2, 1158), "adrenalmnist3d": (3, 2, 1188),
    "fracturemnist3d": (3, 3, 1027), "vesselmnist3d": (3, 2, 1335), "synapsemnist3d": (3, 2, 1230),
}
SIZES = {2: (28, 64, 128, 224), 3: (28, 64)}
FUSIONS = ("concat", "attention", "cross_attention", "late_mean", "late_learned")
REFUSED = {"early": "concatenates the modalities as channels, so it needs equal shapes (px28 and px64 differ)",
           "film": "computes its modulation from a clinical record, which MedMNIST files do not hold"}
STEMS = ("small", "large")
BATCH = {2: 128, 3: 32}


def _fail(message):
  raise config_lib.ConfigError(f"{WHERE}: {message}")


def parse_sources(text, dims):
  """"px28+px64" (or "px28,px64") -> (28, 64): distinct MedMNIST sizes of a `dims`-D subset, in the given order."""
  names = [s.strip() for s in str(text).replace("+", ",").split(",") if s.strip()]
  sizes = []
  for name in names:
    size = name[2:] if name.startswith("px") else ""
    if not size.isdigit() or int(size) not in SIZES[dims]:
      _fail(f"sources: {name!r} is not 'px<size>' with a size of a {dims}D subset "
            f"({', '.join(f'px{s}' for s in SIZES[dims])}).")
    sizes.append(int(size))
  if not sizes or len(set(sizes)) != len(sizes):
    _fail(f"sources must be one or more distinct sizes, e.g. 'px28+px64' or 'px28'; got {text!r}.")
  return tuple(sizes)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, fusion="concat", sources="px28+px64", subset="adrenalmnist3d", stem="small",
                             epochs=10, dropout=0.0, seed=0, data_dir=DEFAULT_DATA_DIR, quick=False)
  if arg.fusion in REFUSED:
    _fail(f"fusion={arg.fusion!r} {REFUSED[arg.fusion]}; choose from {', '.join(FUSIONS)}.")
  if arg.fusion not in FUSIONS:
    _fail(f"fusion must be one of {FUSIONS}{config_lib.suggest(arg.fusion, FUSIONS)}, got {arg.fusion!r}.")
  if arg.subset not in SUBSETS:
    hint = " (multi-label: not supported here)" if arg.subset == "chestmnist" else ""
    _fail(f"unknown subset {arg.subset!r}{hint}; choose from {', '.join(SUBSETS)}.")
  if arg.stem not in STEMS:
    _fail(f"stem must be one of {STEMS}, got {arg.stem!r}.")
  if arg.epochs < 1:
    _fail(f"epochs must be >= 1, got {arg.epochs}.")
  if not 0 <= arg.dropout < 1:
    _fail(f"dropout must be in [0, 1), got {arg.dropout}.")
  dims, num_classes, num_train = SUBSETS[arg.subset]
  sizes = parse_sources(arg.sources, dims)
  modalities = tuple(f"px{s}" for s in sizes)  # the dataset's names (medmnist.modality_name)
  if arg.dropout and len(modalities) < 2:
    _fail(f"dropout={arg.dropout} needs two sources: modality dropout never removes a case's last one.")
  batch = BATCH[dims]
  steps_per_epoch = math.ceil(num_train / batch)

  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.epochs * steps_per_epoch
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps_per_epoch
  c.tags = dict(experiment="medmnist_fusion", subset=arg.subset, fusion=arg.fusion, sources=",".join(modalities),
                stem=arg.stem, dropout=arg.dropout, epochs=arg.epochs, steps_per_epoch=steps_per_epoch,
                quick=arg.quick)
  data_dir = os.path.expanduser(arg.data_dir)
  # Stored channels (no RGB repeat for grayscale): the encoders are trained from scratch.
  c.data = dict(name="medmnist", subset=arg.subset, sizes=sizes,
                data_dir=os.path.normpath(os.path.join(REPO_ROOT, data_dir)),  # absolute stays absolute
                verify_md5=True)
  c.input = dict(batch_size=batch, eval_batch_size=2 * batch)
  c.model_name = "fusion"
  c.model = dict(num_classes=num_classes, spatial_dims=dims, modalities=modalities, fusion=arg.fusion,
                 encoder="resnet18",
                 encoder_kwargs=dict(width=8, stage_sizes=(1, 1, 1, 1), small_input=arg.stem == "small",
                                     norm="group"))
  c.compute_dtype = "float32"
  c.loss = dict(name="xent")
  c.optim = dict(name="adam", wd=0.0)
  c.lr = 1e-3
  c.schedule = dict(decay="step", boundaries=(0.5, 0.75), factor=0.1)
  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.test_split = "test"
  c.checkpoint = dict(max_to_keep=1, keep_best=1)
  if arg.dropout:
    c.augment = dict(modality_dropout=dict(p=float(arg.dropout), sources=modalities))
  if arg.quick:
    c.total_steps = 4
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.input.update(batch_size=8, eval_batch_size=8)
    c.model.encoder_kwargs.width = 4
  return c


def get_sweep(arg=None):
  """Three seeds of the configuration `arg` selects."""
  del arg
  return [{"seed": 0}, {"seed": 1}, {"seed": 2}]
