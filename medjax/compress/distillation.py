"""`config.distillation`: train this run's model (the student) against a trained run (the teacher).

  config.distillation = dict(teacher="runs/breast_r50", temperature=4.0, alpha=0.9)
  config.distillation = dict(teacher="runs/unet_big", features=("bottleneck",), feature_weight=0.1)

The teacher is any workdir: its config.json names its model, its checkpoint ("best" by default) gives the weights
(`medjax.checkpoint.teacher_variables`, at the run's start only: a resumed run carries them in its own
checkpoint). The student is wrapped in `medjax.models.distillation.Distilled` (the teacher's forward pass inside
the same jitted step) and trained on `medjax.losses.distillation.distillation_objective`: (1 - alpha) task loss +
alpha T^2 KL of the softened outputs, per example for classification and per voxel for segmentation, plus the
feature terms. `checkpoint.load` of a distilled run gives the student alone.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping

import ml_collections as mlc

from medjax.config_lib import ConfigError, from_json
from medjax.losses.distillation import distillation_objective
from medjax.models.distillation import Distilled
from medjax.registry import merge_options

DEFAULTS = dict(
    teacher=None,          # the teacher's workdir (required)
    step="best",           # the teacher's checkpoint: "best", "latest" or a step number
    use_ema=None,          # the teacher's EMA weights; None: as the teacher's own evaluation did
    temperature=4.0,       # T of the softened softmax
    alpha=0.9,             # weight of the distillation term; 1 - alpha on the task loss
    features=(),           # aux names matched between student and teacher (FitNets)
    feature_weight=1.0,    # weight of each feature term
)
EXCLUSIVE = ("pretext", "privacy", "federated", "domain_adversarial")
CONFIG_FILE = "config.json"  # a workdir's config (medjax.checkpoint writes it)


def parse(distillation: Mapping[str, Any]) -> Dict[str, Any]:
  """`config.distillation` merged over DEFAULTS and checked; ConfigError naming the key."""
  try:
    options = merge_options(distillation, DEFAULTS, "config.distillation")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not options["teacher"]:
    raise ConfigError("config.distillation.teacher is required: the workdir of the trained teacher run.")
  if not float(options["temperature"]) > 0:
    raise ConfigError(f"config.distillation.temperature must be > 0, got {options['temperature']}.")
  if not 0.0 <= float(options["alpha"]) <= 1.0:
    raise ConfigError(f"config.distillation.alpha must lie in [0, 1], got {options['alpha']}.")
  if not float(options["feature_weight"]) >= 0:
    raise ConfigError(f"config.distillation.feature_weight must be >= 0, got {options['feature_weight']}.")
  if isinstance(options["features"], str):
    raise ConfigError("config.distillation.features must be a tuple of aux names, e.g. ('features',), not a string.")
  options["features"] = tuple(options["features"] or ())
  return options


def check_config(config: mlc.ConfigDict) -> Dict[str, Any]:
  """`parse` plus the combinations a distilled run refuses; the parsed options."""
  options = parse(config.distillation)
  for key in EXCLUSIVE:
    if config.get(key):
      raise ConfigError(f"config.distillation cannot be combined with config.{key}.")
  return options


def teacher_config(options: Mapping[str, Any]) -> mlc.ConfigDict:
  """The teacher run's config, read from `<teacher>/config.json` (the teacher of a distilled teacher is not
  needed: its student is the model). ConfigError naming config.distillation.teacher when it is missing."""
  path = os.path.join(os.path.expanduser(str(options["teacher"])), CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"config.distillation.teacher: {options['teacher']!r} is not a run workdir (no {path}).")
  try:
    with open(path) as f:
      config = from_json(f.read())
  except (OSError, ValueError, json.JSONDecodeError) as e:
    raise ConfigError(f"config.distillation.teacher: cannot read {path}: {e}") from None
  if config.get("pretext"):
    raise ConfigError(f"config.distillation.teacher: {options['teacher']!r} is a self-supervised pretraining run; "
                      "the teacher must be a run trained on the task (its outputs are what the student learns).")
  config.distillation = None
  config.domain_adversarial = None  # the teacher's task model (checkpoint.model_weights drops DANN's head)
  return config


def wrap(student: Any, teacher: Any, options: Mapping[str, Any]) -> Distilled:
  """The student with the teacher beside it (`Distilled`)."""
  return Distilled(student=student, teacher=teacher, feature_keys=tuple(options["features"]))


def objective(task_objective: Any, options: Mapping[str, Any]) -> Any:
  """The distillation objective around `task_objective` (`distillation_objective`)."""
  return distillation_objective(task_objective, temperature=float(options["temperature"]),
                                alpha=float(options["alpha"]), feature_keys=tuple(options["features"]),
                                feature_weight=float(options["feature_weight"]))


__all__ = ["DEFAULTS", "check_config", "objective", "parse", "teacher_config", "wrap"]
