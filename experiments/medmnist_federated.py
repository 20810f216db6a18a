"""PneumoniaMNIST split over simulated hospitals with label skew: federated training against centralised and
local-only training, with the same model, data and number of examples seen per site.

Arguments (`--config experiments/medmnist_federated.py:k=v,...`):
  mode      "fedavg" (default) | "fedprox" | "fedadam" | "fedyogi" | "scaffold": a federated simulation
            (medjax.federated); "central": one model on the pooled sites; "local": site `site` alone
  site      the site of mode=local (0..sites-1)
  subset    "pneumoniamnist" (default) or another 2D MedMNIST classification subset
  sites     4; alpha  0.5: Dirichlet(alpha) label skew over sites (Hsu et al. 2019); each official split
            (train/val/test) is split the same way, so every site has its own test set
  rounds    30; local_steps  10; batch  32 (local batch); lr  0.05 (client SGD, momentum 0.9)
  client_dp 0 (off) | epsilon: client-level DP (clip 1.0; with 4 sites this only demonstrates the mechanism)
  secure    false | true: aggregation through simulated secure aggregation (the sums are equal up to 2^-16)
  sim       "sequential" (default: clients one after another) | "vmap" (clients in one vmapped program: on a
            GPU; on XLA:CPU a convolution vmapped over per-client weights becomes a grouped convolution, several
            times slower than the clients one by one)
  seed      0; data_dir  ../shared/data/medmnist
  quick     true: synthetic lesions instead of MedMNIST (no data needed), 2 rounds, a narrow model

Budgets: a federated run trains rounds x local_steps steps of batch `batch` on every site; "central" trains
rounds x local_steps x sites steps of the same batch on the pooled data (the same examples seen in all);
"local" trains rounds x local_steps steps on its site. Test AUC/ACC is reported pooled ("test/...") and per
site ("test_site{j}/..." in a federated run, "site{j}_test/..." for central/local).

  python -m medjax.main --config experiments/medmnist_federated.py:mode=fedavg --workdir runs/fl/fedavg
  python -m medjax.main --config experiments/medmnist_federated.py:mode=fedprox --workdir runs/fl/fedprox
  python -m medjax.main --config experiments/medmnist_federated.py:mode=central --workdir runs/fl/central
  python -m medjax.main --config experiments/medmnist_federated.py:mode=local,site=0 --workdir runs/fl/local0
  python -m medjax.main --config experiments/medmnist_federated.py:quick=true --workdir /tmp/fl_quick
"""

import os

import ml_collections as mlc

from medjax import config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDERATED = ("fedavg", "fedprox", "fedadam", "fedyogi", "scaffold")
MODES = FEDERATED + ("central", "local")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mode="fedavg", site=0, subset="pneumoniamnist", sites=4, alpha=0.5, rounds=30,
                             local_steps=10, batch=32, lr=0.05, client_dp=0.0, secure=False, sim="sequential", seed=0,
                             data_dir=os.path.join("..", "shared", "data", "medmnist"), quick=False)
  if arg.mode not in MODES:
    raise config_lib.ConfigError(f"experiments/medmnist_federated.py: unknown mode {arg.mode!r}; choose from "
                                 f"{', '.join(MODES)}.")
  if not 0 <= arg.site < arg.sites:
    raise config_lib.ConfigError(f"experiments/medmnist_federated.py: site={arg.site} is not one of the "
                                 f"{arg.sites} sites.")
  c = mlc.ConfigDict()
  c.seed = arg.seed
  c.tags = dict(experiment="medmnist_federated", mode=arg.mode, site=arg.site, subset=arg.subset, sites=arg.sites,
                alpha=arg.alpha, quick=arg.quick)
  if arg.quick:
    base = dict(name="synthetic_lesions", spatial_dims=2, image_size=16, num_classes=3, num_train=96, num_val=32,
                num_test=32)
    arg.rounds, arg.local_steps, arg.batch = 2, 2, 8
  else:
    base = dict(name="medmnist", subset=arg.subset, size=28, channels=1,
                data_dir=os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(arg.data_dir))))
  c.data = dict(name="sites", base=base, num_sites=arg.sites, split="dirichlet", alpha=arg.alpha, seed=arg.seed)
  c.input = dict(batch_size=arg.batch, eval_batch_size=128 if not arg.quick else 16)

  c.model_name = "resnet18"
  num_classes = 3 if arg.quick else 2
  # GroupNorm: batch statistics are a poor fit for non-IID clients (Hsieh et al. 2020) and for client-level DP.
  c.model = dict(num_classes=num_classes, small_input=True, norm="group", width=8 if arg.quick else 32)
  if arg.quick:
    c.model.stage_sizes = (1, 1, 1, 1)  # one block a stage: less to compile in smoke runs and tests
  c.compute_dtype = "float32"
  c.loss = "xent"
  c.optim = dict(name="sgd", momentum=0.9)
  c.lr = arg.lr
  c.grad_clip_norm = None
  c.mesh = (("data", 1),)
  c.sharding = "data_parallel"
  c.evaluator = dict(name="classification")
  c.best_metric, c.best_mode = "val/auc", "max"
  c.test_split = "test"
  c.checkpoint = dict(max_to_keep=1, keep_best=0, async_save=False)

  rounds_every = max(1, arg.rounds // 5)
  if arg.mode in FEDERATED:
    c.total_steps = arg.rounds  # a federated run's steps are rounds
    c.federated = dict(algorithm=arg.mode, local_steps=arg.local_steps, simulation=arg.sim)
    if arg.mode == "fedprox":
      c.federated.proximal_mu = 0.01
    if arg.mode in ("fedadam", "fedyogi"):
      c.federated.server_lr = 0.01
    if arg.client_dp:
      c.federated.client_dp = dict(clip_norm=1.0, target_epsilon=arg.client_dp, delta=1e-3)
    if arg.secure:
      c.federated.secure_aggregation = dict(dropout_rate=0.0)
    c.log_every_steps = 1
    c.eval_every_steps = c.checkpoint_every_steps = rounds_every
  else:
    steps = arg.rounds * arg.local_steps * (arg.sites if arg.mode == "central" else 1)
    c.total_steps = steps
    c.log_every_steps = max(1, steps // 20)
    c.eval_every_steps = c.checkpoint_every_steps = max(1, steps // 5)
    c.extra_test_splits = tuple(f"site{j}_test" for j in range(arg.sites))
    if arg.mode == "local":
      c.train_split, c.eval_split = f"site{arg.site}_train", f"site{arg.site}_val"
  return c
