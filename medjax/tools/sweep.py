r"""Sweep launcher: runs the trials of an experiment's `get_sweep(arg)` and writes a report.

  python -m medjax.tools.sweep --config experiments/synthetic_unet.py:quick=true --workdir runs/sweep \
      --backend local --parallel 2 [--devices_per_trial 1] [--metric val/dice_mean --mode max]
  python -m medjax.tools.sweep --config experiments/synthetic_unet.py --workdir /shared/sweep --backend slurm \
      --partition gpu --time_min 120 --gpus_per_node 8 --nodes 2 [--dry_run]
  python -m medjax.tools.sweep --config experiments/synthetic_resnet.py --workdir runs/tpe --backend optuna \
      --num_trials 30 [--storage postgresql://user@host/db] [--pruner median|halving|none]

Backends: `local` (subprocesses of medjax.main, `--parallel` at a time, each pinned to its own GPUs), `slurm`
(a submitit job array; `--cluster local` runs it on this machine without SLURM), `optuna` (TPE with pruning,
in this process). Relaunching the same command resumes: finished trials are skipped, interrupted ones resume
from their checkpoints. `--num_trials N` draws N trials from a search space, or runs the first N trials of a
grid in its order (relaunching with a larger N runs the next ones). Settings come from the flags, else from
the experiment config's optional `sweep` section (same names, e.g. `c.sweep = dict(partition="gpu",
gpus_per_node=8, parallel=4)`), else the defaults. The metric defaults to the config's
`best_metric`/`best_mode`. Writes DIR/sweep.json, DIR/results.csv, DIR/results.md, DIR/metric_vs_<key>.png
(optuna: also DIR/best_config.json). Exit status: 0 when every trial finished, 1 when one failed, 130 when
interrupted.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from typing import Any, Dict, List

from absl import app, flags, logging

from medjax import build, config_lib
from medjax.sweep import local as local_lib
from medjax.sweep import report as report_lib
from medjax.sweep import slurm as slurm_lib
from medjax.sweep import space as space_lib
from medjax.sweep import trials as trials_lib
from medjax.tools import cli

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_CONFIG = flags.DEFINE_string("config", None, "Experiment file with its argument: path.py[:arg].", flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per trial).", flag_values=_FLAGS)
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "slurm", "optuna"], "Where trials run.", flag_values=_FLAGS)
_PARALLEL = flags.DEFINE_integer("parallel", None, "local: trials at a time (default 1).", flag_values=_FLAGS)
_DEVICES = flags.DEFINE_integer("devices_per_trial", None, "local: GPUs (or CPU host devices) per trial.",
                                flag_values=_FLAGS)
_METRIC = flags.DEFINE_string("metric", None, "Metric to compare trials by (default: config.best_metric).",
                              flag_values=_FLAGS)
_MODE = flags.DEFINE_enum("mode", None, ["max", "min"], "Whether larger or smaller is better.", flag_values=_FLAGS)
_NUM_TRIALS = flags.DEFINE_integer("num_trials", None, "Trials drawn from a search space / optuna budget / the "
                                   "first N trials of a grid (a larger N later adds the next ones).",
                                   flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", None, "Seed of random draws and of the TPE sampler (default 0).",
                             flag_values=_FLAGS)
_TRIAL_COMMAND = flags.DEFINE_string("trial_command", None, "Program run per trial (default: python -m "
                                     "medjax.main); e.g. a container wrapper around it.", flag_values=_FLAGS)
_STORAGE = flags.DEFINE_string("storage", None, "optuna: storage URL (default sqlite in --workdir).",
                               flag_values=_FLAGS)
_PRUNER = flags.DEFINE_enum("pruner", None, ["median", "halving", "none"], "optuna pruner (default median).",
                            flag_values=_FLAGS)
_CLUSTER = flags.DEFINE_enum("cluster", None, ["slurm", "local"], "slurm backend: submitit executor.",
                             flag_values=_FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "slurm: print the sbatch script and submit nothing.", flag_values=_FLAGS)
_WAIT = flags.DEFINE_bool("wait", True, "slurm: wait for the jobs and write the report.", flag_values=_FLAGS)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report from sweep.json.", flag_values=_FLAGS)
_SLURM_FLAGS = dict(
    partition=flags.DEFINE_string("partition", None, "slurm: partition.", flag_values=_FLAGS),
    time_min=flags.DEFINE_integer("time_min", None, "slurm: time limit per trial in minutes (default 60).",
                                  flag_values=_FLAGS),
    nodes=flags.DEFINE_integer("nodes", None, "slurm: nodes per trial (one JAX process per node).", flag_values=_FLAGS),
    gpus_per_node=flags.DEFINE_integer("gpus_per_node", None, "slurm: GPUs per node.", flag_values=_FLAGS),
    cpus_per_task=flags.DEFINE_integer("cpus_per_task", None, "slurm: CPUs per node-task.", flag_values=_FLAGS),
    mem_gb=flags.DEFINE_integer("mem_gb", None, "slurm: memory per node in GB.", flag_values=_FLAGS),
    account=flags.DEFINE_string("account", None, "slurm: account.", flag_values=_FLAGS),
    qos=flags.DEFINE_string("qos", None, "slurm: quality of service.", flag_values=_FLAGS),
    constraint=flags.DEFINE_string("constraint", None, "slurm: node constraint.", flag_values=_FLAGS),
)

_DEFAULTS: Dict[str, Any] = dict(parallel=1, devices_per_trial=1, num_trials=None, seed=0, pruner="median",
                                 cluster="slurm", trial_command=local_lib.DEFAULT_TRIAL_COMMAND, storage=None)
_LAUNCHER_KEYS = set(_DEFAULTS) | {"metric", "mode"}


def _absolute_spec(spec: str) -> str:
  path, sep, arg = spec.partition(":")
  return os.path.abspath(path) + sep + arg


def resolve_settings(config, given: Dict[str, Any]) -> Dict[str, Any]:
  """Settings from `given` (None = not given), else the config's `sweep` section, else defaults."""
  section = dict(config.get("sweep", {}) or {})
  slurm_keys = set(slurm_lib.SlurmOptions.__dataclass_fields__)
  unknown = sorted(set(section) - _LAUNCHER_KEYS - slurm_keys)
  if unknown:
    raise config_lib.ConfigError(f"config.sweep has unknown key(s) {unknown}; known: "
                                 f"{sorted(_LAUNCHER_KEYS | slurm_keys)}.")
  settings = {**_DEFAULTS, **{k: v for k, v in section.items() if k not in slurm_keys}}
  run = build.settings(config)
  settings["metric"] = section.get("metric", run.best_metric)
  settings["mode"] = section.get("mode", run.best_mode)
  slurm = {k: v for k, v in section.items() if k in slurm_keys}
  for key, value in given.items():
    if value is None:
      continue
    (slurm if key in slurm_keys else settings)[key] = value
  if not settings["metric"]:
    raise config_lib.ConfigError("No metric to compare trials: pass --metric or set config.best_metric.")
  if settings["num_trials"] is not None and settings["num_trials"] < 1:
    raise config_lib.ConfigError(f"--num_trials must be >= 1, got {settings['num_trials']}.")
  settings["slurm"] = slurm_lib.SlurmOptions.from_mapping(slurm)
  return settings


