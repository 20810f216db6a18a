"""Checkpoints of a run: the TrainState through Orbax, per-step metrics, and the config as JSON.

Layout of a work directory (the record of one experiment; nothing in it is rewritten silently):

  workdir/config.json               the experiment config (`record_config` / `load_config`)
  workdir/config_history.jsonl      append-only: every allowed config change (`--allow_config_change`), with
                                    the keys changed old -> new and the step it took effect at
  workdir/env.json                  commit, library versions and devices of the run (`medjax.provenance`)
  workdir/checkpoints/<step>/state  the TrainState pytree (Orbax PyTree, OCDBT)
  workdir/checkpoints/<step>/metrics  the metrics passed to `Checkpointer.save` (JSON)
  workdir/checkpoints/<step>.damaged  a damaged step moved aside to save that step again (all files kept)
  workdir/metrics.jsonl, results.json, tensorboard/   written by `medjax.train`

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager`: periodic and forced saves, asynchronous writes,
and retention = the latest `max_to_keep` steps plus the `keep_best` best steps by a validation metric.
Restoring always goes through an abstract target (a pytree of `jax.ShapeDtypeStruct` with `.sharding`),
so a checkpoint written on 8 devices restores onto 1 device, or onto any other mesh, with the requested
shardings. `load(workdir)` is the notebook entry point: config + model (as `build.model` makes it, in the
run's compute dtype) + variables, no optimizer needed. `for_run(workdir)` opens a run's checkpoints with
the retention and ranking its config asks for.

Damaged steps (a missing or truncated file; `integrity`) are found when a directory is opened, hidden from
Orbax (never listed, ranked or deleted) and left on disk as they are; `train.main` resumes from the newest
intact step with a `DamagedCheckpointWarning`, and `load` of a damaged step raises `DamagedCheckpointError`
naming it and the intact steps. A changed config on an existing run is refused (`check_config`) unless
allowed, and then recorded (`record_config`; `config_history`).

`init_from` starts a new run from another run's or a file's weights (`config.init_from`), writing
workdir/init_report.json.

Modules: `manager` (Checkpointer), `integrity` (damage checks, errors), `config_history` (config.json and
its history), `runs` (for_run, load), `ranking` (metrics and best steps), `state_tree` (key paths, mismatches).
"""

from medjax.checkpoint.config_history import (ARCHITECTURE_KEYS, CONFIG_FILE, CONFIG_HISTORY_FILE, check_config,
                                              config_diff, load_config, read_config_history, record_config,
                                              save_config)
from medjax.checkpoint.init_from import INIT_REPORT_FILE, initial_variables, pretrained_variables, with_teacher
from medjax.checkpoint.integrity import (CheckpointError, CheckpointNotFoundError, DamagedCheckpointError,
                                         DamagedCheckpointWarning, step_damage)
from medjax.checkpoint.manager import BEST_MODES, Checkpointer
from medjax.checkpoint.ranking import metric_value
from medjax.checkpoint.runs import CHECKPOINT_DIR, Loaded, for_run, load, model_weights

__all__ = [
                                              "ARCHITECTURE_KEYS",
                                              "BEST_MODES",
                                              "CHECKPOINT_DIR",
                                              "CONFIG_FILE",
                                              "CONFIG_HISTORY_FILE",
                                              "INIT_REPORT_FILE",
                                              "CheckpointError",
                                              "CheckpointNotFoundError",
                                              "Checkpointer",
                                              "DamagedCheckpointError",
                                              "DamagedCheckpointWarning",
                                              "Loaded",
                                              "check_config",
                                              "config_diff",
                                              "for_run",
                                              "initial_variables",
                                              "load",
                                              "load_config",
                                              "metric_value",
                                              "model_weights",
                                              "pretrained_variables",
                                              "read_config_history",
                                              "record_config",
                                              "save_config",
                                              "step_damage",
                                              "with_teacher",
]
