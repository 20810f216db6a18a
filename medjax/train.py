"""The training loop: `main(config, workdir)`, its phases top to bottom.

1. validate the config (every name resolved, before anything loads or compiles);
2. mesh, dataset, model, objective, optimizer, evaluator;
3. state: restored from the workdir's latest checkpoint (exact resume) or initialised directly into its
   shardings; the early-stopping record is rebuilt from the evaluations already logged;
4. compile the train and eval steps once, with explicit shardings and the state donated;
5. loop: step, log, evaluate, checkpoint, stop early (patience, or the caller's `on_eval`), stop on a
   non-finite loss keeping the last good checkpoint;
6. test: the last state and the best checkpoint on `config.test_split`; `results.json` and a summary line.

Multi-process runs execute the same code on every process: each feeds its slice of the batch, Orbax saves
and evaluations are collective, stop decisions are taken on process 0 and broadcast, and files other than
checkpoints are written by process 0 only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from medjax import atomic, build, checkpoint, config_lib, evaluators, provenance, sharding, steps
from medjax.compress import pruning
from medjax.data import pipeline
from medjax.data.datasets.base import check_labels
from medjax.metric_writer import MetricWriter, Progress, read_metrics
from medjax.train_state import TrainState

RESULTS_FILE = "results.json"
# results.json "status": the run reached total_steps / its early-stopping patience ran out / on_eval said stop.
FINISHED, EARLY_STOPPED, STOPPED = "finished", "early_stopped", "stopped"
_STATUS_CODES = (None, EARLY_STOPPED, STOPPED)  # broadcast between processes as an index

OnEval = Callable[[int, Dict[str, float]], bool]


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient; names the step and the kept checkpoint."""


def _due(step: int, every: Optional[int], total: int) -> bool:
  return step == total or (bool(every) and step % every == 0)


# ------------------------------------------------------------------------------------------ early stopping


class EarlyStopping:
  """Stops a run whose validation `metric` has not improved for `patience` evaluations in a row.

  An evaluation improves when its value beats the best so far by more than `min_delta` (`value > best +
  min_delta` in mode "max", `value < best - min_delta` in mode "min"); the first finite value always does.
  A missing, NaN or infinite value counts as no improvement. The state is two numbers (best value, bad
  evaluations since it), rebuilt on resume by replaying the logged evaluations, so a preempted run stops at
  the same step as an uninterrupted one.

  Args:
    metric: validation key, e.g. "val/auc".
    mode: "max" or "min".
    patience: evaluations without improvement (>= 1) after which `should_stop` becomes True.
    min_delta: smallest change (>= 0, in the metric's units) that counts as an improvement.
  """

  def __init__(self, metric: str, mode: str = "max", patience: int = 5, min_delta: float = 0.0):
    self.metric, self.mode, self.patience, self.min_delta = metric, mode, int(patience), float(min_delta)
    self.best: Optional[float] = None
    self.best_step: Optional[int] = None
    self.bad_evaluations = 0

  @property
  def should_stop(self) -> bool:
    return self.bad_evaluations >= self.patience

  def _improves(self, value: Optional[float]) -> bool:
    if value is None:
      return False
    if self.best is None:
      return True
    return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

  def update(self, step: int, metrics: Mapping[str, Any]) -> bool:
    """Records the evaluation at `step`; returns `should_stop`. Raises if `metrics` lacks the metric."""
    if self.metric not in metrics:
      raise config_lib.ConfigError(
          f"config.early_stopping.metric={self.metric!r} is not among the validation metrics "
          f"{sorted(metrics)}.")
    value = checkpoint.metric_value(metrics, self.metric)
    if self._improves(value):
      self.best, self.best_step, self.bad_evaluations = value, int(step), 0
    else:
      self.bad_evaluations += 1
    return self.should_stop

  def replay(self, history: Iterable[Mapping[str, Any]]) -> None:
    """Re-applies logged evaluations (dicts with "step" and the metric), in step order."""
    for record in history:
      self.update(int(record["step"]), record)

  def describe(self) -> str:
    return (f"{self.metric} did not improve on {self.best:.4g} (step {self.best_step}) by more than "
            f"{self.min_delta:g} for {self.patience} evaluations" if self.best is not None else
            f"{self.metric} had no finite value for {self.patience} evaluations")