def first_trials(grid: List[Dict[str, Any]], num_trials: int, source: str = "--num_trials",
                 log=print) -> List[Dict[str, Any]]:
  """The first `num_trials` trials of a grid, in its order, and one line saying how many of them run.

  The grid's order is fixed by get_sweep, and finished trials are found by their workdirs, so a relaunch
  with a larger number skips the trials done and runs the next ones. sweep.json and the report then cover
  the trials of this launch only (the workdirs of later trials, if any, are kept).
  """
  if num_trials >= len(grid):
    log(f"sweep: {source} {num_trials}: running all {len(grid)} trials of the grid.")
    return list(grid)
  log(f"sweep: {source} {num_trials}: running the first {num_trials} of the grid's {len(grid)} trials "
      "(a larger value adds the next ones).")
  return list(grid[:num_trials])


def launch(config_spec: str, workdir: str, backend: str = "local", *, dry_run: bool = False, wait: bool = True,
           report_only: bool = False, train_fn=None, log=print, **given: Any) -> Dict[str, Any]:
  """Runs (or resumes) a sweep and writes its report; returns the report dict plus "counts"/"best".

  `given` holds the flag values (None for not given): parallel, devices_per_trial, metric, mode, num_trials,
  seed, trial_command, storage, pruner, cluster and the SlurmOptions fields. `train_fn` replaces
  `medjax.train.main` for the optuna backend (tests).
  """
  config = config_lib.load_config(config_spec)
  settings = resolve_settings(config, given)
  metric, mode = settings["metric"], settings["mode"]
  workdir = os.path.abspath(workdir)
  abs_spec = _absolute_spec(config_spec)
  if report_only:
    return dict(report_lib.write_report(workdir, metric, mode), counts={})
  sweep = trials_lib.load_sweep(config_spec)
  best: Dict[str, Any] = {}
  if backend == "optuna":
    from medjax.sweep import optuna_search  # optuna is imported only when used
    if not space_lib.is_space(sweep):
      raise config_lib.ConfigError(f"--backend optuna needs get_sweep to return a search space (a dict of "
                                   f"choice/uniform/loguniform); {config_spec} returned a list of "
                                   f"{len(sweep)} trials. Use --backend local or slurm for a list.")
    if not settings["num_trials"]:
      raise config_lib.ConfigError("--backend optuna needs --num_trials.")
    best = optuna_search.run_optuna(workdir, abs_spec, sweep, num_trials=settings["num_trials"], metric=metric,
                                    mode=mode, storage=settings["storage"], seed=settings["seed"],
                                    pruner=settings["pruner"], train_fn=train_fn, log=log)
    counts: Dict[str, int] = {}
  else:
    axes = space_lib.plot_axes(sweep)
    if space_lib.is_space(sweep):
      if not settings["num_trials"]:
        raise config_lib.ConfigError(f"{config_spec}: get_sweep returned a search space; pass --num_trials "
                                     "to draw that many trials at random (or use --backend optuna).")
      sweep = space_lib.random_draws(sweep, settings["num_trials"], settings["seed"])
    elif settings["num_trials"]:
      source = "--num_trials" if given.get("num_trials") is not None else "config.sweep.num_trials"
      sweep = first_trials(sweep, settings["num_trials"], source, log)
    if backend == "slurm" and dry_run:
      folder = os.path.join(workdir, "slurm_logs")
      log(slurm_lib.sbatch_script(folder, settings["slurm"], len(sweep)))
      return dict(counts={}, dry_run=True)
    header = dict(config=config_spec, config_path=abs_spec, backend=backend, metric=metric, mode=mode, axes=axes)
    state = trials_lib.SweepState(workdir, header, sweep)
    if backend == "local":
      counts = local_lib.run_local(state, abs_spec, parallel=settings["parallel"],
                                   devices_per_trial=settings["devices_per_trial"],
                                   trial_command=settings["trial_command"], log=log)
    elif backend == "slurm":
      executor = slurm_lib.make_executor(os.path.join(workdir, "slurm_logs"), settings["slurm"],
                                         settings["cluster"])
      counts = slurm_lib.run_submitit(state, abs_spec, executor, trial_command=settings["trial_command"],
                                      wait=wait, log=log)
    else:
      raise config_lib.ConfigError(f"Unknown backend {backend!r}; expected local, slurm or optuna.")
  result = report_lib.write_report(workdir, metric, mode)
  log(f"sweep: report in {result['markdown']}")
  return dict(result, counts=counts, best=best)


