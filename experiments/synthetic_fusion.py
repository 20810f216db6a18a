"""Multimodal fusion on the synthetic multimodal set (two co-registered image modalities "t1" and "t2" and a
clinical record: age, lab value, sex): the label needs the images' grade AND the record's lab value and sex, so
no single source is enough (medjax.data.datasets.multimodal). One fusion model (medjax.models.fusion) per run.

  python -m medjax.main --config experiments/synthetic_fusion.py:fusion=concat --workdir runs/fusion/concat_s0
  python -m medjax.main --config experiments/synthetic_fusion.py:fusion=concat,sources=t1 --workdir runs/fusion/t1_s0
  python -m medjax.main --config experiments/synthetic_fusion.py:fusion=concat,dropout=0.5 --workdir runs/fusion/concat_md_s0
  python -m medjax.tools.evaluate --workdir runs/fusion/concat_md_s0 --absent t2   # t2 missing at inference
  python -m medjax.main --config experiments/synthetic_fusion.py:quick=true --workdir /tmp/fusion_quick

Arguments (`--config experiments/synthetic_fusion.py:k=v,...`):
  fusion    "concat" (default; intermediate: per-modality features, learned vectors for absent ones) | "early"
            (channels) | "attention" | "film" | "cross_attention" | "late_mean" | "late_learned"
  sources   "t1,t2,tabular" (default) or a subset, e.g. "t1" or "tabular" for the single-source baselines
  dropout   0 (default) | p in (0, 1): modality dropout of each source with probability p (never a case's last
            source; `augment.modality_dropout`)
  missing   0 (default) | p in (0, 1): t2 absent from that share of the cases of every split (the data's own
            missingness, not an augmentation)
  rule      "sum" (default: the label is 1 when grade + record score > 0; each source alone is informative but
            not enough) | "interaction" (sign(grade) == sign(record score): each source alone is at chance, and
            late fusion, a sum of per-source logits, cannot represent the label)
  dims      2 (default; 24^2 images) | 3 (16^3)
  steps     600 (default) optimizer steps of batch 64 (19 epochs of the 2048 training cases)
  seed      0
  quick     true: 6 steps, 64 training cases, for smoke tests
"""

import ml_collections as mlc

from medjax import config_lib

FUSIONS = ("early", "concat", "attention", "film", "cross_attention", "late_mean", "late_learned")
ALL_SOURCES = ("t1", "t2", "tabular")
NUMERIC, CATEGORICAL_SIZES = 2, (3,)  # the set's record: age, lab; sex ("F", "M") + the unknown index 0


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, fusion="concat", sources="t1,t2,tabular", dropout=0.0, missing=0.0, rule="sum", dims=2,
                             steps=600, seed=0, quick=False)
  where = "experiments/synthetic_fusion.py"
  if arg.fusion not in FUSIONS:
    raise config_lib.ConfigError(f"{where}: fusion must be one of {FUSIONS}{config_lib.suggest(arg.fusion, FUSIONS)}"
                                 f", got {arg.fusion!r}.")
  sources = tuple(s.strip() for s in str(arg.sources).replace("+", ",").split(",") if s.strip())
  unknown = [s for s in sources if s not in ALL_SOURCES]
  if unknown or not sources:
    raise config_lib.ConfigError(f"{where}: sources must be a non-empty subset of {ALL_SOURCES} (comma-separated), "
                                 f"got {arg.sources!r}.")
  for key in ("dropout", "missing"):
    if not 0 <= getattr(arg, key) < 1:
      raise config_lib.ConfigError(f"{where}: {key} must be in [0, 1), got {getattr(arg, key)}.")
  if arg.dims not in (2, 3):
    raise config_lib.ConfigError(f"{where}: dims must be 2 or 3, got {arg.dims}.")
  modalities = tuple(s for s in sources if s != "tabular")
  tabular = "tabular" in sources

  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 100, 200, 200
  c.tags = dict(experiment="synthetic_fusion", fusion=arg.fusion, sources=",".join(sources), dropout=arg.dropout,
                missing=arg.missing, rule=arg.rule, dims=arg.dims, quick=arg.quick)
  c.data = dict(name="synthetic_multimodal", spatial_dims=arg.dims, image_size=24 if arg.dims == 2 else 16,
                num_train=2048, num_val=256, num_test=1024, seed=1000 + arg.seed,
                missing=dict(t2=float(arg.missing)) if arg.missing else {}, rule=arg.rule)
  c.input = dict(batch_size=64, eval_batch_size=128)
  c.model_name = "fusion"
  c.model = dict(num_classes=2, spatial_dims=arg.dims, modalities=modalities, fusion=arg.fusion,
                 encoder="resnet18",
                 encoder_kwargs=dict(width=8, stage_sizes=(1, 1, 1, 1), small_input=True, norm="group"),
                 num_numeric=NUMERIC if tabular else 0, categorical_sizes=CATEGORICAL_SIZES if tabular else ())
  c.compute_dtype = "float32"
  c.loss = dict(name="xent")
  c.optim = dict(name="adamw", wd=1e-4)
  c.lr = 2e-3
  c.schedule = dict(decay="cosine", warmup_steps=50)
  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.test_split = "test"
  c.checkpoint = dict(max_to_keep=1, keep_best=1)
  # Flips keep the lesion's size and contrast (the grade), so they are label-preserving.
  c.augment = dict(flip=dict(p=0.5))
  if arg.dropout:
    c.augment.modality_dropout = dict(p=float(arg.dropout), sources=sources)
  if arg.quick:
    c.total_steps = 6
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
    c.data.update(num_train=64, num_val=32, num_test=32)
    c.input.update(batch_size=16, eval_batch_size=16)
    c.schedule.warmup_steps = 2
  return c


def get_sweep(arg=None):
  """Three seeds of the configuration `arg` selects."""
  del arg
  return [{"seed": 0}, {"seed": 1}, {"seed": 2}]
