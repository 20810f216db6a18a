"""Label maps for image cases from a trained run, or a sliding-window benchmark.

  python -m medjax.tools.predict --workdir runs/x --input case.nii.gz|case.nrrd|folder --output out/ \
      [--checkpoint best|latest] [--overlap 0.5] [--tta] [--lcc [--lcc_classes 1,2]] [--output_suffix .nrrd]
  python -m medjax.tools.predict --benchmark --size 256 --roi 128 --overlap 0.5 [--window_batch 4]

Prediction restores the run's best checkpoint by its `best_metric` (or the latest, or `--step`), builds the
model as training did (`checkpoint.load` -> `build.model`: the configured compute dtype), and writes
`<output>/<case><suffix>` for every input (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd), on the input's grid
(`medjax.inference.Predictor`), in the input's format (NIfTI as .nii.gz) unless `--output_suffix` names
another. The sliding window is `--roi`, else the run's own (`window_size`): `config.inference.roi_size`, else
the training patch (`config.input.patch_size`, else `config.data.patch_size`), else the training image size
(the dataset's `image_shape`: a run trained on whole images, like the README demo). Preprocessing comes from
`config.data` (`PreprocessSpec.from_data_config`), and the flags `--target_spacing`, `--normalization`,
`--crop_nonzero` override it. An input with another number of channels than the network takes (a 4D image for
a single-channel model) is refused, naming the file and its shape. A user's mistake (a missing workdir or
input, a malformed flag) prints one line `medjax.tools.predict: error: ...` and exits with status 2.

The benchmark times `sliding_window_inference` of a randomly initialised 3D U-Net (no checkpoint) on one
random `size^3` volume and prints one JSON object: compile seconds, median seconds per volume over `--steps`
runs (after `--warmup`) and voxels/s, for comparison with MONAI's `sliding_window_inference` on one GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import flags

from medjax.tools import cli

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json + checkpoints/).",
                               flag_values=_FLAGS)
_INPUT = flags.DEFINE_string("input", None, "An image case (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) or a folder of "
                             "them.", flag_values=_FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the predicted label maps (<case><suffix>).",
                              flag_values=_FLAGS)
_OUTPUT_SUFFIX = flags.DEFINE_string("output_suffix", None, "Format of the label maps: .nii.gz, .nii, .nrrd, .nhdr, "
                                     ".mha or .mhd (default: the input's; NIfTI as .nii.gz).", flag_values=_FLAGS)
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint: best by config.best_metric (latest when unset), or latest.",
                                flag_values=_FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Restore this checkpoint step (overrides --checkpoint).", flag_values=_FLAGS)
_USE_EMA = flags.DEFINE_bool("use_ema", None, "Use the EMA weights when the run kept them (default: as the run's "
                             "validation did).", flag_values=_FLAGS)
_OVERLAP = flags.DEFINE_float("overlap", 0.5, "Fraction of a window shared with its neighbour, in [0, 1).",
                              flag_values=_FLAGS)
_MODE = flags.DEFINE_enum("mode", "gaussian", ["gaussian", "constant"], "Window blending.", flag_values=_FLAGS)
_WINDOW_BATCH = flags.DEFINE_integer("window_batch", 4, "Windows per network call.", flag_values=_FLAGS)
_TTA = flags.DEFINE_bool("tta", False, "Average over all 8 mirrorings of each window.", flag_values=_FLAGS)
_LCC = flags.DEFINE_bool("lcc", False, "Keep only the largest connected component of each class.", flag_values=_FLAGS)
_LCC_CLASSES = flags.DEFINE_list("lcc_classes", None, "Classes for --lcc (default: every foreground class).",
                                 flag_values=_FLAGS)
_LABEL_RESAMPLE = flags.DEFINE_enum("label_resample", "linear", ["linear", "nearest"],
                                    "Back to the input grid: resample probabilities linearly, or labels nearest.",
                                    flag_values=_FLAGS)
_ROI = flags.DEFINE_list("roi", None, "Sliding window z,y,x (one int: all axes). Default: the run's "
                         "config.inference.roi_size, else its training patch (config.input.patch_size, else "
                         "config.data.patch_size), else its training image size (the dataset's image_shape). "
                         "In --benchmark the window (default 128).", flag_values=_FLAGS)
_TARGET_SPACING = flags.DEFINE_list("target_spacing", None, "Override: resample to z,y,x mm.", flag_values=_FLAGS)
_NORMALIZATION = flags.DEFINE_list("normalization", None, "Override: scheme(s), one or one per channel.",
                                   flag_values=_FLAGS)
_CROP = flags.DEFINE_bool("crop_nonzero", None, "Override: crop to the nonzero bounding box.", flag_values=_FLAGS)
_SHARD = flags.DEFINE_bool("shard", False, "Split each window batch over all local devices.", flag_values=_FLAGS)
_BENCHMARK = flags.DEFINE_bool("benchmark", False, "Time the sliding window on a random volume instead.",
                               flag_values=_FLAGS)
_SIZE = flags.DEFINE_integer("size", 256, "--benchmark: volume side in voxels.", flag_values=_FLAGS)
_FEATURES = flags.DEFINE_list("features", ["16", "32", "64", "128"], "--benchmark: U-Net widths per level.",
                              flag_values=_FLAGS)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 3, "--benchmark: output classes.", flag_values=_FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--benchmark: compute dtype.",
                           flag_values=_FLAGS)
_STEPS = flags.DEFINE_integer("steps", 5, "--benchmark: timed volumes (the median is reported).", flag_values=_FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 1, "--benchmark: untimed volumes after compilation.", flag_values=_FLAGS)


def _roi(values: Optional[Sequence[str]], default: Optional[Sequence[int]] = None):
  if not values:
    return None if default is None else tuple(int(v) for v in default)
  roi = cli.numbers(values, "roi", positive=True)
  if len(roi) not in (1, 3):
    raise cli.UsageError(f"--roi takes one or three positive integers (z,y,x), got {','.join(values)!r}.")
  return roi * 3 if len(roi) == 1 else roi


def window_size(config) -> Tuple[Tuple[int, ...], str]:
  """The sliding window a run predicts with, and where it came from: `config.inference.roi_size`, else the
  training patch (`config.input.patch_size`, else `config.data.patch_size`), else the training image size
  (`build.dataset(config).info.image_shape`: a run trained on whole images has no patch). Raises ValueError
  asking for `--roi` when none is known (the dataset cannot be built on this machine)."""
  for section, key in (("inference", "roi_size"), ("input", "patch_size"), ("data", "patch_size")):
    value = (config.get(section) or {}).get(key)
    if value:
      return tuple(int(v) for v in value), f"config.{section}.{key}"
  from medjax import build
  try:  # builds the dataset only for its info; a generated one makes no example, a folder lists its files
    shape = build.dataset(config).info.image_shape
  except (ValueError, KeyError, OSError) as e:  # its data is elsewhere, or the config names none
    raise ValueError(f"The run has no config.inference.roi_size, input.patch_size or data.patch_size, and its "
                     f"dataset (for the training image size) cannot be built here ({cli.error_message(e)}): pass "
                     "--roi z,y,x.") from None
  return tuple(int(s) for s in shape), "the training image size (dataset image_shape)"


def _mesh(shard: bool):
  import jax
  from medjax import build, sharding
  return sharding.make_mesh(build.DEFAULT_MESH, jax.local_devices()) if shard else None


def input_channels(predict_fn, roi: Sequence[int], hint: Optional[int] = None, most: int = 16) -> Optional[int]:
  """The number of input channels `predict_fn`'s network takes: `hint` (config.data.num_channels) when it fits,
  else the first of 1..`most` that does; None when none does. Shapes only (`jax.eval_shape`): a wrong count
  fails at the first layer's weights, before any compute."""
  import jax
  import jax.numpy as jnp

  def fits(channels: int) -> bool:
    try:
      jax.eval_shape(predict_fn, jax.ShapeDtypeStruct((1, *roi, channels), jnp.float32))
      return True
    except Exception:  # Flax's ScopeParamShapeError, or a shape error from another kind of model
      return False

  candidates = ([int(hint)] if hint else []) + [c for c in range(1, most + 1) if c != hint]
  return next((c for c in candidates if fits(c)), None)


