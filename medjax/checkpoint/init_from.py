"""`config.init_from`: the weights a new run starts from (another run's checkpoint, or a weight file), merged
into the freshly initialised model with a report of what was loaded, adapted, initialised and skipped.

The report is logged and written to `workdir/init_report.json` (`INIT_REPORT_FILE`) when the run starts; a
resumed run restores its own checkpoint and never reads `init_from` again, so restarts stay bit-exact.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import ml_collections as mlc
import numpy as np

from medjax import build, transfer
from medjax.checkpoint.runs import model_weights
from medjax.compress import distillation
from medjax.models.distillation import TEACHER_COLLECTION

INIT_REPORT_FILE = "init_report.json"


def _source_model(options: build.InitFrom, config: mlc.ConfigDict) -> Tuple[str, Dict[str, Any]]:
  """The model a PyTorch-layout file belongs to: `init_from.model_name` / `init_from.model`, else this run's model
  without its head size (read from the file) and, when inflating, in 2D."""
  name = options.model_name or config.model_name
  if options.model is not None:
    return name, dict(options.model)
  kwargs = {k: v for k, v in dict(config.get("model") or {}).items() if k != "num_classes"}
  if options.inflate:
    kwargs["spatial_dims"] = 2
  return name, kwargs


def pretrained_variables(options: build.InitFrom, config: mlc.ConfigDict) -> Tuple[Dict[str, Any], str]:
  """The variables `options` points at, in medjax names (nested dicts of host arrays), and a description of
  where they came from ("workdir W step S (best by val/auc)", "file F (torchvision resnet18)"). A workdir of a
  pretext run (`config.pretext`) gives its encoder's variables (`runs.model_weights`).

  Raises CheckpointError (a workdir without an intact step), FileNotFoundError, transfer.WeightFileError, or
  transfer.WeightMismatchError (a PyTorch file that does not fit its model), each naming the path.
  """
  path = os.path.expanduser(options.path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from.path: {options.path!r} does not exist (a workdir, or a weight file "
                            f"{', '.join(transfer.SUFFIXES)}).")
  if os.path.isdir(path):
    variables, where = model_weights(path, options.step, use_ema=options.use_ema)
    return jax.device_get(variables), where
  state_dict = transfer.load_state_dict(path)
  source = options.source
  if source == "auto":
    source = "medjax" if state_dict and all("/" in name for name in state_dict) else "torchvision"
  if source == "medjax":
    return transfer.unflatten({tuple(name.split("/")): value for name, value in state_dict.items()}), \
        f"file {options.path} (medjax names)"
  model_name, kwargs = _source_model(options, config)
  try:
    variables = transfer.from_torch(state_dict, model_name, kwargs, source=source)
  except ValueError as e:
    raise type(e)(f"config.init_from.path {options.path}: {e}") from None
  return variables, f"file {options.path} ({source} {model_name})"


def initial_variables(config: mlc.ConfigDict, fresh: Mapping[str, Any]
                      ) -> Optional[Tuple[Dict[str, Any], transfer.LoadReport]]:
  """`fresh` (the new model's initialised variables) with `config.init_from`'s weights merged in, and the
  report; None when the config has no init_from. Raises transfer.WeightMismatchError listing every variable
  that is missing or cannot be adapted (see `transfer.merge`)."""
  options = build.init_from(config)
  if options is None:
    return None
  source, description = pretrained_variables(options, config)
  return transfer.merge(jax.device_get(fresh), source, exclude=options.exclude, inflate=options.inflate,
                        adapt_channels=options.adapt_channels, allow_missing=options.allow_missing,
                        source_name=description)


def with_teacher(config: mlc.ConfigDict, variables: Mapping[str, Any]) -> Tuple[Dict[str, Any], str]:
  """`variables` (a fresh Distilled model's, nested dicts) with the "teacher" collection replaced by the weights of
  `config.distillation.teacher`'s checkpoint, and where they came from. Called when a distilled run starts; a
  resumed run restores them from its own checkpoint. Raises transfer.WeightMismatchError naming every teacher
  variable whose name or shape differs from the teacher model's (e.g. a workdir retrained with another model)."""
  options = distillation.check_config(config)
  teacher, where = model_weights(os.path.expanduser(str(options["teacher"])), options["step"],
                                 use_ema=options["use_ema"])
  teacher = jax.device_get(teacher)
  expected = jax.device_get(variables[TEACHER_COLLECTION]["variables"])
  shapes = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  have, want = shapes(teacher), shapes(expected)
  if have != want:
    differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    raise transfer.WeightMismatchError(
        f"config.distillation.teacher: the weights of {where} do not fit the teacher model built from its "
        f"config.json: {len(differ)} variable(s) differ, e.g. " + "; ".join(
            f"{k}: checkpoint {have.get(k)}, model {want.get(k)}" for k in differ[:5]) + ".")
  out = dict(variables)
  out[TEACHER_COLLECTION] = {"variables": jax.tree.map(lambda v, e: np.asarray(v, e.dtype), teacher, expected)}
  return out, where
