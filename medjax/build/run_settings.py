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


INIT_SOURCES = ("auto", "medjax", "torchvision", "timm", "monai")
INIT_STEPS = ("best", "latest")


@dataclasses.dataclass(frozen=True)
class InitFrom:
  """`config.init_from`: the weights a new run starts from (a string is `path` alone). Read only when the run
  starts at step 0; a resumed run restores its own checkpoint.

  path: a medjax workdir (config.json + checkpoints/), or a weight file (.safetensors, .npz, .pt/.pth).
  step: a workdir's "best" (by its best_metric; its latest without one), "latest", or a step number.
  use_ema: a workdir's EMA weights; None: as that run evaluated (`Settings.use_ema_for_eval`).
  source: a file's tensor names: "medjax" ("params/stem_conv/kernel", as `medjax.tools.convert_weights` and
    `transfer.save_state_dict` of flattened variables write), a PyTorch layout ("torchvision", "timm",
    "monai"), or "auto" (medjax names when every name has a "/", else "torchvision").
  model_name / model: the model that a PyTorch-layout file belongs to; default this run's `model_name`, and
    `config.model` without num_classes (read from the file) and, with `inflate`, with spatial_dims=2.
  exclude: patterns of this model's variables to keep freshly initialised (("head",) for a new classifier).
  inflate: None, "average" or "center": 2D kernels into a 3D model (`transfer.adapt.inflate_kernel`).
  adapt_channels: kernels differing only in input channels are adapted (`transfer.adapt.adapt_input_channels`).
  allow_missing: variables absent from the source stay initialised (reported) instead of an error.
  """
  path: str
  step: Any = "best"
  use_ema: Optional[bool] = None
  source: str = "auto"
  model_name: Optional[str] = None
  model: Optional[dict] = None
  exclude: Tuple[str, ...] = ()
  inflate: Optional[str] = None
  adapt_channels: bool = True
  allow_missing: bool = False


INIT_FROM_KEYS = tuple(f.name for f in dataclasses.fields(InitFrom))


def init_from(config: mlc.ConfigDict) -> Optional[InitFrom]:
  """`config.init_from` as `InitFrom` (None when unset); ConfigError for unknown keys or a missing path."""
  given = config.get("init_from")
  if not given:
    return None
  if isinstance(given, str):
    given = {"path": given}
  given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
  unknown = sorted(set(given) - set(INIT_FROM_KEYS))
  if unknown or "path" not in given:
    raise ConfigError(f"config.init_from: {'unknown key(s) ' + str(unknown) if unknown else 'path is required'}; "
                      f"known keys: {', '.join(INIT_FROM_KEYS)}.")
  for key in ("exclude",):
    if isinstance(given.get(key), str):
      given[key] = (given[key],)
  given["exclude"] = tuple(given.get("exclude") or ())
  return InitFrom(**given)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run-level config keys with their defaults, resolved once (`settings(config)`).

  Units: `*_steps` in optimizer steps; `None` for `eval_every_steps` / `checkpoint_every_steps` means only at
  the last step. `batch_size` is `config.input.batch_size` (global, over all devices); `eval_batch_size` is
  `config.input.eval_batch_size`, else the training batch size. `validation` applies to runs that train on
  patches of segmentation cases (`validation_mode`). `freeze_batch_stats` trains with batch norms in
  inference mode (running statistics used and kept, as torch's `module.eval()` on the norms; linear probing,
  small-batch fine-tuning).
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
  train_split: str = "train"
  eval_split: str = "val"
  test_split: Optional[str] = None
  extra_test_splits: Tuple[str, ...] = ()
  ema_decay: float = 0.0
  eval_with_ema: bool = True
  grad_accum_steps: int = 1
  log_every_steps: int = 50
  eval_every_steps: Optional[int] = None
  checkpoint_every_steps: Optional[int] = None
  eval_flips: Optional[Tuple[Tuple[int, ...], ...]] = None
  validation: str = "whole_case"
  freeze_batch_stats: bool = False
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
  if "extra_test_splits" in given:
    given["extra_test_splits"] = tuple(given["extra_test_splits"])
  if "eval_flips" in given:
    given["eval_flips"] = tuple(tuple(axes) for axes in given["eval_flips"])
  # A saved config may lack config.input (a model saved for prediction only); validate() requires it.
  input_config = config.get("input") or {}
  batch_size = input_config.get("batch_size")
  eval_batch_size = input_config.get("eval_batch_size") or batch_size
  return Settings(batch_size=batch_size, eval_batch_size=eval_batch_size, checkpoint=CheckpointSettings(**ckpt),
                  **given)