def make_early_stopping(config: mlc.ConfigDict) -> Optional[EarlyStopping]:
  """`EarlyStopping(**config.early_stopping)`, None when unset; the metric and mode default to
  `config.best_metric` / `config.best_mode` (`build.early_stopping_options`)."""
  options = build.early_stopping_options(config)
  return None if options is None else EarlyStopping(**options)


def evaluation_history(workdir: str, ckpt: checkpoint.Checkpointer, metric: str,
                       up_to_step: int) -> list:
  """Logged evaluations carrying `metric` at steps <= `up_to_step`, one per step (the latest record), sorted.

  metrics.jsonl holds every evaluation (the checkpoints keep only some); records after the restored step
  (logged before a preemption hit the save) are dropped, because the resumed run evaluates those steps again.
  """
  by_step: Dict[int, Mapping[str, Any]] = {}
  for step in ckpt.all_steps():
    metrics = ckpt.metrics(step)
    if step <= up_to_step and metric in metrics:
      by_step[step] = {"step": step, **metrics}
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    for record in read_metrics(workdir):
      if record["step"] <= up_to_step and metric in record:
        by_step[int(record["step"])] = record
  return [by_step[step] for step in sorted(by_step)]


def wall_time_before(workdir: str, start_step: int) -> float:
  """Seconds the run had spent up to its checkpoint `start_step` in earlier sessions (0.0 for a new run).

  Every checkpoint logs the run's cumulative wall time ("wall_s" in metrics.jsonl), so `results.json`'s
  wall_s of a resumed run counts all its sessions; the time between the last checkpoint and an interruption,
  which the resumed run trains again, is not counted.
  """
  if not start_step or not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return 0.0
  logged = [r for r in read_metrics(workdir) if r.get("wall_s") is not None and r["step"] <= start_step]
  return float(max(logged, key=lambda r: r["step"])["wall_s"]) if logged else 0.0


def _from_main_process(code: int) -> int:
  """Process 0's `code` on every process: a stop decision that differed between processes would hang the
  next collective."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def stop_after_evaluation(step: int, metrics: Dict[str, float], early: Optional[EarlyStopping],
                          on_eval: Optional[OnEval], is_main: bool) -> Optional[str]:
  """EARLY_STOPPED, STOPPED or None after the evaluation at `step` (the same on every process).

  `on_eval` runs on process 0 only and is called after every evaluation, also when patience has run out.
  """
  status = EARLY_STOPPED if early is not None and early.update(step, metrics) else None
  if on_eval is not None and is_main and on_eval(step, dict(metrics)) and status is None:
    status = STOPPED
  return _STATUS_CODES[_from_main_process(_STATUS_CODES.index(status))]


# ------------------------------------------------------------------------------------------ results


def _jsonable(value: Any) -> Any:
  """Dicts and lists recurse; numbers become Python floats, NaN/inf become None (JSON has neither)."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (bool, str, int)) or value is None:
    return value
  value = float(value)
  return value if math.isfinite(value) else None


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
  """Writes `results` to workdir/results.json atomically (process 0 only); returns the path."""
  path = os.path.join(workdir, RESULTS_FILE)
  if jax.process_index() == 0:
    atomic.write_text_atomically(path, json.dumps(_jsonable(results), indent=2, sort_keys=True) + "\n")
  return path


# The metrics the one-line summary shows (metrics.jsonl and results.json keep them all).
_HEADLINE = ("dice_mean", "dice_case_mean", "accuracy", "auc", "mae", "rmse", "pearson_r", "pretext_loss")


def _format(metrics: Mapping[str, float]) -> str:
  def headline(key: str) -> bool:
    name = key.split("/", 1)[-1].removeprefix(build.PSEUDO_PREFIX)
    return name in _HEADLINE or name.startswith("dice/")
  return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if headline(k))


def _summary_line(status: str, step: int, total_steps: int, final: Mapping[str, float], best: Optional[dict],
                  test: Mapping[str, float], test_best: Mapping[str, float], early: Optional[EarlyStopping],
                  where: str) -> str:
  head = {FINISHED: f"Finished {step} steps.",
          EARLY_STOPPED: f"Stopped early at step {step} of {total_steps}: {early.describe() if early else ''}.",
          STOPPED: f"Stopped at step {step} of {total_steps} by on_eval."}[status]
  parts = [head, f"Final {_format(final)}."]
  if best is not None:
    parts.append(f"Best {best['metric']}={best['value']:.4f} at step {best['step']}.")
  if test:
    parts.append(f"Test (last) {_format(test)}.")
  if test_best:
    parts.append(f"Test (best) {_format(test_best)}.")
  parts.append(where)
  return " ".join(parts)


