"""`Checkpointer`: Orbax's CheckpointManager with medjax's retention, restore-to-any-mesh and damage handling.

See the package docstring (`medjax.checkpoint`) for the layout of a work directory.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import math
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from medjax import build
from medjax.checkpoint import integrity, state_tree
from medjax.checkpoint.integrity import CheckpointNotFoundError, DamagedCheckpointError, one_line
from medjax.checkpoint.ranking import BestWithMetric, best_of, metric_value, to_json_value
from medjax.typing import PyTree

_STATE = "state"
BEST_MODES = build.BEST_MODES


# The messages Orbax logs (absl WARNING) each time a manager opens a directory read-only; they describe our
# own choice, so medjax drops exactly these around the read-only manager and nothing else.
_READ_ONLY_NOISE = re.compile(r"^(Given directory is read only=|CheckpointManagerOptions\.read_only=True, setting)")


class _DropReadOnlyNoise(pylogging.Filter):
  def filter(self, record: pylogging.LogRecord) -> bool:
    return not (record.levelno == pylogging.WARNING and _READ_ONLY_NOISE.match(str(record.msg)))


@contextlib.contextmanager
def _quiet_read_only() -> Iterator[None]:
  """Drops Orbax's read-only notices (absl logger, `_READ_ONLY_NOISE`) while the block runs."""
  logger, noise = pylogging.getLogger("absl"), _DropReadOnlyNoise()
  logger.addFilter(noise)
  try:
    yield
  finally:
    logger.removeFilter(noise)


# ------------------------------------------------------------------------------------------ checkpointer


