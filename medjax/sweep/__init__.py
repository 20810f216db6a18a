"""Hyperparameter sweeps and k-fold cross-validation over an experiment file.

An experiment file declares its sweep next to its config:

  def get_sweep(arg=None):
    c = get_config(arg)                      # the same `arg` as get_config: "quick=true", "dims=2", ...
    return sweep.product(lr=[c.lr, c.lr / 5], **{"model.features": [(8, 16, 32), (16, 32, 64)]})

`get_sweep(arg)` returns either
  - a list of override dicts, `{"dotted.key": value}` (grids from `product`, folds from `kfold`, random draws
    from `random_draws`, or written out): run in order by the local and SLURM backends (`--num_trials N`:
    the first N of them, so a later launch with a larger N adds the next ones); or
  - a search space, `{"lr": loguniform(1e-4, 1e-2), "model.depth": choice([2, 3])}`: sampled by optuna
    (`--backend optuna`), or drawn `--num_trials` times at random by the other backends.
Values are applied exactly like `--config.key=value` on the command line, so only existing keys can be
swept and a typo fails that trial with the config's own error message.

Launch with `python -m medjax.tools.sweep` (see that module). Pieces:
  space.py          product, choice, uniform, loguniform, intuniform, random_draws, kfold, optuna sampling,
                    plot_axes (the report's x axis per key: log, linear or categorical, from the space)
  trials.py         trial names/workdirs, override arguments, sweep.json, reading a trial's results
  local.py          subprocess queue pinned to GPUs (or CPU processes)
  slurm.py          submitit job arrays, multi-node trials, sbatch script preview
  optuna_search.py  TPE + pruning in process through train.main(on_eval=...), resumable storage
  report.py         results.csv, results.md (with k-fold mean/std), metric_vs_<key>.png (log axes with
                    plain decade labels for log-uniform parameters)
"""

from medjax.sweep.space import (Choice, IntUniform, LogUniform, Uniform, choice, intuniform, is_space, kfold,
                                loguniform, product, random_draws, uniform)
from medjax.sweep.trials import load_sweep, override_args, trial_name

__all__ = ["Choice", "IntUniform", "LogUniform", "Uniform", "choice", "intuniform", "is_space", "kfold",
           "load_sweep", "loguniform", "override_args", "product", "random_draws", "trial_name", "uniform"]
