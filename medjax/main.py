"""Command-line entry point.

  python -m medjax.main --config experiments/synthetic_unet.py[:arg] --workdir DIR [--config.key=value ...]

`--config.key=value` overrides are applied to the loaded config by `config_lib.apply_overrides`: only
existing keys can be set (a mistyped key fails at once, naming the key and the closest match), values
are typed from the current value, and the result is locked. Multi-process runs call
`jax.distributed.initialize()` when `--coordinator_address` is given.
"""

from __future__ import annotations

import logging as pylogging
import sys
from typing import List, Sequence, Tuple

from absl import app, flags, logging

_CONFIG = flags.DEFINE_string("config", None, "Experiment file, optionally with its argument: path.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

_OVERRIDE_PREFIX = "--config."


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Separates `--config.a.b=v` arguments (returned without the prefix) from the flags absl parses."""
  rest, overrides = [], []
  for arg in argv:
    (overrides.append(arg[len(_OVERRIDE_PREFIX):]) if arg.startswith(_OVERRIDE_PREFIX) else rest.append(arg))
  return rest, overrides


def _fail(message: str) -> None:
  print(f"medjax.main: error: {message}", file=sys.stderr)
  sys.exit(2)


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of Orbax and other libraries (kept: their warnings and medjax's own records)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "medjax" in record.pathname


def run(argv: Sequence[str], overrides: Sequence[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported after flag parsing: importing JAX is slow and flag errors should come back at once.
  from medjax import config_lib
  if not _CONFIG.value or not _WORKDIR.value:
    _fail("--config and --workdir are required.")
  try:
    config = config_lib.apply_overrides(config_lib.load_config(_CONFIG.value), overrides)
    config_lib.validate(config)
  except (config_lib.ConfigError, KeyError, ValueError) as e:
    _fail(str(e.args[0]) if e.args else str(e))
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from medjax import train
  logging.info("Devices: %s", jax.devices())
  train.main(config, _WORKDIR.value)


def cli() -> None:
  argv, overrides = split_overrides(sys.argv)
  app.run(lambda a: run(a, overrides), argv=argv)


if __name__ == "__main__":
  cli()
