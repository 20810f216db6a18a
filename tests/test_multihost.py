"""Multi-process training: when medjax.main starts jax.distributed, and 2 processes x 4 CPU devices training
exactly like 1 process x 8 devices (the same global mesh, batches and updates)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax import checkpoint, config_lib, main, metric_writer, train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# The quick 2D U-Net plus what only the end of train.main does collectively: restoring the best checkpoint
# for the test split, and broadcasting the early-stopping decision.
EXPERIMENT = f"""
from medjax import config_lib

def get_config(arg=None):
  config = config_lib.load_config({os.path.join(ROOT, "experiments", "synthetic_unet.py")!r} + ":dims=2,quick=true")
  config.test_split, config.data.num_test = "test", 8
  config.early_stopping = dict(patience=2)
  return config
"""
# Batch 8 over the 8 devices of either layout; a loss logged every step; one evaluation and save at the end.
OVERRIDES = ("total_steps=3", "log_every_steps=1", "eval_every_steps=3", "checkpoint_every_steps=3",
             "input.batch_size=8", "input.eval_batch_size=8", "data.num_val=8", "checkpoint.async_save=false")
SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ, flags, expected", [
    ({}, {}, None),
    ({"SLURM_NTASKS": "4"}, {}, None),  # the batch script of a 4-task job is one process, not an srun step
    ({**SLURM_STEP, "SLURM_NTASKS": "1"}, {}, None),
    ({**SLURM_STEP, "SLURM_NTASKS": "2"}, {},  # the coordinator comes from JAX's SLURM detection
     dict(coordinator_address=None, num_processes=2, process_id=1)),
    ({**SLURM_STEP, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}, {},  # srun -n 2 in a 4-task job
     dict(coordinator_address=None, num_processes=2, process_id=1)),
    ({**SLURM_STEP, "SLURM_NPROCS": "3"}, {}, dict(coordinator_address=None, num_processes=3, process_id=1)),
    ({**SLURM_STEP, "SLURM_NTASKS": "2"}, dict(num_processes=1), None),  # forced single-process
    ({}, dict(coordinator_address="h:1234", num_processes=2, process_id=1, local_device_ids=["0", "1"]),
     dict(coordinator_address="h:1234", num_processes=2, process_id=1, local_device_ids=[0, 1])),
])
def test_distributed_kwargs_decides_when_to_initialize(environ, flags, expected):
  assert main.distributed_kwargs(environ, **flags) == expected


@pytest.mark.parametrize("flags, message", [
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"--process_id=2 is not in \[0, "),
    (dict(num_processes=0), r"--num_processes must be >= 1, got 0"),
    (dict(num_processes=2, local_device_ids=["a"]), r"--local_device_ids must be integers, got a"),
])
def test_distributed_kwargs_rejects_inconsistent_flags(flags, message):
  with pytest.raises(ValueError, match=message):
    main.distributed_kwargs({}, **flags)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _trained(workdir):
  losses = {r["step"]: r["train/loss"] for r in metric_writer.read_metrics(workdir) if "train/loss" in r}
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=1,
                                 read_only=True)
  params = ckpt.restore_fields(("params",))["params"]
  return losses, [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
  config_arg = str(tmp_path / "experiment.py")
  with open(config_arg, "w") as f:
    f.write(EXPERIMENT)
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS", "JAX_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
  multi = str(tmp_path / "two_processes")
  command = [sys.executable, "-m", "medjax.main", f"--config={config_arg}", f"--workdir={multi}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             *(f"--config.{o}" for o in OVERRIDES)]
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  processes = [subprocess.Popen(command + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=logs[i],
                                stderr=subprocess.STDOUT) for i in range(2)]
  try:
    codes = [p.wait(timeout=240) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  output = []
  for log in logs:
    log.seek(0)
    output.append(log.read()[-3000:])
    log.close()
  assert codes == [0, 0], "\n---\n".join(output)
  assert "Finished 3 steps" in output[0] and "Finished" not in output[1]  # process 0 reports, alone

  single = str(tmp_path / "one_process")
  config = config_lib.apply_overrides(config_lib.load_config(config_arg), OVERRIDES)
  train.main(config, single)  # this pytest process has 8 CPU devices (conftest)

  (multi_losses, multi_params), (single_losses, single_params) = _trained(multi), _trained(single)
  assert sorted(multi_losses) == [1, 2, 3]
  np.testing.assert_allclose([multi_losses[s] for s in (1, 2, 3)], [single_losses[s] for s in (1, 2, 3)],
                             atol=1e-5)
  for a, b in zip(multi_params, single_params):
    np.testing.assert_allclose(a, b, atol=1e-5)
  checksum = lambda leaves: sum(float(np.sum(np.abs(leaf), dtype=np.float64)) for leaf in leaves)
  assert checksum(multi_params) == pytest.approx(checksum(single_params), abs=1e-5)
  results = []
  for workdir in (multi, single):
    with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
      results.append(json.load(f))
  assert results[0]["best"]["step"] == 3 and results[0]["test_best"]
  for part in ("final", "test", "test_best"):
    assert results[0][part].keys() == results[1][part].keys()
    np.testing.assert_allclose(list(results[0][part].values()), list(results[1][part].values()), atol=1e-5)
