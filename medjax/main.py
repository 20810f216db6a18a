"""Command-line entry point.

  python -m medjax.main --config experiments/synthetic_unet.py[:arg] --workdir DIR [--config.key=value ...]

`--config.key=value` overrides are applied to the loaded config by `config_lib.apply_overrides`: only
existing keys can be set (a mistyped key fails at once, naming the key and the closest match), values
are typed from the current value, and the result is locked.

Multi-process runs (one process per host or per GPU) call `jax.distributed.initialize()` before JAX
starts when the flags or the environment say so:

  - explicitly: `--coordinator_address=host:port --num_processes=N --process_id=I [--local_device_ids=0,1]`
    on every process (flags left out are auto-detected by JAX); `--num_processes=1` forces a
    single-process run;
  - under SLURM: inside an `srun` step with more than one task, with everything detected by JAX's own
    SLURM support (coordinator = first node of the step, process id = SLURM_PROCID).

Every process runs the same `train.main`; see medjax/train.py for what each one writes.

An existing --workdir is resumed with the config it was started with: a different one (other overrides, an
edited experiment file) is refused with one line naming every differing key, unless `--allow_config_change`,
which records the change in the workdir's config_history.jsonl (`medjax.checkpoint.config_history`).
"""

from __future__ import annotations

import os
import sys
from typing import List, Mapping, Optional, Sequence, Tuple

from absl import app, flags, logging

from medjax.tools import cli as tool_cli

_CONFIG = flags.DEFINE_string("config", None, "Experiment file, optionally with its argument: path.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a run in --workdir with a config that differs from its config.json; the "
    "change is appended to config_history.jsonl. The model (model_name, model.*) can never change.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None,
                                      "Comma-separated ids of the local devices this process uses.")

_OVERRIDE_PREFIX = "--config."


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Separates `--config.a.b=v` arguments (returned without the prefix) from the flags absl parses."""
  rest, overrides = [], []
  for arg in argv:
    (overrides.append(arg[len(_OVERRIDE_PREFIX):]) if arg.startswith(_OVERRIDE_PREFIX) else rest.append(arg))
  return rest, overrides


def _slurm_step_tasks(environ: Mapping[str, str]) -> int:
  """Tasks of the current SLURM step; 1 outside one (the batch script itself is no step: no STEP_NODELIST)."""
  if "SLURM_STEP_NODELIST" not in environ:
    return 1
  for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
    if environ.get(key, "").isdigit():
      return int(environ[key])
  return 1


def distributed_kwargs(environ: Mapping[str, str], coordinator_address: Optional[str] = None,
                       num_processes: Optional[int] = None, process_id: Optional[int] = None,
                       local_device_ids: Optional[Sequence[str]] = None) -> Optional[dict]:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

  Explicit flags win; flags left as None are detected by JAX (SLURM, Open MPI, ...). Without flags, a
  SLURM step of several tasks is multi-process, with the step's task count and SLURM_PROCID.
  Raises ValueError for inconsistent flags.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}.")
  if all(v is None for v in (coordinator_address, num_processes, process_id)):
    tasks = _slurm_step_tasks(environ)
    if tasks > 1:  # the step's own counts; the coordinator (first node of the step) is left to JAX
      num_processes, process_id = tasks, int(environ["SLURM_PROCID"]) if "SLURM_PROCID" in environ else None
  if num_processes == 1 or all(v is None for v in (coordinator_address, num_processes, process_id)):
    return None
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes}).")
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if local_device_ids:
    try:
      kwargs["local_device_ids"] = [int(i) for i in local_device_ids]
    except ValueError:
      raise ValueError(f"--local_device_ids must be integers, got {','.join(local_device_ids)}.") from None
  return kwargs


def _fail(message: str) -> None:
  print(f"medjax.main: error: {message}", file=sys.stderr)
  sys.exit(2)


def run(argv: Sequence[str], overrides: Sequence[str]) -> None:
  del argv
  tool_cli.quiet_libraries()
  # Imported after flag parsing: importing JAX is slow and flag errors should come back at once.
  from medjax import config_lib
  if not _CONFIG.value or not _WORKDIR.value:
    _fail("--config and --workdir are required.")
  try:
    config = config_lib.apply_overrides(config_lib.load_config(_CONFIG.value), overrides)
  except (config_lib.ConfigError, KeyError, ValueError) as e:
    _fail(str(e.args[0]) if e.args else str(e))
  try:
    distributed = distributed_kwargs(os.environ, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                     _LOCAL_DEVICE_IDS.value)
  except ValueError as e:
    _fail(str(e))
  import jax
  if distributed is not None:
    jax.distributed.initialize(**distributed)  # before anything touches a device
  from medjax import build, train
  try:
    build.validate(config)
    if config.get("federated"):
      from medjax.federated import options as federated_options
      federated_options.parse(config.federated, config)
  except (config_lib.ConfigError, KeyError, ValueError) as e:
    _fail(str(e.args[0]) if e.args else str(e))
  logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  from medjax import checkpoint
  try:
    if config.get("federated"):  # rounds over sites: the one other loop (medjax.federated.simulation)
      from medjax.federated import simulation
      simulation.run(config, _WORKDIR.value)
    else:
      train.main(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except (config_lib.ConfigError, checkpoint.CheckpointError) as e:  # a changed config, no intact checkpoint
    _fail(str(e.args[0]) if e.args else str(e))


def cli() -> None:
  argv, overrides = split_overrides(sys.argv)
  app.run(lambda a: run(a, overrides), argv=argv)


if __name__ == "__main__":
  cli()