class _QuietLibraries(pylogging.Filter):
  """The optuna backend trains in this process: keep medjax's records and warnings, drop Orbax's INFO."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "medjax" in record.pathname


def main(argv) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _CONFIG.value or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  given = dict(parallel=_PARALLEL.value, devices_per_trial=_DEVICES.value, metric=_METRIC.value, mode=_MODE.value,
               num_trials=_NUM_TRIALS.value, seed=_SEED.value, trial_command=_TRIAL_COMMAND.value,
               storage=_STORAGE.value, pruner=_PRUNER.value, cluster=_CLUSTER.value,
               **{k: f.value for k, f in _SLURM_FLAGS.items()})
  try:
    result = launch(_CONFIG.value, _WORKDIR.value, _BACKEND.value, dry_run=_DRY_RUN.value, wait=_WAIT.value,
                    report_only=_REPORT_ONLY.value, **given)
  except config_lib.ConfigError as e:
    print(f"medjax.tools.sweep: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("medjax.tools.sweep: interrupted; run the same command again to resume.", file=sys.stderr)
    sys.exit(130)
  if result.get("best"):
    print(f"Best trial {result['best']['number']}: {result['best']['value']:.4g} with "
          f"{result['best']['overrides']}; config in {os.path.join(_WORKDIR.value, 'best_config.json')}.")
  failed = [r["name"] for r in result.get("rows", []) if r["status"] == "failed"]
  if failed:
    print(f"medjax.tools.sweep: {len(failed)} trial(s) failed: {', '.join(failed)} (see results.md).",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, _FLAGS)
