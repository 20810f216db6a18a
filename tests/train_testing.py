"""Shared helpers for the training-loop tests."""

import pytest

from medjax import checkpoint, train


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
