"""Damaged checkpoints: found on opening, named in one-line errors, never restored, deleted or silently used."""

import glob
import hashlib
import logging
import os
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from absl import logging as absl_logging

from medjax import checkpoint
from medjax.checkpoint import integrity, manager
from medjax.train_state import TrainState

SCORES = {1: 0.1, 2: 0.9, 3: 0.5}  # the best step (2) is neither the first nor the latest


def _state(seed):
  # A 64 x 64 kernel of noise compresses to ~16 kB, more than OCDBT inlines into its b-tree (1 kB): it lands in
  # a data file of its own, as real weights do.
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  variables = {"params": {"kernel": jax.random.normal(k1, (64, 64)), "bias": jnp.arange(3.0)}}
  return TrainState.create(variables=variables, tx=optax.adam(1e-3), rng=k2, use_ema=False)


def _target(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def _open(directory, **kw):
  kw = {"save_interval_steps": 1, "max_to_keep": 3, "best_metric": "val/score", "best_mode": "max",
        "async_save": False, **kw}
  return checkpoint.Checkpointer(directory, **kw)


@pytest.fixture
def ckdir(tmp_path):
  """Steps 1, 2, 3 of `_state(step)` with val/score = SCORES[step]."""
  directory = str(tmp_path / "checkpoints")
  with _open(directory) as c:
    for step, score in SCORES.items():
      c.save(step, _state(step), metrics={"val/score": score})
  return directory


def _snapshot(path):
  """{relative file: sha256} of everything under `path`."""
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        files[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return files


def _data_file(step_dir):
  """The array data file of the state (the largest file OCDBT wrote), relative to the step directory."""
  path = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)
  return os.path.relpath(path, step_dir)


def _truncate_data(step_dir):
  name = _data_file(step_dir)
  with open(os.path.join(step_dir, name), "r+b") as f:
    f.truncate(10)
  return re.escape(f"{name} is truncated (10 bytes, data up to byte ") + r"\d+" + re.escape(" expected)")


def _delete_data(step_dir):
  name = _data_file(step_dir)
  os.remove(os.path.join(step_dir, name))
  return re.escape(f"{name} is missing")


def _delete(relative):
  def damage(step_dir):
    target = os.path.join(step_dir, relative)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    return re.escape(f"{relative} is missing" if relative != "state" else "its state directory is missing")
  return damage


def _truncate(relative):
  def damage(step_dir):
    with open(os.path.join(step_dir, relative), "r+b") as f:
      f.truncate(5)
    return re.escape(f"{relative} is truncated or not valid JSON")
  return damage


DAMAGES = {
    "truncated array file": _truncate_data,
    "deleted array file": _delete_data,
    "deleted _METADATA": _delete("state/_METADATA"),
    "truncated _METADATA": _truncate("state/_METADATA"),
    "deleted OCDBT manifest": _delete("state/manifest.ocdbt"),
    "deleted state": _delete("state"),
    "truncated metrics": _truncate("metrics/metrics"),
    "truncated sharding file": _truncate("state/_sharding"),
}


def test_intact_steps_have_no_damage(ckdir):
  assert [integrity.step_damage(os.path.join(ckdir, str(s))) for s in SCORES] == [None, None, None]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_latest_step_is_named_and_left_on_disk(ckdir, kind):
  reason = DAMAGES[kind](os.path.join(ckdir, "3"))
  assert re.fullmatch(reason, integrity.step_damage(os.path.join(ckdir, "3")))
  before = _snapshot(ckdir)
  with _open(ckdir, read_only=True) as c:
    assert c.all_steps() == [1, 2] and c.latest_step() == 2 and list(c.damaged_steps()) == [3]
    assert re.fullmatch(reason, c.damaged_steps()[3])
    where = re.escape(f"step 3 in {ckdir} is damaged (") + reason + re.escape("); intact steps: [1, 2].")
    for call, message in [(lambda: c.select_step(3), "Checkpoint " + where),
                          (lambda: c.select_step("3"), "Checkpoint " + where),
                          (lambda: c.select_step("latest"), "The latest checkpoint, " + where),
                          (lambda: c.restore(_target(_state(0)), step=3), "Checkpoint " + where),
                          (lambda: c.metrics(3), "Checkpoint " + where)]:
      with pytest.raises(checkpoint.DamagedCheckpointError, match=f"^{message}$") as error:
        call()
      assert error.value.step == 3 and re.fullmatch(reason, error.value.reason)
    assert c.select_step("best") == (2, "best by val/score")
    chex.assert_trees_all_equal(c.restore(_target(_state(0)), step=2), _state(2))
  assert _snapshot(ckdir) == before  # opening, choosing and restoring touched nothing


def test_best_and_latest_are_never_silently_replaced(ckdir):
  DAMAGES["deleted _METADATA"](os.path.join(ckdir, "2"))  # the best step by val/score
  with _open(ckdir, read_only=True) as c:
    with pytest.raises(checkpoint.DamagedCheckpointError, match=re.escape(
        f"The best checkpoint by val/score, step 2 in {ckdir} is damaged (state/_METADATA is missing); "
        f"intact steps: [1, 3].")):
      c.select_step("best")
    assert c.select_step("latest") == (3, "latest") and c.best_step() == 3  # among the intact steps


def test_no_intact_step(ckdir):
  for step in SCORES:
    DAMAGES["deleted _METADATA"](os.path.join(ckdir, str(step)))
  with _open(ckdir, read_only=True) as c:
    assert c.all_steps() == [] and c.latest_step() is None
    with pytest.raises(checkpoint.DamagedCheckpointError, match=re.escape(
        f"No intact checkpoint in {ckdir}; damaged: step 1: state/_METADATA is missing; step 2: state/_METADATA "
        f"is missing; step 3: state/_METADATA is missing.")):
      c.select_step("latest")


def test_damaged_step_is_never_garbage_collected(ckdir):
  DAMAGES["truncated array file"](os.path.join(ckdir, "1"))
  kept = {k: v for k, v in _snapshot(ckdir).items() if k.startswith("1/")}
  with _open(ckdir, max_to_keep=1, keep_best=1) as c:
    c.save(4, _state(4), metrics={"val/score": 0.0})
    c.save(5, _state(5), metrics={"val/score": 0.0})
    c.wait()
    assert c.all_steps() == [2, 5] and list(c.damaged_steps()) == [1]  # 2: the best; 5: the latest
  assert {k: v for k, v in _snapshot(ckdir).items() if k.startswith("1/")} == kept


def test_saving_a_damaged_step_again_moves_it_aside_whole(ckdir):
  for attempt, moved in enumerate(["3.damaged", "3.damaged.1"]):
    DAMAGES["deleted array file"](os.path.join(ckdir, "3"))
    damaged = _snapshot(os.path.join(ckdir, "3"))
    with _open(ckdir) as c:
      reason = c.damaged_steps()[3]
      with pytest.warns(checkpoint.DamagedCheckpointWarning, match="^" + re.escape(
          f"Checkpoint step 3 in {ckdir} is damaged ({reason}); moved it to {ckdir}/{moved} (all files kept) to "
          f"save step 3 again.") + "$"):
        assert c.save(3, _state(30 + attempt), force=True)
      c.wait()
      assert c.all_steps() == [1, 2, 3] and c.damaged_steps() == {}
      chex.assert_trees_all_equal(c.restore(_target(_state(0)), step=3), _state(30 + attempt))
    assert _snapshot(os.path.join(ckdir, moved)) == damaged
  assert sorted(os.listdir(ckdir)) == ["1", "2", "3", "3.damaged", "3.damaged.1"]
  with _open(ckdir, read_only=True) as c:  # Orbax takes neither moved folder for a step
    assert c.all_steps() == [1, 2, 3] and c.damaged_steps() == {}


def test_damage_found_only_when_reading_marks_the_step(ckdir):
  """Same size, wrong bytes: the check on opening cannot see it; the restore reports it in one line."""
  name = _data_file(os.path.join(ckdir, "3"))
  with open(os.path.join(ckdir, "3", name), "r+b") as f:
    f.write(b"\0" * 16)  # zstd frame header gone
  with _open(ckdir, read_only=True) as c:
    assert c.all_steps() == [1, 2, 3]
    with pytest.raises(checkpoint.DamagedCheckpointError, match="^" + re.escape(
        f"Checkpoint step 3 in {ckdir} is damaged (reading it failed: FAILED_PRECONDITION: Error reading ")
        + r"[^\n]*; intact steps: \[1, 2\]\.$"):
      c.restore(_target(_state(0)), step=3)
    assert c.all_steps() == [1, 2] and list(c.damaged_steps()) == [3]
    assert c.select_step("best") == (2, "best by val/score")


def test_missing_directories_name_the_path(tmp_path):
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=re.escape(
      f"Checkpoint directory {tmp_path}/nope does not exist.")):
    _open(str(tmp_path / "nope"), read_only=True)
  with pytest.raises(FileNotFoundError, match=re.escape(f"Workdir {tmp_path}/nowhere does not exist")):
    checkpoint.load(str(tmp_path / "nowhere"))
  assert issubclass(checkpoint.CheckpointNotFoundError, checkpoint.CheckpointError)
  assert issubclass(checkpoint.CheckpointError, ValueError)


def test_read_only_open_drops_only_orbax_read_only_notices(ckdir, caplog):
  with caplog.at_level(logging.WARNING, logger="absl"):
    with _open(ckdir, read_only=True) as c:
      c.restore_fields(("params",), step=2)
    with manager._quiet_read_only():
      absl_logging.warning("Given directory is read only=%s", ckdir)
      absl_logging.warning("Some other warning about %s", ckdir)
    absl_logging.warning("Given directory is read only=%s", "outside the read-only block")
  assert [r.getMessage() for r in caplog.records] == [
      f"Some other warning about {ckdir}", "Given directory is read only=outside the read-only block"]
