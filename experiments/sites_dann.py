"""Scanner shift: PneumoniaMNIST split IID over 4 simulated sites, each with its own contrast, gamma, noise and
blur (`config.data.feature_skew`, medjax.data.sites.feature_skews); train on sites 0-2, test on the unseen
site 3 ("external_test/...") as well as on the training sites' test images ("test/...").

Arguments (`--config experiments/sites_dann.py:k=v,...`):
  method    "plain" (default) | "dann": domain-adversarial training (Ganin et al. 2016) with the site as the
            domain: a domain classifier on the pooled features behind gradient reversal, loss weight `weight`
  harmonise ""  (default) | "zscore" | "histogram": per-site intensity normalisation, or histogram matching to
            site 0 (fit on each site's training images; the held-out site's from its own unlabelled images)
  skew      1.0: feature-skew strength; holdout  3; weight  0.3
  steps     600; batch  64; lr  1e-3 (Adam); seed  0; data_dir  ../shared/data/medmnist
  quick     true: synthetic lesions (no data needed), 4 steps

  python -m medjax.main --config experiments/sites_dann.py:method=plain --workdir runs/shift/plain_s0
  python -m medjax.main --config experiments/sites_dann.py:method=dann --workdir runs/shift/dann_s0
  python -m medjax.main --config experiments/sites_dann.py:harmonise=histogram --workdir runs/shift/hist_s0
  python -m medjax.main --config experiments/sites_dann.py:quick=true --workdir /tmp/dann_quick
Three seeds: `get_sweep` returns [{"seed": 0}, {"seed": 1}, {"seed": 2}].
"""

import os

import ml_collections as mlc

from medjax import config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = 4


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="plain", harmonise="", skew=1.0, holdout=3, weight=0.3, steps=600, batch=64,
                             lr=1e-3, seed=0, data_dir=os.path.join("..", "shared", "data", "medmnist"), quick=False)
  if arg.method not in ("plain", "dann"):
    raise config_lib.ConfigError(f"experiments/sites_dann.py: method must be 'plain' or 'dann', got {arg.method!r}.")
  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 50, 100, 100
  c.tags = dict(experiment="sites_dann", method=arg.method, harmonise=arg.harmonise, skew=arg.skew,
                holdout=arg.holdout, quick=arg.quick)
  base = dict(name="medmnist", subset="pneumoniamnist", size=28, channels=1,
              data_dir=os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(arg.data_dir))))
  num_classes = 2
  if arg.quick:
    base = dict(name="synthetic_lesions", spatial_dims=2, image_size=16, num_classes=3, num_train=96, num_val=32,
                num_test=32)
    num_classes = 3
  c.data = dict(name="sites", base=base, num_sites=SITES, split="iid", feature_skew=arg.skew,
                holdout_site=arg.holdout, harmonise=arg.harmonise or None, seed=0)
  c.input = dict(batch_size=arg.batch, eval_batch_size=256)
  c.model_name = "resnet18"
  c.model = dict(num_classes=num_classes, small_input=True, norm="group", width=32)
  c.compute_dtype = "float32"
  c.loss = "xent"
  c.optim = dict(name="adam")
  c.lr = arg.lr
  c.grad_clip_norm = None
  if arg.method == "dann":
    c.domain_adversarial = dict(num_domains=SITES, weight=arg.weight, domain_key="site", hidden_features=128)
  c.mesh = (("data", -1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.test_split = "test"
  c.extra_test_splits = ("external_test",)
  c.checkpoint = dict(max_to_keep=1, keep_best=1, async_save=True)
  if arg.quick:
    c.total_steps = 4
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 4, 2
    c.input = dict(batch_size=8, eval_batch_size=16)
    c.model.width = 8
  return c


def get_sweep(arg=None):
  return [{"seed": s} for s in (0, 1, 2)]
