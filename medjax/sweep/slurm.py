"""The SLURM backend: trials as one job array through submitit; multi-node trials as one JAX process per node.

Each array task runs `python -m medjax.main ...` (the same command line as the local backend) inside the
allocation. With `nodes > 1` submitit starts one task per node (`ntasks_per_node=1`, each task seeing all of
its node's GPUs), and every task passes medjax.main the distributed setup read from SLURM through
`submitit.JobEnvironment`: `--coordinator_address=<first node>:<port> --num_processes=<nodes>
--process_id=<rank>`, so `jax.distributed.initialize` needs nothing else. The port is derived from the job id
so array tasks sharing a node do not collide.

`cluster="local"` runs the same tasks with submitit's LocalExecutor (one machine, no scheduler): the way to
try a sweep file or test this backend without SLURM. `sbatch_script` shows the exact script a SLURM
submission would use, without submitting anything.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from medjax.sweep import local as local_lib
from medjax.sweep import trials as trials_lib

_PORT_BASE, _PORT_RANGE = 20000, 20000


@dataclasses.dataclass
class SlurmOptions:
  """Resources of one trial and the array. Fields are overridden by flags or a config's `sweep` section."""
  partition: Optional[str] = None
  time_min: int = 60
  nodes: int = 1
  gpus_per_node: int = 0
  cpus_per_task: Optional[int] = None
  mem_gb: Optional[int] = None
  account: Optional[str] = None
  qos: Optional[str] = None
  constraint: Optional[str] = None
  array_parallelism: int = 256
  job_name: str = "medjax_sweep"
  setup: Sequence[str] = ()  # shell lines before the job starts (module load, conda activate, ...)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> SlurmOptions:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown SLURM option(s) {unknown}; known: {sorted(known)}.")
    return cls(**dict(values))


def sbatch_parameters(options: SlurmOptions) -> Dict[str, Any]:
  """submitit SlurmExecutor parameters (sbatch names) for `options`; unset options are left out."""
  params: Dict[str, Any] = dict(job_name=options.job_name, time=int(options.time_min), nodes=int(options.nodes),
                                ntasks_per_node=1, array_parallelism=int(options.array_parallelism))
  if options.gpus_per_node:
    params["gpus_per_node"] = int(options.gpus_per_node)
  optional = dict(partition=options.partition, cpus_per_task=options.cpus_per_task, account=options.account,
                  qos=options.qos, constraint=options.constraint,
                  mem=f"{options.mem_gb}GB" if options.mem_gb else None)
  params.update({k: v for k, v in optional.items() if v is not None})
  if options.setup:
    params["setup"] = list(options.setup)
  return params


def sbatch_script(folder: str, options: SlurmOptions, num_trials: int) -> str:
  """The sbatch script submitit would submit for an array of `num_trials` trials (nothing is submitted)."""
  from submitit.slurm import slurm  # submitit's own script builder: what SlurmExecutor writes to disk
  command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
  return slurm._make_sbatch_string(command=command, folder=folder, map_count=num_trials,
                                   **sbatch_parameters(options))


def make_executor(folder: str, options: SlurmOptions, cluster: str = "slurm"):
  """A submitit executor: SlurmExecutor (`cluster="slurm"`) or LocalExecutor (`"local"`, one machine)."""
  import submitit
  if cluster == "slurm":
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**sbatch_parameters(options))
  elif cluster == "local":
    if options.nodes != 1:
      raise ValueError("submitit's local executor runs one node; set nodes=1 or use cluster='slurm'.")
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=int(options.time_min), gpus_per_node=int(options.gpus_per_node),
                               tasks_per_node=1)
  else:
    raise ValueError(f"Unknown submitit cluster {cluster!r}; expected 'slurm' or 'local'.")
  return executor


def coordinator_port(job_id: str) -> int:
  """A port for jax.distributed derived from the SLURM job id ("1234" or array "1234_5")."""
  digits = "".join(c for c in job_id if c.isdigit()) or "0"
  return _PORT_BASE + int(digits) % _PORT_RANGE


class TrialTask:
  """What one array task runs (picklable): medjax.main for one trial, plus the distributed flags."""

  def __init__(self, argv: List[str], trial_dir: str):
    self.argv, self.trial_dir = list(argv), trial_dir

  def distributed_flags(self, env) -> List[str]:
    if env.num_tasks <= 1:
      return []
    job_id = os.environ.get("SLURM_JOB_ID", str(env.job_id))
    return [f"--coordinator_address={env.hostnames[0]}:{coordinator_port(job_id)}",
            f"--num_processes={env.num_tasks}", f"--process_id={env.global_rank}"]

  def __call__(self) -> Dict[str, Any]:
    import submitit
    env = submitit.JobEnvironment()
    os.makedirs(self.trial_dir, exist_ok=True)
    suffix = "" if env.global_rank == 0 else f".rank{env.global_rank}"
    stderr_path = os.path.join(self.trial_dir, f"stderr{suffix}.log")
    with open(os.path.join(self.trial_dir, f"stdout{suffix}.log"), "a") as out, open(stderr_path, "a") as err:
      offset = err.tell()
      started = time.time()
      rc = subprocess.run(self.argv + self.distributed_flags(env), stdout=out, stderr=err, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    return dict(returncode=rc, rank=env.global_rank, wall_s=round(time.time() - started, 3),
                error=local_lib.error_tail(stderr_path, offset) if rc else "")


def run_submitit(state: trials_lib.SweepState, config_spec: str, executor, *,
                 trial_command: str = local_lib.DEFAULT_TRIAL_COMMAND, wait: bool = True,
                 log=print) -> Dict[str, int]:
  """Submits the unfinished trials as one array; with `wait`, records each trial's outcome as it ends."""
  todo = [i for i in range(len(state.records)) if not state.is_done(i)]
  log(f"sweep: {len(state.records)} trials, {len(state.records) - len(todo)} done, submitting {len(todo)}.")
  if not todo:
    return {}
  tasks = [TrialTask(local_lib.trial_argv(trial_command, config_spec, state.records[i]["workdir"],
                                          state.records[i]["overrides"]), state.records[i]["workdir"])
           for i in todo]
  with executor.batch():
    jobs = [executor.submit(task) for task in tasks]
  for i, job in zip(todo, jobs):
    state.update(i, status="submitted", job_id=str(job.job_id), error="", started=time.time())
  log(f"sweep: submitted job(s) {', '.join(str(j.job_id) for j in jobs)}; logs in {executor.folder}.")
  counts: Dict[str, int] = {}
  if not wait:
    return counts
  for i, job in zip(todo, jobs):
    try:
      outcome = job.results()[0]
    except Exception as e:  # a dead job must not stop the others
      outcome = dict(returncode=None, error="\n".join(str(e).strip().splitlines()[-local_lib.ERROR_LINES:]))
    if outcome.get("returncode") == 0:
      result = trials_lib.read_results_json(state.records[i]["workdir"]) or {}
      status = result.get("status", "finished")
    else:
      status = "failed"
    state.update(i, status=status, returncode=outcome.get("returncode"), error=outcome.get("error", ""),
                 wall_s=outcome.get("wall_s"), ended=time.time())
    counts[status] = counts.get(status, 0) + 1
    log(f"sweep: {state.records[i]['name']} {status}")
  return counts
