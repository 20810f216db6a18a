"""The one place a config becomes parts: settings with their defaults, model, dataset, objective, optimizer,
augmentation, evaluator, mesh, and the jitted train step.

  build.validate(config)                       # every name and keyword resolved; nothing loads or compiles
  settings = build.settings(config)            # the run-level keys, each default stated once (below)
  model = build.model(config)                  # with the configured compute dtype
  dataset = build.dataset(config)              # loads data
  evaluator = build.evaluator(config, dataset.info)

`train.main`, `checkpoint.load`, the notebooks and every tool go through these functions, so a run, its
evaluation and its predictions build the same model from the same config. `Settings` holds the defaults of
the run-level keys (`best_mode`, the mesh, the eval batch size, ...); nothing else states them.

Modules: `run_settings` (Settings), `parts` (model, dataset, objective, optimizer, augmentation, evaluator,
mesh, train step), `evaluation` (whole cases and the evaluation forward passes), `validation` (validate).
"""

from medjax.build.evaluation import (CaseEvaluation, case_evaluation, eval_apply_fn, inference_options,
                                     validation_mode, whole_cases)
from medjax.build.parts import (augment_fn, dataset, differential_privacy, eval_batch_size, evaluator,
                                first_selectable_step, init_state_fn, jit_train_step, mesh, model, objective,
                                optimizer, sparsity_report, split_source, train_apply_fn)
from medjax.build.run_settings import (BEST_MODES, COMPUTE_DTYPES, DEFAULT_MESH, PSEUDO_PREFIX, VALIDATION_MODES,
                                       CheckpointSettings, InitFrom, Settings, init_from, settings)
from medjax.build.validation import check_model_inputs, early_stopping_options, validate

__all__ = [
    "BEST_MODES", "COMPUTE_DTYPES", "DEFAULT_MESH", "PSEUDO_PREFIX", "VALIDATION_MODES", "CaseEvaluation",
    "CheckpointSettings", "InitFrom", "Settings", "augment_fn", "case_evaluation", "check_model_inputs", "dataset",
    "differential_privacy", "early_stopping_options", "eval_apply_fn", "eval_batch_size", "evaluator",
    "first_selectable_step", "inference_options", "init_from", "init_state_fn", "jit_train_step", "mesh", "model",
    "objective", "optimizer", "settings", "sparsity_report", "split_source", "train_apply_fn", "validate",
    "validation_mode", "whole_cases",
]
