"""Checkpoints of a run: the TrainState through Orbax, per-step metrics, and the config as JSON.

Layout of a work directory:

  workdir/config.json               the experiment config (`save_config` / `load_config`)
  workdir/env.json                  commit, library versions and devices of the run (`medjax.provenance`)
  workdir/checkpoints/<step>/state  the TrainState pytree (Orbax PyTree, OCDBT)
  workdir/checkpoints/<step>/metrics  the metrics passed to `Checkpointer.save` (JSON)
  workdir/metrics.jsonl, results.json, tensorboard/   written by `medjax.train`

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager`: periodic and forced saves, asynchronous writes,
and retention = the latest `max_to_keep` steps plus the `keep_best` best steps by a validation metric.
Restoring always goes through an abstract target (a pytree of `jax.ShapeDtypeStruct` with `.sharding`),
so a checkpoint written on 8 devices restores onto 1 device, or onto any other mesh, with the requested
shardings. `load(workdir)` is the notebook entry point: config + model (as `build.model` makes it, in the
run's compute dtype) + variables, no optimizer needed. `for_run(workdir)` opens a run's checkpoints with
the retention and ranking its config asks for.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from medjax import atomic, build, config_lib
from medjax.typing import PyTree

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
_STATE = "state"
BEST_MODES = build.BEST_MODES


# ------------------------------------------------------------------------------------------ metrics


def _to_json_value(value: Any) -> Any:
  """Makes a metric leaf JSON-friendly: jax/numpy scalars become Python numbers, dicts recurse."""
  if isinstance(value, Mapping):
    return {str(k): _to_json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json_value(v) for v in value]
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  return value


def metric_value(metrics: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
  """The finite float `metrics[key]` ("val/dice_mean"; nested dicts are also searched along "/"), else None.

  None means "this step has no usable value": the key is absent, the value is not a number, or it is NaN/inf
  (a diverged run must never be kept as a "best" checkpoint).
  """
  if not metrics:
    return None
  value: Any = metrics.get(key) if key in metrics else None
  if value is None:  # nested form {"val": {"dice_mean": ...}}
    node: Any = metrics
    for part in key.split("/"):
      if not isinstance(node, Mapping) or part not in node:
        return None
      node = node[part]
    value = node
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


class _BestWithMetric:
  """Orbax preservation policy: the `n` best steps among those whose metric has a finite value.

  Steps without the metric (or with NaN) are invisible to this policy, so they are never kept as "best";
  they survive only through the LatestN policy it is combined with. The ranking itself is Orbax's `BestN`.
  """

  def __init__(self, key: str, n: int, mode: str):
    self.key = key
    self._best = ocm.BestN(get_metric_fn=lambda m: metric_value(m, key), reverse=(mode == "min"), n=n,
                           keep_checkpoints_without_metrics=False)

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> List[bool]:
    scored = [i for i, info in enumerate(checkpoints) if metric_value(info.metrics, self.key) is not None]
    keep = [False] * len(checkpoints)
    for i, flag in zip(scored, self._best.should_preserve([checkpoints[i] for i in scored], context=context)):
      keep[i] = bool(flag)
    return keep


# ------------------------------------------------------------------------------------------ checkpointer


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_str(path: Sequence[Any]) -> str:
  """A key path as Orbax names it on disk ("opt_state.0.mu.conv.kernel"), whatever the container types."""
  return ".".join(_key_name(p) for p in path)


def _shapes_by_path(tree: PyTree) -> Dict[str, Tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


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
      raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
    self.best_metric, self.best_mode, self.keep_best = best_metric, best_mode, keep_best

    policies: List[Any] = [ocm.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(_BestWithMetric(best_metric, keep_best, best_mode))
    worst = -math.inf if best_mode == "max" else math.inf

    def rank(metrics: Any) -> float:  # steps without the metric rank last
      value = metric_value(metrics, best_metric) if best_metric else None
      return worst if value is None else value

    options = ocp.CheckpointManagerOptions(
        # Multiples of the interval, plus a save on a preemption signal. Unlike Orbax's default there is no
        # "first save of a run" policy: a run's first save is at step `save_interval_steps` or a forced one.
        save_decision_policy=ocm.AnySavePolicy([ocm.FixedIntervalPolicy(save_interval_steps),
                                                ocm.PreemptionCheckpointingPolicy()]),
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        # Orbax writes the "metrics" item only when best_fn is set; retention is decided by the policy above.
        best_fn=rank,
        best_mode=best_mode or BEST_MODES[0],  # unused without best_metric: every step ranks equal
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    handler = ocp.PyTreeCheckpointHandler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.PyTreeSave, handler)
    registry.add(_STATE, ocp.args.PyTreeRestore, handler)
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
    """
    step = int(step)
    if step in self._manager.all_steps():  # e.g. the final forced save of a step the interval already saved
      return False
    if not force and not self._manager.should_save(step):
      return False
    return bool(self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state)}),
                                   metrics=_to_json_value(dict(metrics or {})), force=True))

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
    """Steps currently kept, ascending."""
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest kept step, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def metrics(self, step: int) -> Dict[str, Any]:
    """The metrics saved with `step` ({} if none were given)."""
    self._check_step(step)
    return dict(self._manager.metrics(int(step)) or {})

  def best_step(self) -> Optional[int]:
    """The kept step with the best finite `best_metric` (latest wins ties); None if no step has it.

    Without `best_metric` this is `latest_step()`.
    """
    if not self.best_metric:
      return self.latest_step()
    best: Optional[Tuple[float, int]] = None
    sign = 1.0 if self.best_mode == "max" else -1.0
    for step in self.all_steps():
      value = metric_value(self._manager.metrics(step), self.best_metric)
      if value is not None and (best is None or sign * value >= best[0]):
        best = (sign * value, step)
    return None if best is None else best[1]

  def select_step(self, which: Union[int, str, None] = "best") -> Tuple[int, str]:
    """(step, how it was chosen) for `which`: "best" (by `best_metric`; the latest step without one),
    "latest" (also None) or a step number (int or digits). Raises FileNotFoundError naming the directory and
    the kept steps when there is no such checkpoint, ValueError for any other `which`."""
    steps = self.all_steps()
    if not steps:
      self._check_step(None)
    if which is None or which == "latest":
      return steps[-1], "latest"
    if which == "best":
      best = self.best_step() if self.best_metric else None
      return (best, f"best by {self.best_metric}") if best is not None else (steps[-1], "latest (no best)")
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise ValueError(f"The checkpoint must be 'best', 'latest' or a step number, got {which!r}.") from None
    return self._check_step(step), "requested"

  def _check_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if not steps:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
      raise FileNotFoundError(f"No checkpoints found in {self.directory}.")
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
    return int(step)

  # ---------------------------------------------------------------------------------------- restoring

  def restore(self, abstract_state: PyTree, step: Optional[int] = None, *, partial: bool = False) -> PyTree:
    """Restores step `step` (default: latest) into the structure, shapes, dtypes and shardings given.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set, typically
        `jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_fn), state_shardings)`. Leaves are cast to the requested dtype.
      partial: allow keys of the checkpoint that `abstract_state` leaves out or holds as None (older
        checkpoints of a grown state).
    Returns:
      The restored pytree (same container types as `abstract_state`), arrays placed per `.sharding`.
    Raises:
      FileNotFoundError: no checkpoints in the directory, or `step` is not among the kept steps.
      ValueError: the checkpoint does not fit `abstract_state` (different tree or shapes); names the
        directory, step and offending key paths.
    """
    self.wait()  # an in-flight async save of this step must land first
    step = self._check_step(step)
    self._check_compatible(abstract_state, step)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args, partial_restore=partial)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"Checkpoint {self.directory} step {step} does not match the requested state: {e}") from e
    return restored[_STATE]

  def restore_fields(self, fields: Sequence[str], step: Optional[int] = None,
                     device: Optional[jax.Device] = None) -> Dict[str, PyTree]:
    """Restores only the named top-level fields of the saved state onto one device, without a target.

    Shapes and dtypes come from the checkpoint's metadata, so no model or optimizer is needed; fields that
    are absent or empty in the checkpoint (e.g. "ema_params" when EMA was off) are left out of the result.

    Args:
      fields: top-level names of the saved state, e.g. ("params", "model_state").
      step: default latest.
      device: default `jax.local_devices()[0]`.
    Returns:
      {field: nested dicts of jax.Arrays on `device`} (containers as stored: dicts and lists).
    """
    self.wait()
    step = self._check_step(step)
    meta = self.state_metadata(step)
    meta = getattr(meta, "tree", meta)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    wanted = {k: meta[k] for k in fields if meta.get(k)}
    if not wanted:
      return {}
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding) if hasattr(m, "shape") else m, wanted)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE])
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"Cannot read {sorted(wanted)} from checkpoint {self.directory} step {step}: {e}") from e

  def state_metadata(self, step: Optional[int] = None) -> PyTree:
    """Orbax metadata tree of the saved state (nested dicts of ArrayMetadata with .shape/.dtype)."""
    step = self._check_step(step)
    return self._manager.item_metadata(step)[_STATE]

  def _check_compatible(self, abstract_state: PyTree, step: int) -> None:
    """Names the key paths whose shapes differ (Orbax's own error does not say which leaf)."""
    try:
      saved = _shapes_by_path(self.state_metadata(step))
    except Exception:  # unreadable metadata: let the restore itself report
      return
    wanted = _shapes_by_path(abstract_state)
    bad = [f"{k}: checkpoint {saved[k]} vs requested {v}" for k, v in wanted.items()
           if k in saved and tuple(saved[k]) != v]
    if bad:
      more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
      raise ValueError(f"Checkpoint {self.directory} step {step} does not match the requested state; "
                       f"shape mismatch at {'; '.join(bad[:5])}{more}.")


