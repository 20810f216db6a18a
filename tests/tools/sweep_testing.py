"""Shared pieces of the sweep tests: a tiny experiment file and a fake trainer (a script, no JAX).

The fake trainer takes medjax.main's command line, logs each call to `calls.log` next to the experiment,
writes metrics.jsonl and results.json with a score that is an exact function of the overrides, and can
be slowed down per trial so a test can interrupt the launcher while one trial is still running.
"""

import json
import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPERIMENT = textwrap.dedent("""
    import ml_collections as mlc
    from medjax import sweep

    def get_config(arg=None):
      c = mlc.ConfigDict()
      c.lr, c.seed, c.total_steps = 0.1, 0, 4
      c.model = dict(depth=2)
      c.data = dict(name="fake", fold=0, num_folds=1)
      c.best_metric, c.best_mode = "val/score", "max"
      return c

    def get_sweep(arg=None):
      if arg == "kfold":
        return sweep.product(sweep.kfold(5), lr=[0.1, 0.01])
      if arg == "space":
        return {"lr": sweep.loguniform(1e-3, 1.0), "model.depth": sweep.choice([1, 2, 3])}
      if arg == "bad":
        return [{"lr": 0.1}, {"model.detph": 3}, {"lr": 0.01}]
      return sweep.product(lr=[0.1, 0.01], **{"model.depth": [2, 3]})
""")

FAKE_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = args["workdir"]
    overrides = {k[len("config."):]: v for k, v in args.items() if k.startswith("config.")}
    here = os.path.dirname(args["config"].split(":")[0])
    known = {"lr", "model.depth", "data.fold", "data.num_folds"}
    bad = sorted(set(overrides) - known)
    resumed = os.path.exists(os.path.join(workdir, "started"))
    with open(os.path.join(here, "calls.log"), "a") as f:
      f.write(json.dumps(dict(name=os.path.basename(workdir), resumed=resumed)) + "\\n")
    if bad:
      print("medjax.main: error: Unknown config key %r." % bad[0], file=sys.stderr)
      sys.exit(2)
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, "started"), "w").close()
    slow = os.path.join(here, "slow")
    if os.path.exists(slow) and os.path.basename(workdir) != open(slow).read().strip():
      time.sleep(30)
    lr, depth = float(overrides.get("lr", 0.1)), int(overrides.get("model.depth", 2))
    fold = int(overrides.get("data.fold", 0))
    score = 0.5 + 0.2 * (lr == 0.1) + 0.05 * depth + 0.01 * fold
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      for step in (2, 4):
        f.write(json.dumps({"step": step, "val/score": score * step / 4}) + "\\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(dict(status="finished", step=4, best=dict(metric="val/score", value=score, step=4),
                     final={"val/score": score}, wall_s=1.5), f)
""")


def fake_score(lr: float, depth: int, fold: int = 0) -> float:
  return 0.5 + 0.2 * (lr == 0.1) + 0.05 * depth + 0.01 * fold


def write_fixture(folder) -> tuple:
  """Writes exp.py and fake_trainer.py into `folder`; returns (experiment path, trial command)."""
  folder = str(folder)
  with open(os.path.join(folder, "exp.py"), "w") as f:
    f.write(EXPERIMENT)
  with open(os.path.join(folder, "fake_trainer.py"), "w") as f:
    f.write(FAKE_TRAINER)
  return os.path.join(folder, "exp.py"), f"{sys.executable} {os.path.join(folder, 'fake_trainer.py')}"


def calls(folder) -> list:
  path = os.path.join(str(folder), "calls.log")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]
