"""The optuna backend: TPE sampling of a search space, pruning on validation metrics, resumable studies.

Trials run in this process through `medjax.train.main(config, workdir, on_eval=callback)`: after each
evaluation the callback reports the sweep metric to optuna (`trial.report(value, step)`) and returns
`trial.should_prune()`, which stops the run cleanly (checkpoint written) when the pruner says so. The study
lives in an SQLite file in the sweep workdir by default (`--storage postgresql://...` to share it between
launchers on several machines: each launcher then runs trials of the same study). Trials heartbeat, so a
launcher killed outright leaves no trial RUNNING forever; a trial stopped by Ctrl-C/SIGTERM is marked
"interrupted" and, on the next launch, enqueued again with the same parameters and workdir, so it resumes
from its checkpoint. `num_trials` counts completed plus pruned trials over all launches.

Pruners: "median" (MedianPruner: stop a trial whose value is worse than the median of earlier trials at the
same step, after 2 complete trials) or "halving" (SuccessiveHalvingPruner, Li et al. 2020, "A System for
Massively Parallel Hyperparameter Tuning", arXiv:1810.05934).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional

from medjax import atomic, config_lib
from medjax.sweep import local as local_lib
from medjax.sweep import space as space_lib
from medjax.sweep import trials as trials_lib

STUDY_FILE = "optuna.db"
BEST_CONFIG_FILE = "best_config.json"
_HEARTBEAT_S, _GRACE_S = 60, 180


def default_storage(workdir: str) -> str:
  return f"sqlite:///{os.path.abspath(os.path.join(workdir, STUDY_FILE))}"


def _train_main():
  from medjax import train  # imported when a trial starts: the launcher itself stays light
  return train.main


def check_on_eval(train_fn: Callable) -> None:
  """Fails clearly when the train function cannot report evaluations (needed for pruning)."""
  if "on_eval" not in inspect.signature(train_fn).parameters:
    raise RuntimeError(
        f"{getattr(train_fn, '__module__', '')}.{getattr(train_fn, '__name__', train_fn)} has no `on_eval` "
        "keyword: the optuna backend needs train.main(config, workdir, *, on_eval=callback) to report "
        "validation metrics for pruning. Update medjax/train.py, or use --backend local.")


def make_pruner(name: str):
  import optuna
  if name == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
  if name == "halving":
    return optuna.pruners.SuccessiveHalvingPruner()
  if name == "none":
    return optuna.pruners.NopPruner()
  raise ValueError(f"Unknown pruner {name!r}; expected 'median', 'halving' or 'none'.")


def open_study(workdir: str, *, metric: str, mode: str, storage: Optional[str] = None,
               study_name: str = "medjax_sweep", seed: int = 0, pruner: str = "median"):
  """Creates the study, or loads it from `storage` to continue it."""
  import optuna
  url = storage or default_storage(workdir)
  os.makedirs(workdir, exist_ok=True)
  with warnings.catch_warnings():  # heartbeats are marked experimental; we rely only on their basics
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    rdb = optuna.storages.RDBStorage(url, heartbeat_interval=_HEARTBEAT_S, grace_period=_GRACE_S,
                                     heartbeat_stale_trial_callback=_retry_callback())
  study = optuna.create_study(study_name=study_name, storage=rdb, load_if_exists=True,
                              direction="maximize" if mode == "max" else "minimize",
                              sampler=optuna.samplers.TPESampler(seed=seed), pruner=make_pruner(pruner))
  study.set_user_attr("metric", metric)
  return study


def _retry_callback():
  """Re-enqueues a trial with its parameters and user attributes (its workdir), at most twice."""
  import optuna
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def _retry_interrupted(study) -> int:
  """Enqueues trials a previous launch interrupted (same parameters and workdir, so they resume)."""
  import optuna
  trials = study.get_trials(deepcopy=False)
  retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
  count = 0
  for t in trials:
    if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
      _retry_callback()(study, t)
      count += 1
  return count


def run_optuna(workdir: str, config_spec: str, space: Mapping[str, Any], *, num_trials: int, metric: str,
               mode: str, storage: Optional[str] = None, seed: int = 0, pruner: str = "median",
               train_fn: Optional[Callable] = None, log=print) -> Dict[str, Any]:
  """Runs the study until `num_trials` trials are complete or pruned; returns the best trial's summary.

  `train_fn(config, workdir, *, on_eval)` defaults to `medjax.train.main` (tests pass a fake).
  """
  import optuna
  train_fn = train_fn or _train_main()
  check_on_eval(train_fn)
  workdir = os.path.abspath(workdir)
  study = open_study(workdir, metric=metric, mode=mode, storage=storage, seed=seed, pruner=pruner)
  requeued = _retry_interrupted(study)
  counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
  done = len(study.get_trials(deepcopy=False, states=counted))
  log(f"sweep: optuna study {study.study_name}: {done}/{num_trials} trials done, {requeued} resumed.")

  def objective(trial) -> float:
    overrides = space_lib.suggest(trial, space)
    trial_dir = trial.user_attrs.get("workdir") or os.path.join(
        workdir, f"trial{trial.number:04d}-{trials_lib.trial_name(overrides)}")
    trial.set_user_attr("workdir", trial_dir)
    trial.set_user_attr("overrides", json.loads(json.dumps(overrides, default=list)))
    best: Dict[str, Any] = {}

    def on_eval(step: int, metrics: Mapping[str, Any]) -> bool:
      value = trials_lib.finite_or_none(metrics.get(metric))
      if value is None:
        return False
      if not best or (value > best["value"] if mode == "max" else value < best["value"]):
        best.update(value=value, step=int(step))
      trial.report(value, int(step))
      if trial.should_prune():
        best["pruned_at"] = int(step)
        return True
      return False

    try:
      config = config_lib.apply_overrides(config_lib.load_config(config_spec), trials_lib.override_args(overrides))
      train_fn(config, trial_dir, on_eval=on_eval)
    except KeyboardInterrupt:
      trial.set_user_attr("interrupted", True)
      raise
    except Exception as e:
      trial.set_user_attr("error", f"{type(e).__name__}: {e}"[-2000:])
      raise
    if "pruned_at" in best:
      raise optuna.TrialPruned(f"{metric}={best['value']:.4g} at step {best['pruned_at']}")
    if not best:  # a resumed run that was already past its last evaluation: read what it wrote
      value, step, _ = trials_lib.best_from_metrics(trial_dir, metric, mode)
      if value is None:
        raise RuntimeError(f"Trial {trial.number} reported no finite {metric!r}; check config.eval_every_steps.")
      best.update(value=value, step=step)
    trial.set_user_attr("best_step", best["step"])
    return best["value"]

  previous = local_lib._raise_on_sigterm()
  try:
    if num_trials > done:
      study.optimize(objective, n_trials=num_trials - done, catch=(Exception,), gc_after_trial=True,
                     callbacks=[optuna.study.MaxTrialsCallback(num_trials, states=counted)])
  finally:
    local_lib._restore_sigterm(previous)
    write_sweep_file(workdir, study, config_spec, metric, mode)
  return write_best(workdir, study, config_spec)


_STATUS = {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
           "WAITING": "pending"}


def write_sweep_file(workdir: str, study, config_spec: str, metric: str, mode: str) -> None:
  """sweep.json from the study, in the same form as the other backends (so the report reads it)."""
  records = []
  trials = study.get_trials(deepcopy=False)
  retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
  for t in trials:
    if "workdir" not in t.user_attrs or t.number in retried:  # a retry continues it in the same workdir
      continue
    status = _STATUS.get(t.state.name, t.state.name.lower())
    if status == "failed" and t.user_attrs.get("interrupted"):
      status = "interrupted"
    records.append(dict(name=os.path.basename(t.user_attrs["workdir"]), number=t.number,
                        overrides=t.user_attrs.get("overrides", {}), workdir=t.user_attrs["workdir"],
                        status=status, error=t.user_attrs.get("error", ""),
                        wall_s=t.duration.total_seconds() if t.duration else None))
  doc = dict(config=config_spec, backend="optuna", metric=metric, mode=mode, study=study.study_name,
             axes=plot_axes(trials), trials=records)
  atomic.write_text_atomically(os.path.join(workdir, trials_lib.SWEEP_FILE),
                               json.dumps(doc, indent=2, default=list) + "\n")


def plot_axes(trials) -> Dict[str, Dict[str, Any]]:
  """The report's x axis per parameter, from the distributions the study sampled (as `space.plot_axes`):
  a log-scaled float or int distribution gives a log axis over its range, another float or int one a linear
  axis, a categorical one categories."""
  import optuna
  axes: Dict[str, Dict[str, Any]] = {}
  for t in trials:
    for name, dist in t.distributions.items():
      if name in axes:
        continue
      if isinstance(dist, (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)):
        axes[name] = dict(scale="log" if dist.log else "linear", range=[dist.low, dist.high])
      elif isinstance(dist, optuna.distributions.CategoricalDistribution):
        axes[name] = dict(scale="categorical")
  return axes


def write_best(workdir: str, study, config_spec: str) -> Dict[str, Any]:
  """Writes best_config.json (the full config of the best trial, `config_lib.from_json` reads it)."""
  import optuna
  if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
    return {}
  best = study.best_trial
  overrides = best.user_attrs.get("overrides", {})
  config = config_lib.apply_overrides(config_lib.load_config(config_spec), trials_lib.override_args(overrides))
  atomic.write_text_atomically(os.path.join(workdir, BEST_CONFIG_FILE), config_lib.to_json(config) + "\n")
  return dict(number=best.number, value=best.value, overrides=overrides, workdir=best.user_attrs.get("workdir"),
              best_step=best.user_attrs.get("best_step"))