def run_prediction(workdir: str, input_path: str, output_dir: str, *, roi=None, which: str = "best",
                   step: Optional[int] = None, use_ema: Optional[bool] = None,
                   overrides: Optional[Dict[str, Any]] = None, output_suffix: Optional[str] = None,
                   **predictor_kwargs) -> Dict[str, str]:
  """Predicts every case of `input_path` (a file or a folder of image files) into `output_dir`, as
  `<case><suffix>` (`inference.volume.output_name`); returns {case: written file}. The window is `roi`, else
  `window_size(config)`. Raises FileNotFoundError for a missing input, ValueError naming the file and its
  shape for an input whose channels the network does not take."""
  from medjax import checkpoint, inference
  from medjax.inference import volume as inference_volume
  cli.refuse_pretext_run(checkpoint.load_config(workdir), workdir, "predict")
  cases = inference_volume.image_inputs(input_path)
  names = {name: inference_volume.output_name(name, path, output_suffix) for name, path in cases.items()}
  loaded = checkpoint.load(workdir, step if step is not None else which, use_ema=use_ema)
  config, model, variables, step = loaded.config, loaded.model, loaded.variables, loaded.step
  spatial_dims = config.get("model", {}).get("spatial_dims", 3)
  if spatial_dims != 3:
    raise ValueError(f"{workdir}: config.model.spatial_dims={spatial_dims}; predict works on 3D models only.")
  roi, where = (tuple(int(r) for r in roi), "--roi") if roi else window_size(config)
  print(f"window {roi} (z, y, x) from {where}")
  spec = inference.PreprocessSpec.from_data_config(config.get("data", {}), **(overrides or {}))
  predict_fn = inference.make_predict_fn(model.apply, variables)
  channels = input_channels(predict_fn, roi, config.get("data", {}).get("num_channels")) if len(roi) == 3 else None
  predictor = inference.Predictor(predict_fn, roi_size=roi, preprocessing=spec, num_channels=channels,
                                  **predictor_kwargs)
  os.makedirs(output_dir, exist_ok=True)
  written = {}
  for name, path in cases.items():
    out = os.path.join(output_dir, names[name])
    start = time.perf_counter()
    predictor.predict_file(path, out)
    print(f"{name}: {out} ({time.perf_counter() - start:.1f} s, checkpoint step {step})")
    written[name] = out
  return written


