"""The local backend: trials as subprocesses of `python -m medjax.main`, at most `parallel` at a time.

Each trial gets its own accelerators: with GPUs (CUDA_VISIBLE_DEVICES or `nvidia-smi`) the visible ones are
cut into groups of `devices_per_trial` and a trial runs with CUDA_VISIBLE_DEVICES set to a free group; on a
CPU-only machine a trial is a plain process whose XLA_FLAGS ask for `devices_per_trial` host devices (the
launcher's own device-count flag is replaced, never inherited). The launcher imports no JAX, so it holds no
accelerator itself.

Interrupting the launcher (Ctrl-C or SIGTERM) stops the running trials, records them as "interrupted" and
exits; running it again skips finished trials and reruns the others, which resume from their checkpoints.
A failing trial is recorded with the last lines of its stderr and never stops the others.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

from medjax.sweep import trials as trials_lib

DEFAULT_TRIAL_COMMAND = f"{shlex.quote(sys.executable)} -m medjax.main"
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")
ERROR_LINES = 15


def trial_argv(trial_command: str, config_spec: str, trial_dir: str, overrides: Mapping) -> List[str]:
  """The command line of one trial: `<trial_command> --config SPEC --workdir DIR --config.k=v ...`."""
  return [*shlex.split(trial_command), f"--config={config_spec}", f"--workdir={trial_dir}",
          *[f"--config.{arg}" for arg in trials_lib.override_args(overrides)]]


def local_gpus(environ: Optional[Mapping[str, str]] = None) -> List[str]:
  """GPU ids this machine lets us use: CUDA_VISIBLE_DEVICES if set, else what `nvidia-smi` lists."""
  environ = os.environ if environ is None else environ
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.splitlines() if line.strip()]


def device_slots(gpus: Sequence[str], devices_per_trial: int, parallel: int) -> List[Optional[List[str]]]:
  """One entry per concurrent trial: its GPU ids, or None for a CPU process."""
  if devices_per_trial < 1 or parallel < 1:
    raise ValueError(f"--parallel and --devices_per_trial must be >= 1, got {parallel} and {devices_per_trial}.")
  if not gpus:
    return [None] * parallel
  groups = [list(gpus[i:i + devices_per_trial]) for i in range(0, len(gpus), devices_per_trial)]
  groups = [g for g in groups if len(g) == devices_per_trial]
  if not groups:
    raise ValueError(f"--devices_per_trial={devices_per_trial} but only {len(gpus)} GPU(s) are visible "
                     f"({','.join(gpus)}).")
  return groups[:parallel]


def trial_env(base: Mapping[str, str], gpus: Optional[List[str]], devices_per_trial: int) -> Dict[str, str]:
  env = dict(base)
  if gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
  else:
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_trial}"])
  env["PYTHONUNBUFFERED"] = "1"
  return env


def error_tail(path: str, offset: int) -> str:
  """The last non-empty lines a trial wrote to stderr since `offset` (this attempt only)."""
  try:
    with open(path, errors="replace") as f:
      f.seek(offset)
      lines = [line.rstrip() for line in f.read().splitlines() if line.strip()]
  except OSError:
    return ""
  return "\n".join(lines[-ERROR_LINES:])


class _Running:

  def __init__(self, index, proc, slot, started, stderr_path, stderr_offset, files):
    self.index, self.proc, self.slot, self.started = index, proc, slot, started
    self.stderr_path, self.stderr_offset, self.files = stderr_path, stderr_offset, files


def run_local(state: trials_lib.SweepState, config_spec: str, *, parallel: int = 1, devices_per_trial: int = 1,
              trial_command: str = DEFAULT_TRIAL_COMMAND, environ: Optional[Mapping[str, str]] = None,
              poll_s: float = 0.2, log=print) -> Dict[str, int]:
  """Runs every trial of `state` that is not done; returns how many ended in each status."""
  base_env = dict(os.environ if environ is None else environ)
  free = collections.deque(device_slots(local_gpus(base_env), devices_per_trial, parallel))
  todo = collections.deque()
  for i, record in enumerate(state.records):
    if state.is_done(i):
      result = trials_lib.read_results_json(record["workdir"]) or {}
      state.update(i, status=result.get("status", record["status"]), error="")
    else:
      todo.append(i)
  log(f"sweep: {len(state.records)} trials, {len(state.records) - len(todo)} done, {len(todo)} to run, "
      f"{len(free)} at a time.")
  running: Dict[int, _Running] = {}
  counts: Dict[str, int] = collections.Counter()

  def start(i: int) -> None:
    record = state.records[i]
    os.makedirs(record["workdir"], exist_ok=True)
    slot = free.popleft()
    stdout = open(os.path.join(record["workdir"], "stdout.log"), "a")
    stderr_path = os.path.join(record["workdir"], "stderr.log")
    stderr = open(stderr_path, "a")
    offset = stderr.tell()
    argv = trial_argv(trial_command, config_spec, record["workdir"], record["overrides"])
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                            env=trial_env(base_env, slot, devices_per_trial))
    running[i] = _Running(i, proc, slot, time.time(), stderr_path, offset, (stdout, stderr))
    state.update(i, status="running", started=running[i].started, devices=slot, error="",
                 command=shlex.join(argv))
    log(f"sweep: started {record['name']}" + (f" on GPUs {','.join(slot)}" if slot else ""))

  def finish(run: _Running, interrupted: bool = False) -> None:
    for f in run.files:
      f.close()
    free.append(run.slot)
    del running[run.index]
    rc = run.proc.returncode
    result = trials_lib.read_results_json(state.records[run.index]["workdir"])
    if interrupted:
      status, error = "interrupted", ""
    elif rc == 0:
      status, error = (result or {}).get("status", "finished"), ""
    else:
      status, error = "failed", error_tail(run.stderr_path, run.stderr_offset) or f"exit code {rc}"
    ended = time.time()
    state.update(run.index, status=status, returncode=rc, error=error, ended=ended,
                 wall_s=round(ended - run.started, 3))
    counts[status] += 1
    log(f"sweep: {state.records[run.index]['name']} {status}" + (f": {error.splitlines()[-1]}" if error else ""))

  previous = _raise_on_sigterm()
  try:
    while todo or running:
      while todo and free:
        start(todo.popleft())
      for run in list(running.values()):
        if run.proc.poll() is not None:
          finish(run)
      if running:
        time.sleep(poll_s)
  except KeyboardInterrupt:
    for run in list(running.values()):
      _stop(run.proc)
      finish(run, interrupted=True)
    raise
  finally:
    _restore_sigterm(previous)
  return dict(counts)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(grace_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _sigterm(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def _raise_on_sigterm():
  """SIGTERM (a cluster's or a user's `kill`) takes the same clean path as Ctrl-C."""
  if threading.current_thread() is not threading.main_thread():
    return None
  return signal.signal(signal.SIGTERM, _sigterm)


def _restore_sigterm(previous) -> None:
  if previous is not None:
    signal.signal(signal.SIGTERM, previous)
