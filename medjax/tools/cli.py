"""Private flag sets and the one error boundary of the command-line tools.

Flags: each tool defines its flags on its own `flags.FlagValues`, not on absl's global `FLAGS`, so that
importing several tools (and `medjax.main`) into one process, as a notebook or the test suite does, does not
clash on shared names such as `--workdir`. `run(main, flag_values)` is `absl.app.run` with that flag set;
`call(main, flag_values, argv)` parses and calls `main` the same way without `app.run` (which absl allows once
per process), for tests and notebooks.

Errors: a user's mistake is answered the way `medjax.main` answers it, with one line on stderr,
`medjax.tools.<name>: error: <message>`, and exit status 2 (a bad flag included). What counts as a user's
mistake (`is_user_error`):

  - `UsageError` (below) and absl's `app.UsageError`: a tool's own checks of its flags;
  - `config_lib.ConfigError`: a config or flag that `build` refuses, naming the key (an unknown split too);
  - `FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`, `FileExistsError`, `PermissionError`,
    whoever raised them: a path the user gave (a workdir, an input, an output folder), named in the message;
  - `ValueError` and `KeyError` raised by a `raise` statement in medjax's own code: the image readers, the
    checkpoint loader, the registries (an unknown name, with did-you-mean) and the builders raise these on
    purpose with a message that names the file, key or case.

Anything else keeps its traceback, because it is a bug to fix, not a message for the user: a TypeError or
AttributeError, a ValueError out of JAX, NumPy or Flax (a shape error deep in a traced program), a KeyError
of a dict lookup, `int("x")` in medjax code.
"""

from __future__ import annotations

import dis
import logging as pylogging
import os
import re
import sys
from typing import Any, Callable, Iterable, List, Optional, Sequence

from absl import app, flags, logging

from medjax.config_lib import ConfigError, suggest

_MEDJAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RAISE = dis.opmap["RAISE_VARARGS"]
_REQUIRED = re.compile(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.")
# Errors about a path: the message names it, and the user gave it (a workdir, an input, an output folder).
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class UsageError(ValueError):
  """A tool's flags do not make sense (a missing or malformed value, a workdir that is no run). A ValueError,
  so that code calling a tool's library function and catching ValueError keeps working."""


def refuse_pretext_run(config: Any, workdir: str, tool: str) -> None:
  """UsageError for a tool that needs the run's predictions when `workdir` is a self-supervised pretraining
  run: its model outputs embeddings, rotations or reconstructions, not predictions of the dataset's labels."""
  if config.get("pretext"):
    task = config.pretext if isinstance(config.pretext, str) else config.pretext.get("name")
    raise UsageError(f"{workdir} is a self-supervised pretraining run (config.pretext: {task}); {tool} needs a "
                     f"model that predicts the labels. Evaluate its encoder on a labelled task with "
                     f"`python -m medjax.tools.probe --init {workdir} --config ... --workdir ...`.")


def _raised_on_purpose_by_medjax(error: BaseException) -> bool:
  """Whether `error` was raised by a `raise` statement in a medjax module (not by a subscript, a call into
  NumPy or JAX, or a builtin in medjax code). The innermost frame of its traceback is where it was raised."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  code = tb.tb_frame.f_code
  in_medjax = os.path.abspath(code.co_filename).startswith(_MEDJAX_DIR + os.sep)
  return in_medjax and 0 <= tb.tb_lasti < len(code.co_code) and code.co_code[tb.tb_lasti] == _RAISE


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is a user's mistake to answer in one line (module docstring), rather than a bug."""
  if isinstance(error, (UsageError, app.UsageError, ConfigError) + PATH_ERRORS):
    return True
  return isinstance(error, (ValueError, KeyError)) and _raised_on_purpose_by_medjax(error)


def error_message(error: BaseException) -> str:
  """The message of `error` on one line: its text without KeyError's quotes, an OSError as `path: reason`."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    message = f"{error.filename}: {error.strerror}"
  elif len(error.args) == 1 and isinstance(error.args[0], str):
    message = error.args[0]  # str(KeyError) would quote it
  else:
    message = str(error) or type(error).__name__
  return " ".join(line.strip() for line in message.splitlines() if line.strip())


def fail(prog: str, message: str) -> None:
  """Prints `prog: error: message` to stderr and exits with status 2, as `medjax.main` does."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def program_name(main: Callable[..., Any]) -> str:
  """`medjax.tools.evaluate` for the `main` of that module, also when it runs as `python -m`."""
  module = getattr(main, "__module__", None)
  if module in (None, "__main__"):
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None else os.path.basename(sys.argv[0])
  return module


def parse(flag_values: flags.FlagValues, argv: Sequence[str], prog: str = "medjax") -> List[str]:
  """Parses `argv` (program name first) into `flag_values`; `--help` prints the tool's flags and exits,
  and a bad flag fails in one line (`fail`)."""
  if any(arg in ("--help", "-h", "--helpfull", "-?") for arg in argv[1:]):
    print(flag_values.main_module_help() or flag_values.get_help())
    sys.exit(0)
  flag_values.unparse_flags()  # back to the defaults, so a second parse in one process starts afresh
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    message = error_message(e)
    missing = _REQUIRED.fullmatch(message)  # absl's wording for a required flag left out
    fail(prog, (f"--{missing.group(1)} is required" if missing else message) + " (pass --help to list the flags)")
  if not flags.FLAGS.is_parsed():  # absl logging reads the global flags; take their defaults
    flags.FLAGS.mark_as_parsed()
  return rest


def _guarded(main: Callable[[List[str]], object], prog: str) -> Callable[[List[str]], object]:
  """`main` with the error boundary: a user error (`is_user_error`) becomes one line and exit status 2."""
  def guarded_main(argv: List[str]) -> object:
    try:
      return main(argv)
    except (ValueError, KeyError, OSError, app.UsageError) as e:
      if not is_user_error(e):
        raise
      fail(prog, error_message(e))
    return None
  return guarded_main


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of Orbax and other libraries (kept: their warnings and medjax's own records)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "medjax" in record.pathname


def quiet_libraries() -> None:
  """Keeps the console to medjax's own log lines and every library's warnings."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run(main: Callable[[List[str]], object], flag_values: flags.FlagValues) -> None:
  """`app.run(main)` with the tool's own flag set, quiet library logs and the error boundary."""
  prog = program_name(main)
  guarded_main = _guarded(main, prog)

  def main_quietly(argv):
    quiet_libraries()
    return guarded_main(argv)
  app.run(main_quietly, flags_parser=lambda argv: parse(flag_values, argv, prog))


def call(main: Callable[[List[str]], object], flag_values: flags.FlagValues, argv: Sequence[str]) -> object:
  """What `run` does for the command line `argv` (program name first), without `app.run`: for tests and
  notebooks. A user error exits (SystemExit 2) after its one line, as on the command line."""
  prog = program_name(main)
  return _guarded(main, prog)(parse(flag_values, argv, prog))


# --------------------------------------------------------------------------- checks of flag values


def numbers(values: Optional[Iterable[str]], flag: str, kind: type = int, *, positive: bool = False
            ) -> Optional[tuple]:
  """The comma-separated `values` of `--flag` as a tuple of `kind` (int or float), each > 0 when `positive`;
  None when unset. A UsageError naming the flag otherwise (not int()'s own message, which names no flag)."""
  if values is None:
    return None
  values = list(values)
  what = ("positive " if positive else "") + ("integers" if kind is int else "numbers")
  try:
    parsed = tuple(kind(v) for v in values)
  except ValueError:
    parsed = None
  if not parsed or (positive and min(parsed) <= 0):
    raise UsageError(f"--{flag} takes {what} separated by commas, got {','.join(values)!r}.")
  return parsed


def check_exists(path: str, flag: str) -> str:
  """The absolute `path`, or a UsageError naming it when it does not exist, with the closest name next to it
  (a mistyped folder or file name)."""
  shown = os.path.abspath(path)
  if not os.path.exists(path):
    parent = os.path.dirname(shown)
    hint = suggest(os.path.basename(shown), os.listdir(parent)) if os.path.isdir(parent) else ""
    raise UsageError(f"{flag} {shown} does not exist.{hint}")
  return shown


def check_workdir(path: str, flag: str = "--workdir") -> str:
  """`path` when it may be a run directory, else a UsageError naming it: missing (with the closest name next to
  it, for a mistyped one), a file, or empty. A folder without config.json is `checkpoint.load_config`'s to
  refuse (a FileNotFoundError naming it), as for every other caller."""
  shown = check_exists(path, flag)
  if not os.path.isdir(path):
    raise UsageError(f"{flag} {shown} is a file, not a run directory.")
  if not os.listdir(path):
    raise UsageError(f"{flag} {shown} is empty: no run was written there (train one with python -m medjax.main).")
  return path


def split_source(dataset: Any, split: str, flag: str = "--split"):
  """`dataset.source(split)`, or a UsageError listing the splits there are, with the closest one."""
  splits = list(dataset.splits)
  if split not in splits:
    raise UsageError(f"{flag}: the dataset has no split {split!r}; it has {', '.join(map(repr, splits))}."
                     f"{suggest(split, splits)}")
  return dataset.source(split)
