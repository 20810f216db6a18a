"""A run's checkpoints as a whole: `for_run(workdir)` opens them as the run's config asks, `load(workdir)` gives
config + model + variables for inference, `model_weights(workdir)` the weights another run or a file takes."""

from __future__ import annotations

import os
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from medjax import build, pretext
from medjax.models import distillation, domain_adversarial
from medjax.checkpoint.config_history import load_config
from medjax.checkpoint.integrity import CheckpointError
from medjax.checkpoint.manager import Checkpointer
from medjax.typing import PyTree

CHECKPOINT_DIR = "checkpoints"


def for_run(workdir: str | os.PathLike, config: Any = None, *, read_only: bool = False) -> Checkpointer:
  """The Checkpointer of a run: `workdir/checkpoints` with the retention and best-checkpoint ranking of the
  run's config (`build.settings`; read from `workdir/config.json` when `config` is None). `read_only` opens
  an existing run for restoring (no saves, synchronous, nothing created; CheckpointNotFoundError naming the
  path when the run has no checkpoint directory)."""
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
  Raises:
    CheckpointNotFoundError (a FileNotFoundError): no such workdir, config.json, checkpoint directory or step.
    DamagedCheckpointError: the step (the requested one, or the latest / best on disk) is damaged; the
      message names it and lists the intact steps. Both are CheckpointErrors (ValueErrors) with one line.
  """
  config = load_config(workdir)
  distilled = bool(config.get("distillation"))
  if distilled:  # the student alone: the teacher only served training (its weights are in the checkpoint)
    config = _student_config(config)
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
    raise CheckpointError(f"Checkpoint {ckpt.directory} step {step} has no 'params' in its state.")
  params, model_state = part["params"], part.get("model_state")
  if use_ema and part.get("ema_params"):
    params, model_state = part["ema_params"], part.get("ema_model_state") or model_state
  variables = {"params": params, **dict(model_state or {})}
  if distilled:
    variables = distillation.student_variables(variables)
  return Loaded(config=config, model=model, variables=variables, step=step, selected=selected, metrics=metrics)


def _student_config(config: Any) -> Any:
  """A distilled run's config without the teacher: what builds its student (config.json keeps the teacher)."""
  student = config.copy_and_resolve_references()
  student.distillation = None
  return student


def model_weights(workdir: str | os.PathLike, step: Union[int, str, None] = None, *,
                  use_ema: Optional[bool] = None) -> Tuple[Dict[str, PyTree], str]:
  """The variables of the model a run trained, as `load` reads them, and where they came from ("workdir W step
  S (best by val/auc)"). For a self-supervised pretraining run (`config.pretext`) these are its encoder's
  (`pretext.encoder_variables`: the `config.model_name` model without the pretext heads), which is what a
  downstream run or a weight file takes."""
  loaded = load(workdir, step, use_ema=use_ema)
  where = f"workdir {os.fspath(workdir)} step {loaded.step} ({loaded.selected})"
  if loaded.config.get("domain_adversarial"):  # the task model without DANN's domain classifier and counter
    return (domain_adversarial.task_model_variables(loaded.variables),
            f"{where}, the {loaded.config.model_name} inside its domain-adversarial training")
  if not loaded.config.get("pretext"):
    return loaded.variables, where
  task = pretext.tasks.parse(loaded.config.pretext)[0]
  return (pretext.encoder_variables(loaded.variables),
          f"{where}, the {loaded.config.model_name} encoder of its {task} pretraining")