# ------------------------------------------------------------------------------------------ main


def main(config: mlc.ConfigDict, workdir: str, *, on_eval: Optional[OnEval] = None,
         allow_config_change: bool = False) -> Dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint if there is one.

  Args:
    config: the experiment config (validated here before anything loads).
    workdir: run directory (config.json, checkpoints/, metrics.jsonl, results.json, tensorboard/).
    on_eval: `on_eval(step, metrics) -> bool`, called on process 0 after every evaluation with the
      "val/..." metrics; True stops the run after that step's checkpoint (e.g. an Optuna pruner).
    allow_config_change: resume an existing run whose config.json differs from `config` (`--allow_config_change`);
      the change is appended to config_history.jsonl. The model (model_name, model.*) can never change.
  Returns:
    The last validation metrics ("val/..."), the test metrics of the last state ("test/...") and of the
    best checkpoint ("test_best/...") when `config.test_split` is set, plus "step" (the last step trained).
  Raises:
    ConfigError: the config differs from the run's config.json (`checkpoint.check_config`; before anything
      is read or written), or an allowed change does not fit the saved training state.
    DamagedCheckpointError: the workdir has checkpoints but none is intact.
  """
  started = time.perf_counter()
  # ---- 1. config: valid, and the one this workdir's run was started with (or an allowed change)
  build.validate(config)
  config_change = checkpoint.check_config(workdir, config, allow_change=allow_config_change)
  run = build.settings(config)
  total_steps = int(config.total_steps)
  batch_size = run.batch_size
  is_main = jax.process_index() == 0

  # ---- 2. components
  mesh = build.mesh(config)
  sharding.check_batch_size(batch_size, mesh)
  dataset = build.dataset(config)
  build.check_model_inputs(config, dataset.info)
  # Patches cut from whole cases when config.input.patch_size is set (see pipeline.prepare_source).
  prepare = functools.partial(pipeline.prepare_source, input_config=config.input, seed=config.seed,
                              num_classes=dataset.info.num_classes)
  train_source = prepare(build.split_source(dataset, run.train_split, "config.train_split"), for_training=True)
  val_source = build.split_source(dataset, run.eval_split, "config.eval_split")
  test_source = build.split_source(dataset, run.test_split, "config.test_split") if run.test_split else None
  for split, source in ((run.eval_split, val_source), (run.test_split, test_source)):
    if source is not None:
      check_labels(source, dataset.info, split)  # before the first step, not at the first evaluation
  validation = build.validation_mode(config, dataset.info)
  whole_cases = validation is not None  # whole cases are predicted with a sliding window, one per batch
  if validation == "patches":
    val_source = prepare(val_source)
  elif not whole_cases:
    val_source, test_source = prepare(val_source), test_source and prepare(test_source)
  model = build.model(config)
  objective = build.objective(config)
  tx, schedule_fn = build.optimizer(config)
  evaluator = build.evaluator(config, dataset.info)
  early = make_early_stopping(config)
  selectable_from = build.first_selectable_step(config)

  # ---- 3. state: restore or initialise straight into its shardings
  init_fn = build.init_state_fn(model, tx, train_source[0]["image"], use_ema=run.ema_decay > 0)
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract_state, mesh, run.sharding)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, state_sharding)
  dp = build.differential_privacy(config, model, objective, abstract_state, train_source, mesh)
  if dp is not None:
    logging.info("DP-SGD: %s per-example norms, noise multiplier %.4f, C = %g, q = %.5f, delta = %.3g, batches "
                 "padded in buckets of %d up to %d (%.1f slots a step on average); epsilon after %d steps: %.3f "
                 "(%s).", dp.norms, dp.plan.noise_multiplier, dp.plan.clip_norm, dp.plan.sample_rate,
                 dp.plan.delta, dp.plan.batch_bucket, dp.plan.physical_batch_size, dp.plan.expected_slots(),
                 total_steps, dp.plan.epsilon(total_steps), dp.plan.accountant)
  ckpt = checkpoint.for_run(workdir, config)
  start_step, state = restore_latest(ckpt, target, config_change)
  pretrained = None
  wall_before = wall_time_before(workdir, start_step)
  if start_step:
    logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    if early is not None:
      early.replay(evaluation_history(workdir, ckpt, early.metric, start_step))
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    variables = None
    pretrained = checkpoint.initial_variables(config, state.variables())
    if pretrained is not None:  # config.init_from: the fresh state with the pretrained weights merged in
      variables, init_report = pretrained
      logging.info("%s", init_report.summary())
    if config.get("distillation"):  # the teacher's weights into the state, once
      variables, teacher_from = checkpoint.with_teacher(config, state.variables() if variables is None else variables)
      logging.info("Distillation teacher: %s.", teacher_from)
    if variables is not None:
      state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed), variables)
  if is_main:
    checkpoint.record_config(workdir, config, step=start_step, allow_change=allow_config_change)
    provenance.write(workdir)
    if not start_step and pretrained is not None:
      init_report.write(os.path.join(workdir, checkpoint.INIT_REPORT_FILE))

  # ---- 4. compiled steps
  train_step = build.jit_train_step(model, objective, tx, mesh, state_sharding, accum_steps=run.grad_accum_steps,
                                    ema_decay=run.ema_decay, augment_fn=build.augment_fn(config),
                                    freeze_batch_stats=run.freeze_batch_stats,
                                    gradient_fn=dp and dp.gradient_fn)
  eval_step = jax.jit(functools.partial(steps.eval_step, apply_fn=build.eval_apply_fn(model, config),
                                        stats_fn=evaluator.stats_fn))
  cases = build.case_evaluation(model, config, evaluator.stats_fn, mesh) if whole_cases else None
  eval_batch_size = build.eval_batch_size(config, mesh)

  def run_evaluation(state, source, prefix: str) -> Dict[str, float]:
    """Metrics of `state` on `source`: whole cases one at a time for `whole_cases` runs (validation on
    patches excepted; one program per canvas shape), else batches of examples."""
    variables = state.variables(use_ema=run.use_ema_for_eval)
    if whole_cases and not (source is val_source and validation == "patches"):
      step_fn = cases.step
      batches = pipeline.device_batches(pipeline.case_batches(source, cases.place), mesh, replicate=True)
    else:
      step_fn = eval_step
      batches = pipeline.device_batches(pipeline.eval_batches(source, global_batch_size=eval_batch_size), mesh)
    result = evaluators.evaluate(evaluator, lambda b: step_fn(variables, b), batches)
    if source is val_source and validation == "patches":
      prefix += "/" + build.PSEUDO_PREFIX
    else:
      prefix += "/"
    return {f"{prefix}{k}": v for k, v in result.items()}

  # ---- 5. loop
  writer = MetricWriter(workdir, enabled=is_main)
  progress = Progress(total_steps, start_step, enabled=is_main)
  train_batches = pipeline.train_stream(train_source, config.input, seed=config.seed, start_step=start_step,
                                       mesh=mesh, poisson=dp and dp.plan.poisson())
  log_every, eval_every, ckpt_every = run.log_every_steps, run.eval_every_steps, run.checkpoint_every_steps
  pending, last_eval, test, test_best, best, extra_tests = [], {}, {}, {}, None, {}
  # A run that had already stopped early stays stopped when started again.
  stopped = _STATUS_CODES[_from_main_process(int(early is not None and early.should_stop))]
  last_step = start_step
  interval_start, interval_first_step = time.perf_counter(), start_step
  # One executable per batch shape: a single one, except under DP-SGD's bucketed Poisson batches.
  executables: Dict[Any, Any] = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      if stopped:
        break
      batch = next(train_batches)
      shapes = tuple((jax.tree_util.keystr(path), leaf.shape)
                     for path, leaf in jax.tree_util.tree_leaves_with_path(batch))
      compiled = executables.get(shapes)
      if compiled is None:
        t0 = time.perf_counter()
        compiled = executables[shapes] = train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        writer.write(step, {"compile_s": compile_s})
        if len(executables) == 1:  # steps per second count from the first executable on
          interval_start = time.perf_counter()
        else:  # a later bucket's compile is not step time
          interval_start += compile_s
      state, step_metrics = compiled(state, batch)
      last_step = step
      pending.append((step, step_metrics))
      progress.update(step)
      do_eval, do_ckpt = _due(step, eval_every, total_steps), _due(step, ckpt_every, total_steps)
      if _due(step, log_every, total_steps) or do_eval or do_ckpt:
        _check_finite(pending, ckpt)
        now = time.perf_counter()
        host = jax.device_get([m for _, m in pending])
        rate = (step - interval_first_step) / max(now - interval_start, 1e-9)
        scalars = {"train/loss": float(np.mean([m["loss"] for m in host])),
                   "train/grad_norm": float(np.mean([m["grad_norm"] for m in host])),
                   "train/lr": float(schedule_fn(step - 1)),
                   "train/steps_per_s": rate, "train/examples_per_s": rate * batch_size}
        if dp is not None:  # epsilon spent so far, and the epoch it is reported at (N / B steps each)
          scalars.update({"privacy/epsilon": dp.plan.epsilon(step), "privacy/epoch": step / dp.plan.steps_per_epoch})
        writer.write(step, scalars)
        progress.log(step, scalars)
        pending, interval_start, interval_first_step = [], now, step
      if do_eval:
        t0 = time.perf_counter()
        last_eval = run_evaluation(state, val_source, "val")
        # Host-side metrics force the device work, so this times the whole pass (compilation included the
        # first time): benchmarks.md compares it with a training epoch.
        writer.write(step, {**last_eval, "eval_s": time.perf_counter() - t0})
        progress.log(step, last_eval, prefix="eval ")
      if do_ckpt or do_eval:
        writer.write(step, {"wall_s": wall_before + time.perf_counter() - started})
        saved = last_eval if do_eval else None
        if saved and step < selectable_from:  # kept out of the best-checkpoint ranking (build.first_selectable_step)
          saved = {k: v for k, v in saved.items() if k != run.best_metric}
        ckpt.save(step, state, metrics=saved)
      if do_eval:
        stopped = stop_after_evaluation(step, last_eval, early, on_eval, is_main)
      if do_eval or do_ckpt:
        interval_start = time.perf_counter()  # keep evaluation and saving out of the step rate
    if not last_eval:  # nothing to train (a finished or stopped run started again) or no evaluation was due
      last_eval = run_evaluation(state, val_source, "val")
    ckpt.wait()
    best = _best_checkpoint(ckpt, run.best_metric)
    if test_source is not None:
      test, test_best = _test_evaluations(state, test_source, run_evaluation, ckpt, target, best)
      writer.write(last_step, {**test, **test_best})
    for split in run.extra_test_splits:  # e.g. each site's test split, or a held-out site's
      source = build.split_source(dataset, split, "config.extra_test_splits")
      extra_tests.update(run_evaluation(state, source if whole_cases else prepare(source), split))
    if extra_tests:
      writer.write(last_step, extra_tests)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    progress.close()

  # ---- 6. results
  status = stopped if stopped and last_step < total_steps else FINISHED
  results = {"status": status, "step": last_step, "best": best, "final": last_eval, "test": test,
             "test_best": test_best, "extra_tests": extra_tests,
             "wall_s": wall_before + time.perf_counter() - started,
             "resumed_from_step": start_step}
  if dp is not None:
    results["privacy"] = dict(dp.plan.summary(last_step), per_example_norms_method=dp.norms)
  if config.get("pruning"):  # exact zeros per layer of the final weights (sparsity_report.md has every layer)
    rows = build.sparsity_report(config, state.params)
    results["sparsity"] = {row["name"]: row for row in rows if row["name"] in ("prunable", "total")}
    if is_main:
      atomic.write_text_atomically(os.path.join(workdir, "sparsity_report.md"), pruning.format_report(rows))
  path = write_results(workdir, results)
  if is_main:
    print(_summary_line(status, last_step, total_steps, last_eval, best, test, test_best, early,
                        f"Checkpoints: {ckpt.directory}; metrics: {writer.path}; "
                        f"results: {os.path.abspath(path)}."), flush=True)
  return {"step": last_step, **last_eval, **test, **test_best, **extra_tests}


def _best_checkpoint(ckpt: checkpoint.Checkpointer, best_metric: Optional[str]) -> Optional[dict]:
  """{"metric", "value", "step"} of the kept step with the best `best_metric`; None without one."""
  step = ckpt.best_step() if best_metric else None
  if step is None:
    return None
  return {"metric": best_metric, "value": checkpoint.metric_value(ckpt.metrics(step), best_metric), "step": step}


def restore_latest(ckpt: checkpoint.Checkpointer, target: TrainState,
                   config_change: Mapping[str, Any]) -> Tuple[int, Optional[TrainState]]:
  """(step, state) of the newest intact checkpoint, restored into `target`; (0, None) when there is none.

  Damaged steps (found when the directory was opened, or when reading one fails) are skipped with a
  `DamagedCheckpointWarning` naming each and why; they stay on disk. `config_change` (from
  `checkpoint.check_config`) turns a state that no longer fits into a ConfigError naming the changed keys.
  """
  for step in reversed(ckpt.all_steps()):
    try:
      state = restore_state(ckpt, target, step)
    except checkpoint.DamagedCheckpointError:
      continue  # now among ckpt.damaged_steps(); the warning below names it
    except ValueError as e:
      if not config_change:
        raise
      raise config_lib.ConfigError(
          f"The config change ({checkpoint.config_history.describe(config_change)}) does not fit the training "
          f"state saved at step {step}: {e} It cannot be applied to an existing run, even with "
          f"--allow_config_change; start a fresh --workdir.") from None
    _warn_damaged(ckpt, step)
    return step, state
  damaged = ckpt.damaged_steps()
  if damaged:
    listed = "; ".join(f"step {s}: {reason}" for s, reason in damaged.items())
    raise checkpoint.DamagedCheckpointError(
        f"No intact checkpoint to resume from in {ckpt.directory} (damaged: {listed}). Move the damaged steps out "
        f"of it to train from scratch, or start a fresh --workdir.", step=max(damaged), reason=damaged[max(damaged)])
  return 0, None


def _warn_damaged(ckpt: checkpoint.Checkpointer, resumed: int) -> None:
  for step, reason in ckpt.damaged_steps().items():
    where = f"Checkpoint step {step} in {ckpt.directory} is damaged ({reason})"
    if step > resumed:
      message = (f"{where}; resuming from step {resumed}, the newest intact one. Step {step} stays on disk "
                 f"(moved aside, all files kept, if this run saves step {step} again).")
    else:
      message = f"{where}; it is skipped and stays on disk."
    warnings.warn(message, checkpoint.DamagedCheckpointWarning, stacklevel=3)


def restore_state(ckpt: checkpoint.Checkpointer, target: TrainState, step: int) -> TrainState:
  """Restores the TrainState of `step` into `target` (ShapeDtypeStructs with shardings).

  Checkpoints written before the batch statistics got their own EMA have no `ema_model_state`; their
  average restarts from the restored statistics, which is what the evaluation used before.
  """
  saved = ckpt.state_metadata(step)
  if "ema_model_state" in saved:
    return ckpt.restore(target, step=step)
  state = ckpt.restore(target.replace(ema_model_state=None), step=step, partial=True)
  if target.ema_model_state is None:
    return state
  return state.replace(ema_model_state=jax.tree.map(jnp.copy, state.model_state))


def _test_evaluations(state, source, run_evaluation, ckpt: checkpoint.Checkpointer, target,
                      best: Optional[dict]):
  """Test metrics of the last state ("test/...") and of the best checkpoint ("test_best/...", restored from
  disk so it is exactly what was saved; {} without a best metric). MedMNIST reports both (Yang et al., 2023,
  "MedMNIST v2", Sci. Data 10:41)."""
  test = run_evaluation(state, source, "test")
  if best is None:
    return test, {}
  best_state = restore_state(ckpt, target, best["step"])
  return test, run_evaluation(best_state, source, "test_best")


def _check_finite(pending, ckpt: checkpoint.Checkpointer) -> None:
  """Stops the run at the first step whose loss or gradient was not finite."""
  flags = jax.device_get([m["finite"] for _, m in pending])
  for (step, m), finite in zip(pending, flags):
    if not finite:
      ckpt.wait()
      last_good = ckpt.latest_step()
      kept = (f"the last good checkpoint is step {last_good} in {ckpt.directory}" if last_good
              else "no checkpoint had been written yet")
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}). The run stopped without saving; {kept}.")
