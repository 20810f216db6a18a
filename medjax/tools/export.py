"""Export a trained run's predictor with `jax.export`: a folder that predicts without medjax (numpy + jax only).

  python -m medjax.tools.export --workdir runs/demo --out model/
  python -m medjax.tools.export --workdir runs/x --out model/ [--checkpoint best|latest] [--step N] [--batch 4]
      [--shape z,y,x] [--platforms cpu,cuda] [--output softmax|sigmoid|logits] [--normalization zscore] [--overwrite]

Then, in any process with jax (medjax not needed):

  import sys; sys.path.insert(0, "model"); import load_predictor
  probabilities = load_predictor.load("model").predict(images)   # float32 (b, *spatial, C), channels last

The folder (`medjax.compress.export`): predict.jaxexport (the serialised function), weights.npz (its weights),
metadata.json (input and output specs, classes, spacing, what to do before calling, the commits of the run and of
this export, jax version, platforms, bytes of each file) and load_predictor.py (the loader, whose docstring is the
manual). The function computes what the run's evaluation computes (`medjax.build.evaluation`): the model with
`config.eval_flips` (flip TTA), softmax probabilities (per-label sigmoid for multi-hot classification labels;
`--output` chooses), and for a run predicted through a sliding window (trained on patches of segmentation cases,
or with `config.inference.roi_size`) that window (`config.inference`) over every volume of the batch. The input
normalisation of the run's dataset goes inside where it is an array operation (MedMNIST's scaling of 0..255
pixels, the volume datasets' z-score / CT / window schemes); reorienting, cropping and resampling stay with the
caller, listed in metadata.json.

The batch is symbolic ("b": any size) unless `--batch` fixes it; the spatial shape is fixed: `--shape`, else the
dataset's image shape. A run trained on patches of cases of varying size (msd, image_folder) needs `--shape`: the
volume size the exported sliding window takes. `--platforms` lowers for other backends too (default: this
process's). A user's mistake (a missing workdir, an --out folder that is not empty without --overwrite, a malformed
flag) prints one line `medjax.tools.export: error: ...` and exits with status 2 (tools/cli.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from absl import flags

from medjax.tools import cli

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
OUTPUTS = ("softmax", "sigmoid", "logits")

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json + checkpoints/).",
                               flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Folder for the exported predictor (created; must be empty unless "
                           "--overwrite).", flag_values=_FLAGS)
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint: best by config.best_metric (latest when unset), or latest.",
                                flag_values=_FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Export this checkpoint step (overrides --checkpoint).", flag_values=_FLAGS)
_BATCH = flags.DEFINE_integer("batch", None, "A fixed batch size (default: symbolic, any size).", flag_values=_FLAGS)
_SHAPE = flags.DEFINE_list("shape", None, "Spatial input shape z,y,x (3D) or y,x (2D); default: the dataset's image "
                           "shape.", flag_values=_FLAGS)
_PLATFORMS = flags.DEFINE_list("platforms", None, f"Platforms to lower for, of {', '.join(PLATFORMS)} (default: "
                               "this process's backend).", flag_values=_FLAGS)
_OUTPUT = flags.DEFINE_enum("output", None, list(OUTPUTS), "What the function returns (default: softmax, or sigmoid "
                            "for multi-hot classification labels).", flag_values=_FLAGS)
_NORMALIZATION = flags.DEFINE_list("normalization", None, "Volume datasets: the normalisation scheme(s) used in "
                                   "training, one or one per channel (overrides config.data.normalization).",
                                   flag_values=_FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the export files in a non-empty --out folder.",
                               flag_values=_FLAGS)


def _check_out(out: str, overwrite: bool) -> str:
  shown = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise cli.UsageError(f"--out {shown} is a file; give a folder for the exported predictor.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise cli.UsageError(f"--out {shown} exists and is not empty; give a new folder, or --overwrite to replace the "
                         "export files in it.")
  return out


def _platforms(values: Optional[Sequence[str]]) -> Optional[tuple]:
  if not values:
    return None
  bad = [v for v in values if v not in PLATFORMS]
  if bad:
    raise cli.UsageError(f"--platforms: {', '.join(map(repr, bad))} not among {', '.join(PLATFORMS)}."
                         f"{cli.suggest(bad[0], PLATFORMS)}")
  return tuple(values)


def _default_output(config, dataset) -> str:
  """softmax, or sigmoid when the run's classification labels are multi-hot (as its evaluator decides)."""
  if dataset.info.task != "classification":
    return "softmax"  # whole-case evaluation averages softmax probabilities (build.case_evaluation)
  task = (config.get("evaluator") or {}).get("task")
  if task is not None:
    return "sigmoid" if task == "multi-label" else "softmax"
  import numpy as np
  source = dataset.source(dataset.splits[0])
  return "sigmoid" if len(source) and np.ndim(source[0]["label"]) == 1 else "softmax"


