"""Shared helpers for the training-loop tests."""

import os

import pytest

from medjax import checkpoint, config_lib, train

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


class Preempted(Exception):
  """Raised by `preempt_after_save` to simulate a job killed right after a checkpoint."""


def preempt_after_save(monkeypatch, at_step: int):
  """Makes `Checkpointer.save` raise `Preempted` right after it saved step `at_step`; returns the original
  `save` so a test can put it back and resume."""
  original_save = checkpoint.Checkpointer.save

  def save_then_preempt(self, step, state, metrics=None, force=False):
    saved = original_save(self, step, state, metrics=metrics, force=force)
    if step == at_step:
      raise Preempted()
    return saved

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_preempt)
  return original_save


def set_dotted(config, **overrides):
  """Sets `config["a"]["b"] = v` for every keyword `a.b=v` given as `**{"a.b": v}`; returns the config."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_straight_and_resumed(config, tmp_path, monkeypatch, at_step: int):
  """Trains `config` straight through in `tmp_path/straight`, and in `tmp_path/resumed` with a preemption right
  after the checkpoint of step `at_step`, then resumed to the end; returns the two workdirs (straight, resumed)."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.main(config, straight)
  original_save = preempt_after_save(monkeypatch, at_step=at_step)
  with pytest.raises(Preempted):
    train.main(config, resumed)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
  train.main(config, resumed)
  return straight, resumed


def train_experiment(path, spec: str, *, model=None, eval_flips=None, **data):
  """Trains `experiments/<spec>` ("file.py:args") on one device in `path`, with `data` as config.data overrides,
  `model` as (model_name, model kwargs) and `eval_flips` when given; returns `train.main`'s metrics."""
  config = config_lib.load_config(os.path.join(EXPERIMENTS, spec))
  config.mesh = (("data", 1),)
  if eval_flips:
    config.eval_flips = eval_flips
  for key, value in data.items():
    config.data[key] = value
  if model:
    config.model_name, config.model = model
  return train.main(config, str(path))