# ------------------------------------------------------------------------------------------ config


def save_config(workdir: str | os.PathLike, config: Any) -> str:
  """Writes `config` (a ConfigDict) to `workdir/config.json` atomically; returns the path.

  Only process 0 writes (all hosts share the workdir); a crash mid-write leaves the old file intact.
  """
  text = config_lib.to_json(config)
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if jax.process_index() != 0:
    return path
  os.makedirs(os.fspath(workdir), exist_ok=True)
  atomic.write_text_atomically(path, text)
  return path


def load_config(workdir: str | os.PathLike) -> Any:
  """Reads `workdir/config.json` back into a ConfigDict (lists become tuples)."""
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in {os.path.abspath(os.fspath(workdir))}; is it a medjax workdir?")
  with open(path) as f:
    return config_lib.from_json(f.read())


# ------------------------------------------------------------------------------------------ runs


def for_run(workdir: str | os.PathLike, config: Any = None, *, read_only: bool = False) -> Checkpointer:
  """The Checkpointer of a run: `workdir/checkpoints` with the retention and best-checkpoint ranking of the
  run's config (`build.settings`; read from `workdir/config.json` when `config` is None). `read_only` opens
  an existing run for restoring (no saves, synchronous, nothing created)."""
  config = load_config(workdir) if config is None else config
  run = build.settings(config)
  directory = os.path.join(os.fspath(workdir), CHECKPOINT_DIR)
  if read_only:
    return Checkpointer(directory, save_interval_steps=1, max_to_keep=1, best_metric=run.best_metric,
                        best_mode=run.best_mode, async_save=False, read_only=True)
  return Checkpointer(directory, save_interval_steps=1, max_to_keep=run.checkpoint.max_to_keep,
                      keep_best=run.checkpoint.keep_best if run.best_metric else 0, best_metric=run.best_metric,
                      best_mode=run.best_mode, async_save=run.checkpoint.async_save)