def _shape(values: Optional[Sequence[str]], info, window: Optional[Dict[str, Any]]) -> tuple:
  """The exported spatial shape: --shape, else the dataset's image shape (refused for a patch-trained run whose
  dataset reports its patch as the image shape: cases of varying size)."""
  shape = cli.numbers(values, "shape", positive=True)
  if shape is not None:
    if len(shape) != info.spatial_dims:
      raise cli.UsageError(f"--shape {','.join(values)}: the run's model is {info.spatial_dims}D; give "
                           f"{'z,y,x' if info.spatial_dims == 3 else 'y,x'}.")
    return shape
  if window is not None and tuple(info.image_shape) == tuple(window["roi_size"]):
    raise cli.UsageError(f"--shape is needed: the run predicts cases of varying size with a sliding window of "
                         f"{tuple(window['roi_size'])}; give the volume shape the export takes (z,y,x).")
  return tuple(info.image_shape)


def run_export(workdir: str, out: str, *, which: str = "best", step: Optional[int] = None,
               batch: Optional[int] = None, shape: Optional[Sequence[str]] = None,
               platforms: Optional[Sequence[str]] = None, output: Optional[str] = None,
               normalization: Optional[Sequence[str]] = None, overwrite: bool = False) -> Dict[str, Any]:
  """Exports the predictor of `workdir` (module docstring) into `out`; returns its metadata (with
  "metadata_bytes"). Flag values are given as the flags hold them (lists of strings for shape, platforms and
  normalization). Raises UsageError naming the flag for a bad value or a non-empty `out` without `overwrite`."""
  from medjax import build, checkpoint
  from medjax.compress import export
  _check_out(out, overwrite)
  platforms = _platforms(platforms)
  if batch is not None and batch < 1:
    raise cli.UsageError(f"--batch must be a positive integer (or unset: symbolic), got {batch}.")
  config = checkpoint.load_config(workdir)
  cli.refuse_pretext_run(config, workdir, "export")
  try:
    dataset = build.dataset(config)
  except (ValueError, KeyError, OSError) as e:  # its data is elsewhere: the class names and shapes come from it
    raise cli.UsageError(f"{workdir}: the run's dataset (class names, image shape, channels) cannot be built here "
                         f"({cli.error_message(e)}); export where the run's data is.") from None
  info = dataset.info
  sliding = build.whole_cases(config, info) or bool((config.get("inference") or {}).get("roi_size"))
  window = build.inference_options(config) if sliding else None
  spatial = _shape(shape, info, window)
  schemes = None
  if normalization:
    schemes = normalization[0] if len(normalization) == 1 else tuple(normalization)
  preprocessing = export.preprocessing_from_data_config(config.get("data", {}), info.num_channels,
                                                        normalization=schemes)
  loaded = checkpoint.load(workdir, step if step is not None else which)
  config = loaded.config  # the model's config: a distilled run's student without its teacher
  return export.export_predictor(
      out, loaded.model.apply, loaded.variables, input_shape=(*spatial, info.num_channels), batch=batch,
      normalization=preprocessing.inside, before=preprocessing.before,
      output=output or _default_output(config, dataset), flips=build.settings(config).eval_flips, window=window,
      platforms=platforms, task=info.task, class_names=info.class_names, spacing_mm=preprocessing.spacing_mm,
      model={"name": config.get("model_name"), "compute_dtype": config.get("compute_dtype"), "step": loaded.step,
             "selected": loaded.selected},
      workdir=workdir, overwrite=overwrite)


def main(argv):
  del argv
  missing = [f"--{name}" for name, flag in (("workdir", _WORKDIR), ("out", _OUT)) if not flag.value]
  if missing:
    raise cli.UsageError(f"export needs {', '.join(missing)}.")
  cli.check_workdir(_WORKDIR.value)
  metadata = run_export(_WORKDIR.value, _OUT.value, which=_CHECKPOINT.value, step=_STEP.value, batch=_BATCH.value,
                        shape=_SHAPE.value, platforms=_PLATFORMS.value, output=_OUTPUT.value,
                        normalization=_NORMALIZATION.value, overwrite=_OVERWRITE.value)
  files = {**metadata["files"], "metadata.json": metadata["metadata_bytes"]}
  print(json.dumps({"out": os.path.abspath(_OUT.value), "input": metadata["input"]["shape"],
                    "output": metadata["output"]["shape"], "platforms": metadata["platforms"],
                    "checkpoint_step": metadata["model"]["step"], "bytes": files,
                    "total_bytes": sum(files.values())}, indent=2))


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