def benchmark(size: int, roi: Sequence[int], overlap: float, window_batch: int, features: Sequence[int],
              num_classes: int, dtype: str = "float32", steps: int = 5, warmup: int = 1,
              mode: str = "gaussian", shard: bool = False) -> Dict[str, Any]:
  """Times `sliding_window_inference` of a random-init 3D U-Net over a random (1, size^3, 1) volume."""
  import jax
  import jax.numpy as jnp
  from medjax import inference, models
  model = models.build_model("unet", dict(spatial_dims=3, num_classes=num_classes, features=tuple(features),
                                          dtype=jnp.dtype(dtype)))
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1,) + tuple(roi) + (1,)), train=False))(
      jax.random.PRNGKey(0))
  volume = jax.random.normal(jax.random.PRNGKey(1), (1, size, size, size, 1), jnp.float32)
  predict_fn = inference.make_predict_fn(model.apply, variables)
  kwargs = dict(roi_size=tuple(roi), overlap=overlap, mode=mode, window_batch=window_batch, mesh=_mesh(shard))
  run = lambda: inference.sliding_window_inference(predict_fn, volume, **kwargs)
  start = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  windows = len(inference.window_origins((size,) * 3, roi, overlap))
  return {"size": size, "roi": list(roi), "overlap": overlap, "window_batch": window_batch, "windows": windows,
          "mode": mode, "features": list(features), "num_classes": num_classes, "dtype": dtype,
          "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(), "shard": shard,
          "first_call_s": compile_s, "median_s": median, "voxels_per_s": size**3 / median,
          "steps_timed": len(times)}


def main(argv):
  del argv
  if _BENCHMARK.value:
    report = benchmark(_SIZE.value, _roi(_ROI.value, (128, 128, 128)), _OVERLAP.value, _WINDOW_BATCH.value,
                       cli.numbers(_FEATURES.value, "features", positive=True), _NUM_CLASSES.value, _DTYPE.value,
                       _STEPS.value, _WARMUP.value, _MODE.value, _SHARD.value)
    print(json.dumps(report, indent=2))
    return
  missing = [f"--{name}" for name, flag in (("workdir", _WORKDIR), ("input", _INPUT), ("output", _OUTPUT))
             if not flag.value]
  if missing:
    raise cli.UsageError(f"predict needs {', '.join(missing)} (or --benchmark).")
  cli.check_workdir(_WORKDIR.value)
  cli.check_exists(_INPUT.value, "--input")
  if os.path.exists(_OUTPUT.value) and not os.path.isdir(_OUTPUT.value):
    raise cli.UsageError(f"--output {os.path.abspath(_OUTPUT.value)} is a file; give a folder for the label maps.")
  overrides = dict(
      target_spacing_mm=cli.numbers(_TARGET_SPACING.value, "target_spacing", float, positive=True),
      normalization=(_NORMALIZATION.value[0] if len(_NORMALIZATION.value) == 1 else tuple(_NORMALIZATION.value))
      if _NORMALIZATION.value else None,
      crop_nonzero=_CROP.value)
  lcc_classes = cli.numbers(_LCC_CLASSES.value or None, "lcc_classes")
  lcc = list(lcc_classes) if (_LCC.value and lcc_classes) else _LCC.value
  run_prediction(_WORKDIR.value, _INPUT.value, _OUTPUT.value, roi=_roi(_ROI.value), which=_CHECKPOINT.value,
                 step=_STEP.value, use_ema=_USE_EMA.value, overrides=overrides, output_suffix=_OUTPUT_SUFFIX.value,
                 overlap=_OVERLAP.value,
                 mode=_MODE.value, window_batch=_WINDOW_BATCH.value, tta=_TTA.value, lcc=lcc,
                 label_resample=_LABEL_RESAMPLE.value, mesh=_mesh(_SHARD.value))


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
