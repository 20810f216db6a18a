"""The training loop: `main(config, workdir)`, its phases top to bottom.

1. validate the config (every name resolved, before anything loads or compiles);
2. mesh, dataset, model, objective, optimizer, evaluator;
3. state: restored from the workdir's latest checkpoint (exact resume) or initialised directly into its
   shardings;
4. compile the train and eval steps once, with explicit shardings and the state donated;
5. loop: step, log, evaluate, checkpoint, stop on a non-finite loss keeping the last good checkpoint;
6. final checkpoint and summary.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from medjax import augment, checkpoint, config_lib, evaluators, losses, models, optim, sharding, steps
from medjax.data import datasets, pipeline
from medjax.metric_writer import MetricWriter, Progress
from medjax.train_state import TrainState


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient; names the step and the kept checkpoint."""


def _due(step: int, every: Optional[int], total: int) -> bool:
  return step == total or bool(every) and step % every == 0


def build_model(config: mlc.ConfigDict):
  """The config's model with the configured compute dtype (parameters stay float32)."""
  kwargs = dict(config.get("model", {}))
  if "dtype" in kwargs:
    raise config_lib.ConfigError("Set the compute dtype with config.compute_dtype, not config.model.dtype.")
  kwargs["dtype"] = jnp.dtype(config.get("compute_dtype", "float32"))
  return models.build_model(config.model_name, kwargs)


def init_state_fn(model, tx, example_image: np.ndarray, use_ema: bool):
  """Returns `init(rng) -> TrainState` for a batch-1 dummy input shaped like `example_image`."""

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1,) + example_image.shape, jnp.float32)
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    return TrainState.create(variables=variables, tx=tx, rng=state_rng, use_ema=use_ema)

  return init


def jit_train_step(model, objective, tx, mesh, state_sharding, *, accum_steps: int = 1, ema_decay: float = 0.0,
                   augment_fn=None):
  """`steps.train_step` bound to its hyperparameters and jitted over `mesh`, the state donated.

  Batches come in split over the data axis; metrics come out replicated.
  """
  return jax.jit(
      functools.partial(steps.train_step, apply_fn=model.apply, objective=objective, tx=tx,
                        accum_steps=accum_steps, ema_decay=ema_decay, augment_fn=augment_fn),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))


def main(config: mlc.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns the last evaluation metrics (keys "val/...") plus "step".
  """
  # ---- 1. config
  config_lib.validate(config)
  total_steps = int(config.total_steps)
  batch_size = int(config.input.batch_size)
  is_main = jax.process_index() == 0

  # ---- 2. components
  mesh = sharding.make_mesh(config.get("mesh", (("data", -1),)))
  sharding.check_batch_size(batch_size, mesh)
  data_name, data_kwargs = config_lib.named(config.data, "data")
  dataset = datasets.build_dataset(data_name, data_kwargs)
  train_source, val_source = dataset.source("train"), dataset.source(config.get("eval_split", "val"))
  model = build_model(config)
  loss_name, loss_kwargs = config_lib.named(config.get("loss", "xent"), "loss")
  objective = losses.make_objective(loss_name, loss_kwargs)
  tx, schedule_fn = optim.make_optimizer(config)
  eval_name, eval_kwargs = config_lib.named(
      config.get("evaluator", dataset.info.task), "evaluator")
  evaluator = evaluators.EVALUATORS.get(eval_name)(info=dataset.info, **eval_kwargs)
  ema_decay = float(config.get("ema_decay", 0.0))

  # ---- 3. state: restore or initialise straight into its shardings
  init_fn = init_state_fn(model, tx, train_source[0]["image"], use_ema=ema_decay > 0)
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.get("sharding", "data_parallel"))
  ckpt_options = dict(config.get("checkpoint", {}))
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_interval_steps=1,
      max_to_keep=ckpt_options.get("max_to_keep", 2),
      keep_best=ckpt_options.get("keep_best", 1) if config.get("best_metric") else 0,
      best_metric=config.get("best_metric"), best_mode=config.get("best_mode", "max"),
      async_save=ckpt_options.get("async_save", True))
  start_step = ckpt.latest_step() or 0
  if start_step:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sharding)
    state = ckpt.restore(target, step=start_step)
    logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
  if is_main:
    checkpoint.save_config(workdir, config)

  # ---- 4. compiled steps
  augment_config = config.get("augment") or {}
  train_step = jit_train_step(model, objective, tx, mesh, state_sharding,
                              accum_steps=int(config.get("grad_accum_steps", 1)), ema_decay=ema_decay,
                              augment_fn=augment.make_augment(augment_config) if augment_config else None)
  eval_step = jax.jit(functools.partial(steps.eval_step, apply_fn=model.apply, stats_fn=evaluator.stats_fn))
  eval_batch_size = int(config.input.get("eval_batch_size", batch_size))
  sharding.check_batch_size(eval_batch_size, mesh, what="config.input.eval_batch_size")
  use_ema_for_eval = ema_decay > 0 and config.get("eval_with_ema", True)

  def run_evaluation(state) -> Dict[str, float]:
    variables = state.variables(use_ema=use_ema_for_eval)
    batches = pipeline.device_batches(
        pipeline.eval_batches(val_source, global_batch_size=eval_batch_size), mesh)
    result = evaluators.evaluate(evaluator, lambda b: eval_step(variables, b), batches)
    return {f"val/{k}": v for k, v in result.items()}

  # ---- 5. loop
  writer = MetricWriter(workdir, enabled=is_main)
  progress = Progress(total_steps, start_step, enabled=is_main)
  train_batches = pipeline.device_batches(
      pipeline.TrainBatches(train_source, global_batch_size=batch_size, seed=config.seed).iterate(start_step),
      mesh)
  log_every = int(config.get("log_every_steps", 50))
  eval_every = config.get("eval_every_steps")
  ckpt_every = config.get("checkpoint_every_steps")
  pending, last_eval = [], {}
  best = config.get("best_metric")
  interval_start, interval_first_step = time.perf_counter(), start_step
  compiled = None
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_batches)
      if compiled is None:
        t0 = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        writer.write(step, {"compile_s": time.perf_counter() - t0})
        interval_start = time.perf_counter()
      state, step_metrics = compiled(state, batch)
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
        writer.write(step, scalars)
        progress.log(step, scalars)
        pending, interval_start, interval_first_step = [], now, step
      if do_eval:
        last_eval = run_evaluation(state)
        writer.write(step, last_eval)
        progress.log(step, last_eval, prefix="eval ")
      if do_ckpt or do_eval:
        ckpt.save(step, state, metrics=last_eval if do_eval else None)
      if do_eval or do_ckpt:
        interval_start = time.perf_counter()  # keep evaluation and saving out of the step rate
    if not last_eval:  # nothing to train (a finished run started again) or no evaluation was due
      last_eval = run_evaluation(state)
    ckpt.wait()
    best_step = ckpt.best_step()
    best_value = checkpoint.metric_value(ckpt.metrics(best_step), best) if best and best_step else None
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    progress.close()

  # ---- 6. summary
  final = {"step": total_steps, **last_eval}
  if is_main:
    shown = {k: v for k, v in last_eval.items() if not k.startswith("val/num_")}
    best_text = f"Best {best}={best_value:.4f} at step {best_step}. " if best_value is not None else ""
    print(f"Finished {total_steps} steps. Final {' '.join(f'{k}={v:.4f}' for k, v in shown.items())}. "
          f"{best_text}Checkpoints: {ckpt.directory}; metrics: {writer.path}.", flush=True)
  return final


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