class Loaded(NamedTuple):
  """What `load` returns: `model.apply(variables, x, train=False)` works directly."""
  config: Any
  model: Any
  variables: Dict[str, PyTree]
  step: int
  selected: str = "requested"
  metrics: Optional[Dict[str, Any]] = None  # saved with the step (`Checkpointer.save(metrics=...)`)


def load(workdir: str | os.PathLike, step: Union[int, str, None] = None, *,
         use_ema: Optional[bool] = None) -> Loaded:
  """Loads a run for inference: its config, the model it names, and its weights on the default device.

  The model is `build.model(config)`, the one training used, so it computes in the run's
  `config.compute_dtype`. Only the params, the model's mutable collections and their EMAs are read from disk;
  the optimizer state is skipped, so no optimizer or training code is needed.

  Args:
    workdir: the run's work directory (holds config.json and checkpoints/).
    step: a step number, "best" (by the run's best_metric), or "latest" (also None).
    use_ema: use the EMA params (and the EMA of the batch statistics, when kept) when the run kept them;
      None: as the run's own validation did (`config.ema_decay` > 0 and `config.eval_with_ema`).
  Returns:
    Loaded(config, model, variables={"params": ..., **model_state}, step, selected: how the step was chosen,
    metrics: those saved with the step).
  """
  config = load_config(workdir)
  model = build.model(config)
  if use_ema is None:
    use_ema = build.settings(config).use_ema_for_eval
  ckpt = for_run(workdir, config, read_only=True)
  try:
    step, selected = ckpt.select_step(step)
    part = ckpt.restore_fields(("params", "model_state", "ema_params", "ema_model_state"), step=step)
    metrics = ckpt.metrics(step)
  finally:
    ckpt.close()
  if "params" not in part:
    raise ValueError(f"Checkpoint {ckpt.directory} step {step} has no 'params' in its state.")
  params, model_state = part["params"], part.get("model_state")
  if use_ema and part.get("ema_params"):
    params, model_state = part["ema_params"], part.get("ema_model_state") or model_state
  return Loaded(config=config, model=model, variables={"params": params, **dict(model_state or {})}, step=step,
                selected=selected, metrics=metrics)
