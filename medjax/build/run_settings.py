"""The run-level config keys and their defaults, each stated once: `Settings`, `settings(config)`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import ml_collections as mlc

from medjax.config_lib import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")
# How a run that trains on patches of segmentation cases validates (`validation_mode`).
VALIDATION_MODES = ("whole_case", "patches")
PSEUDO_PREFIX = "pseudo_"  # metric names of the "patches" mode: val/pseudo_dice_mean (nnU-Net's name)
BEST_MODES = ("max", "min")
DEFAULT_MESH = (("data", -1),)  # every device on the data axis


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """`config.checkpoint`: the latest `max_to_keep` steps plus the `keep_best` best by `config.best_metric`
  (0 without one); `async_save` writes in a background thread."""
  max_to_keep: int = 2
  keep_best: int = 1
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run-level config keys with their defaults, resolved once (`settings(config)`).

  Units: `*_steps` in optimizer steps; `None` for `eval_every_steps` / `checkpoint_every_steps` means only at
  the last step. `batch_size` is `config.input.batch_size` (global, over all devices); `eval_batch_size` is
  `config.input.eval_batch_size`, else the training batch size. `validation` applies to runs that train on
  patches of segmentation cases (`validation_mode`).
  """
  batch_size: Optional[int] = None
  eval_batch_size: Optional[int] = None
  seed: int = 0
  best_metric: Optional[str] = None
  best_mode: str = "max"
  mesh: Tuple[Tuple[str, int], ...] = DEFAULT_MESH
  sharding: str = "data_parallel"
  compute_dtype: str = "float32"
  loss: Any = "xent"
  eval_split: str = "val"
  test_split: Optional[str] = None
  ema_decay: float = 0.0
  eval_with_ema: bool = True
  grad_accum_steps: int = 1
  log_every_steps: int = 50
  eval_every_steps: Optional[int] = None
  checkpoint_every_steps: Optional[int] = None
  eval_flips: Optional[Tuple[Tuple[int, ...], ...]] = None
  validation: str = "whole_case"
  checkpoint: CheckpointSettings = CheckpointSettings()

  @property
  def use_ema_for_eval(self) -> bool:
    """Validation, test, `evaluate` and `checkpoint.load` use the EMA weights when the run kept them."""
    return self.ema_decay > 0 and self.eval_with_ema


_SCALAR_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings)
                         if f.name not in ("batch_size", "eval_batch_size", "checkpoint"))


def settings(config: mlc.ConfigDict) -> Settings:
  """The config's run-level settings; keys the config leaves out take `Settings`' defaults."""
  given = {k: config[k] for k in _SCALAR_SETTINGS if k in config and config[k] is not None}
  ckpt = dict(config.get("checkpoint") or {})
  unknown = sorted(set(ckpt) - {f.name for f in dataclasses.fields(CheckpointSettings)})
  if unknown:
    raise ConfigError(f"config.checkpoint: unknown key(s) {unknown}; known keys: max_to_keep, keep_best, "
                      "async_save.")
  if "mesh" in given:
    given["mesh"] = tuple(tuple(entry) for entry in given["mesh"])
  if "eval_flips" in given:
    given["eval_flips"] = tuple(tuple(axes) for axes in given["eval_flips"])
  # A saved config may lack config.input (a model saved for prediction only); validate() requires it.
  input_config = config.get("input") or {}
  batch_size = input_config.get("batch_size")
  eval_batch_size = input_config.get("eval_batch_size") or batch_size
  return Settings(batch_size=batch_size, eval_batch_size=eval_batch_size, checkpoint=CheckpointSettings(**ckpt),
                  **given)