class Checkpointer:
  """Saves and restores TrainStates under `directory` (normally `workdir/checkpoints`).

  Args:
    directory: checkpoint root; created unless `read_only`.
    save_interval_steps: `save(step, ...)` writes only when `step` is a multiple of this, on a preemption
      signal, or with `force=True`.
    max_to_keep: the latest `max_to_keep` (>= 1) steps are always kept, so the last good checkpoint
      survives however the best-k ranking goes.
    keep_best: additionally keep the `keep_best` best steps by `metrics[best_metric]` (0 = off).
    best_metric: metric key used for ranking, e.g. "val/dice_mean"; required when keep_best > 0.
    best_mode: "max" (Dice, AUC, accuracy) or "min" (loss, Hausdorff distance); required with best_metric
      (`for_run` takes it from the run's config).
    async_save: write in a background thread; `save` returns once the arrays are copied off device.
    read_only: open an existing directory for restoring only (no saves, no deletions, nothing created).

  Steps saved without `best_metric` in their metrics (or with a NaN/inf value) are never ranked: they are
  kept only while among the latest `max_to_keep`, and `best_step()` ignores them.

  Damaged steps (`integrity.step_damage`: a missing or truncated file) are found when the directory is
  opened and hidden from Orbax: `all_steps`, `latest_step` and `best_step` cover intact steps only, nothing
  deletes a damaged step, and asking for one raises `DamagedCheckpointError` naming it and the intact steps.
  `damaged_steps()` lists them.
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int, max_to_keep: int,
               keep_best: int = 0, best_metric: Optional[str] = None, best_mode: Optional[str] = None,
               async_save: bool = True, read_only: bool = False):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 (the latest checkpoint is always kept), got {max_to_keep}.")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}.")
    if best_metric and best_mode is None:
      raise ValueError(f"best_metric={best_metric!r} needs best_mode, one of {BEST_MODES}.")
    if best_mode is not None and best_mode not in BEST_MODES:
      raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}.")
    if keep_best and not best_metric:
      raise ValueError(f"keep_best={keep_best} needs best_metric (e.g. 'val/dice_mean').")
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
    self.best_metric, self.best_mode, self.keep_best = best_metric, best_mode, keep_best
    # Shared with the name format, which hides these steps from Orbax (see `mark_damaged`).
    self._damaged: Dict[int, str] = integrity.find_damaged(self.directory)

    policies: List[Any] = [ocm.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(BestWithMetric(best_metric, keep_best, best_mode))
    worst = -math.inf if best_mode == "max" else math.inf

    def rank(metrics: Any) -> float:  # steps without the metric rank last
      value = metric_value(metrics, best_metric) if best_metric else None
      return worst if value is None else value

    common = dict(
        # Orbax writes the "metrics" item only when best_fn is set; retention is decided by the policy below.
        best_fn=rank,
        best_mode=best_mode or BEST_MODES[0],  # unused without best_metric: every step ranks equal
        step_name_format=integrity.IntactSteps(self._damaged),
    )
    handler = ocp.PyTreeCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.PyTreeSave, handler)
    registry.add(_STATE, ocp.args.PyTreeRestore, handler)
    if read_only:  # no save or retention options, so Orbax has nothing to switch off (and to warn about)
      with _quiet_read_only():
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                               enable_async_checkpointing=False, **common)
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
      return
    options = ocp.CheckpointManagerOptions(
        # Multiples of the interval, plus a save on a preemption signal. Unlike Orbax's default there is no
        # "first save of a run" policy: a run's first save is at step `save_interval_steps` or a forced one.
        save_decision_policy=ocm.AnySavePolicy([ocm.FixedIntervalPolicy(save_interval_steps),
                                                ocm.PreemptionCheckpointingPolicy()]),
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
        **common,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

  # ---------------------------------------------------------------------------------------- saving

  def should_save(self, step: int) -> bool:
    """True if `save(step, ...)` without force would write (lets a caller skip building the state)."""
    return self._manager.should_save(int(step))

  def save(self, step: int, state: PyTree, metrics: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Saves `state` (any pytree of arrays; normally a TrainState) as step `step` if due.

    Args:
      step: the training step (int); if it is already saved nothing happens (returns False).
      state: the pytree to save; sharded jax.Arrays are written shard by shard.
      metrics: flat dict of scalars ("val/dice_mean": 0.81) stored as JSON next to the state and used for
        best-k ranking; may lack `best_metric` (such a step is never ranked "best").
      force: save even if `step` is not a multiple of `save_interval_steps` (final / preemption save).
    Returns:
      True if a save was started; False if the step was not due or already saved (nothing was touched,
      so a caller may also simply not call `save` for a state it distrusts, e.g. after a NaN).

    A damaged directory of the same step (a run resumed from an older step) is first renamed to
    `<step>.damaged` (`integrity.move_aside`, every file kept) with a `DamagedCheckpointWarning`.
    """
    step = int(step)
    if step in self._manager.all_steps():  # e.g. the final forced save of a step the interval already saved
      return False
    if not force and not self._manager.should_save(step):
      return False
    if step in self._damaged:
      self._move_damaged_aside(step)
    return bool(self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state)}),
                                   metrics=to_json_value(dict(metrics or {})), force=True))

  def _move_damaged_aside(self, step: int) -> None:
    reason = self._damaged[step]
    target = os.path.join(self.directory, f"{step}{integrity.DAMAGED_SUFFIX}")
    if jax.process_index() == 0:  # all hosts share the directory
      target = integrity.move_aside(self.directory, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"medjax_move_damaged_{step}")
    del self._damaged[step]
    warnings.warn(f"Checkpoint step {step} in {self.directory} is damaged ({reason}); moved it to {target} "
                  f"(all files kept) to save step {step} again.", integrity.DamagedCheckpointWarning, stacklevel=3)

  def wait(self) -> None:
    """Blocks until every asynchronous save has been committed to disk (and old steps deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads; call once at the end of a run."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # ---------------------------------------------------------------------------------------- steps

  def all_steps(self) -> List[int]:
    """Intact steps currently kept, ascending (damaged ones: `damaged_steps()`)."""
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest intact step, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def damaged_steps(self) -> Dict[int, str]:
    """{step: why it cannot be restored} for the damaged step directories (left on disk as they are)."""
    return dict(sorted(self._damaged.items()))

  def mark_damaged(self, step: int, reason: str) -> None:
    """Treats `step` as damaged from now on (a restore found what the check on opening could not)."""
    self._damaged[int(step)] = reason
    self._manager.reload()

  def metrics(self, step: int) -> Dict[str, Any]:
    """The metrics saved with `step` ({} if none were given)."""
    self._check_step(step)
    return dict(self._manager.metrics(int(step)) or {})

  def best_step(self) -> Optional[int]:
    """The intact step with the best finite `best_metric` (latest wins ties); None if no step has it.

    Without `best_metric` this is `latest_step()`.
    """
    if not self.best_metric:
      return self.latest_step()
    return best_of({step: self._manager.metrics(step) for step in self.all_steps()}, self.best_metric,
                   self.best_mode)

  def select_step(self, which: Union[int, str, None] = "best") -> Tuple[int, str]:
    """(step, how it was chosen) for `which`: "best" (by `best_metric`; the latest step without one),
    "latest" (also None) or a step number (int or digits).

    Damaged steps count here: when the latest (or best, by the metrics saved with it) step on disk is
    damaged, this raises `DamagedCheckpointError` naming it and listing the intact steps, rather than
    silently using another one. Raises `CheckpointNotFoundError` (a FileNotFoundError) naming the directory
    and the kept steps when there is no such checkpoint, ValueError for any other `which`.
    """
    steps = self.all_steps()
    if not steps:
      self._check_step(None)
    if which is None or which == "latest":
      newest = max([*steps, *self._damaged])
      if newest in self._damaged:
        raise self._damaged_error(newest, "The latest checkpoint, step")
      return newest, "latest"
    if which == "best":
      best = None
      if self.best_metric:  # damaged steps are ranked by the metrics saved with them, when still readable
        scored = {step: self._manager.metrics(step) for step in steps}
        scored.update({step: integrity.read_metrics(self.directory, step) for step in self._damaged})
        best = best_of(scored, self.best_metric, self.best_mode)
      if best is None:
        return self.select_step("latest")[0], "latest (no best)"
      if best in self._damaged:
        raise self._damaged_error(best, f"The best checkpoint by {self.best_metric}, step")
      return best, f"best by {self.best_metric}"
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise ValueError(f"The checkpoint must be 'best', 'latest' or a step number, got {which!r}.") from None
    return self._check_step(step), "requested"

  def _damaged_error(self, step: int, what: str = "Checkpoint step") -> DamagedCheckpointError:
    reason = self._damaged[step]
    intact = self.all_steps()
    choice = f"intact steps: {intact}" if intact else "no step is intact"
    return DamagedCheckpointError(f"{what} {step} in {self.directory} is damaged ({reason}); {choice}.",
                                  step=step, reason=reason)

  def _check_step(self, step: Optional[int]) -> int:
    if step is not None and int(step) in self._damaged:
      raise self._damaged_error(int(step))
    steps = self.all_steps()
    if not steps:
      if not os.path.isdir(self.directory):
        raise CheckpointNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
      if self._damaged:
        listed = "; ".join(f"step {s}: {r}" for s, r in sorted(self._damaged.items()))
        raise DamagedCheckpointError(f"No intact checkpoint in {self.directory}; damaged: {listed}.",
                                     step=max(self._damaged), reason=self._damaged[max(self._damaged)])
      raise CheckpointNotFoundError(f"No checkpoints found in {self.directory}.")
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise CheckpointNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}.")
    return int(step)

  # ---------------------------------------------------------------------------------------- restoring

  def restore(self, abstract_state: PyTree, step: Optional[int] = None, *, partial: bool = False) -> PyTree:
    """Restores step `step` (default: latest intact) into the structure, shapes, dtypes and shardings given.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set, typically
        `jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_fn), state_shardings)`. Leaves are cast to the requested dtype.
      partial: allow keys of the checkpoint that `abstract_state` leaves out or holds as None (older
        checkpoints of a grown state).
    Returns:
      The restored pytree (same container types as `abstract_state`), arrays placed per `.sharding`.
    Raises:
      CheckpointNotFoundError: no checkpoints in the directory, or `step` is not among the kept steps.
      DamagedCheckpointError: `step` is damaged, or reading it failed (it is then marked damaged).
      ValueError: the checkpoint does not fit `abstract_state` (different tree or shapes); names the
        directory, step and offending key paths.
    """
    self.wait()  # an in-flight async save of this step must land first
    step = self._check_step(step)
    self._check_compatible(abstract_state, step, partial=partial)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args, partial_restore=partial)
    return self._restore(step, args, "does not match the requested state")

  def _restore(self, step: int, args: Any, mismatch: str) -> PyTree:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
    except Exception as e:
      failure = integrity.read_failure(e)
      if failure is None:
        raise ValueError(f"Checkpoint {self.directory} step {step} {mismatch}: {one_line(e)}") from e
    # Only a read failure gets here, outside the except block so that its traceback is already released.
    integrity.collect_abandoned_reads()
    self.mark_damaged(step, f"reading it failed: {failure}")
    raise self._damaged_error(step)

  def restore_fields(self, fields: Sequence[str], step: Optional[int] = None,
                     device: Optional[jax.Device] = None) -> Dict[str, PyTree]:
    """Restores only the named top-level fields of the saved state onto one device, without a target.

    Shapes and dtypes come from the checkpoint's metadata, so no model or optimizer is needed; fields that
    are absent or empty in the checkpoint (e.g. "ema_params" when EMA was off) are left out of the result.

    Args:
      fields: top-level names of the saved state, e.g. ("params", "model_state").
      step: default latest intact.
      device: default `jax.local_devices()[0]`.
    Returns:
      {field: nested dicts of jax.Arrays on `device`} (containers as stored: dicts and lists).
    """
    self.wait()
    step = self._check_step(step)
    meta = self.state_metadata(step)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    wanted = {k: meta[k] for k in fields if meta.get(k)}
    if not wanted:
      return {}
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding) if hasattr(m, "shape") else m, wanted)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    return dict(self._restore(step, args, f"cannot give {sorted(wanted)}"))

  def state_metadata(self, step: Optional[int] = None) -> Dict[str, Any]:
    """Orbax metadata tree of the saved state: nested dicts of ArrayMetadata (.shape/.dtype), top level a dict
    of the state's fields. Raises DamagedCheckpointError when the metadata cannot be read."""
    step = self._check_step(step)
    try:
      meta = self._manager.item_metadata(step)[_STATE]
    except Exception as e:
      self.mark_damaged(step, f"its metadata cannot be read: {one_line(e)}")
      raise self._damaged_error(step) from e
    meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping):
      self.mark_damaged(step, "its metadata holds no tree")
      raise self._damaged_error(step)
    return meta

  def _check_compatible(self, abstract_state: PyTree, step: int, partial: bool = False) -> None:
    problem = state_tree.mismatch(self.state_metadata(step), abstract_state, partial=partial)
    if problem:
      raise ValueError(f"Checkpoint {self.directory} step {step} does not match the requested state; {problem}.")
