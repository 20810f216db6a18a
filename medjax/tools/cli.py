"""Private flag sets for the command-line tools.

Each tool defines its flags on its own `flags.FlagValues`, not on absl's global `FLAGS`, so that importing
several tools (and `medjax.main`) into one process, as a notebook or the test suite does, does not clash on
shared names such as `--workdir`. `run(main, flag_values)` is `absl.app.run` with that flag set.
"""

from __future__ import annotations

import logging as pylogging
import sys
from typing import Callable, List, Sequence

from absl import app, flags, logging


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> List[str]:
  """Parses `argv` (program name first) into `flag_values`; `--help` prints the tool's flags and exits,
  and a bad flag exits with a one-line error."""
  if any(arg in ("--help", "-h", "--helpfull", "-?") for arg in argv[1:]):
    print(flag_values.main_module_help() or flag_values.get_help())
    sys.exit(0)
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --help to list the flags.")
  if not flags.FLAGS.is_parsed():  # absl logging reads the global flags; take their defaults
    flags.FLAGS.mark_as_parsed()
  return rest


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of Orbax and other libraries (kept: their warnings and medjax's own records)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "medjax" in record.pathname


def quiet_libraries() -> None:
  """Keeps the console to medjax's own log lines and every library's warnings."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run(main: Callable[[List[str]], object], flag_values: flags.FlagValues) -> None:
  """`app.run(main)` with the tool's own flag set and quiet library logs."""
  def main_quietly(argv):
    quiet_libraries()
    return main(argv)
  app.run(main_quietly, flags_parser=lambda argv: parse(flag_values, argv))
