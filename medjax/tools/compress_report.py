"""Compare a trained run with its compressed variants: metrics, parameters, bytes and latency in one table.

  python -m medjax.tools.compress_report --workdir runs/breast_r18 --ptq --prune 0.5,0.8 --filters 0.5 --export
  python -m medjax.tools.compress_report --workdir runs/breast_r18 --variants runs/breast_qat,runs/breast_kd

Rows: the original (`--workdir`, its best checkpoint), each `--variants` run with its own model and weights (a
distilled student or a pruned run as it is; a QAT run as the int8 model it trained for, calibrated and
quantized as `--ptq` is), and variants of the original made here: `--ptq` int8 post-training
quantization (`medjax.compress.quantize`, calibrated on `--calibration_batches` un-augmented training batches),
`--prune` one-shot global magnitude pruning at each sparsity (no fine-tuning), `--filters` structured filter
pruning keeping that fraction of each inner ResNet convolution (no fine-tuning: its accuracy is reported as it
is), `--export` the exported predictor (`medjax.tools.export`) reloaded by its own loader.

Every row is evaluated on the same split (default: the original run's test split) exactly as
`medjax.tools.evaluate` computes metrics (`build.eval_apply_fn` with the run's flip TTA, the evaluator's
`stats_fn` and `report`), so the original's row equals evaluate.py's report. Bytes: the weights as held
(`quantize.size_bytes`: int8 one byte, float32 four), for the export folder its bytes on disk. Latency: the
median of `--repeats` forward calls on this process's default device at batch 1 and at the evaluation batch
(`medjax.compress.report`). `--out` (default WORKDIR/compress_<split>) receives report.md, report.json and
report.png. A user's mistake prints one line `medjax.tools.compress_report: error: ...` (exit status 2).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import flags

from medjax import atomic, build, checkpoint, evaluators, sharding
from medjax.compress import export as export_lib
from medjax.compress import predictor_loader, pruning, quantize, report, structured
from medjax.data import pipeline
from medjax.tools import cli

# Report metrics per task: the evaluators' headline numbers.
_METRICS = {"classification": ("auc", "accuracy"), "segmentation": ("dice_mean",), "regression": ("mae",)}


def _headline(result: dict) -> Dict[str, Optional[float]]:
  metrics = result["metrics"]
  names = _METRICS.get(result["task"], ())
  return {("dice" if k == "dice_mean" else k): metrics[k]["value"] for k in names if k in metrics}


class _Split:
  """The split every row is evaluated on, with the original run's evaluator, mesh and eval batch."""

  def __init__(self, config, dataset, source, evaluator):
    self.config, self.dataset, self.source, self.evaluator = config, dataset, source, evaluator
    self.mesh = build.mesh(config, fallback=True)
    self.batch_size = build.eval_batch_size(config, self.mesh, round_up=True)

  def host_batches(self):
    return pipeline.eval_batches(self.source, global_batch_size=self.batch_size)

  @functools.cached_property
  def ids(self) -> List[Any]:
    """The ids of the split's cases in evaluation order (evaluate.py's report keys its cases by them)."""
    ids = []
    for batch in self.host_batches():
      keep = np.asarray(batch["weight"]) > 0
      ids += [v.item() if hasattr(v, "item") else v for v in np.asarray(batch["id"])[keep]]
    return ids

  def metrics(self, model, variables, config) -> Dict[str, Optional[float]]:
    """The headline metrics of `model` with `variables`, as medjax.tools.evaluate.run computes them."""
    forward = build.eval_apply_fn(model, config,
                                  sliding_window=bool((config.get("inference") or {}).get("roi_size")))
    stats_fn = self.evaluator.stats_fn

    @jax.jit
    def eval_step(variables, batch):
      outputs, aux = forward(variables, batch["image"], train=False)
      return stats_fn(outputs, aux, batch)

    placed = jax.device_put(variables, sharding.replicated(self.mesh))
    stats = evaluators.collect(functools.partial(eval_step, placed),
                               pipeline.device_batches(self.host_batches(), self.mesh))
    return _headline(self.evaluator.report(stats, self.ids, num_samples=0))

  def metrics_of_outputs(self, outputs_fn) -> Dict[str, Optional[float]]:
    """Headline metrics of host-side `outputs_fn(images) -> logits` (an exported predictor)."""
    stats_fn = jax.jit(lambda outputs, batch: self.evaluator.stats_fn(outputs, {}, batch))

    def step(batch):
      return stats_fn(outputs_fn(np.asarray(batch["image"])), {k: v for k, v in batch.items()
                                                               if k in pipeline.DEVICE_KEYS})
    stats = evaluators.collect(step, self.host_batches())
    return _headline(self.evaluator.report(stats, self.ids, num_samples=0))

  def images(self) -> np.ndarray:
    """The first full evaluation batch's images (the latency input; padding rows are real images too)."""
    return np.asarray(next(iter(self.host_batches()))["image"])


def _timed_forward(model, variables, config):
  forward = build.eval_apply_fn(model, config, sliding_window=bool((config.get("inference") or {}).get("roi_size")))
  apply = jax.jit(lambda v, x: forward(v, x, train=False)[0])
  on_device = jax.device_put(variables)
  return lambda images: apply(on_device, images)


def _model_row(name, what, model, variables, config, split, repeats, *, params=None, nonzero=None):
  metrics = split.metrics(model, variables, config)
  return report.measure(
      name, what, _timed_forward(model, variables, config), split.images(), metrics=metrics,
      params=structured.param_count(variables["params"]) if params is None else params,
      nonzero=report.count_nonzero(variables["params"]) if nonzero is None else nonzero,
      size=quantize.size_bytes(variables), repeats=repeats)


def _qat_as_ptq(config, calibration_batches: int):
  """For a QAT run (`config.quantization.mode == "qat"` with equal weight and activation bits): its float model
  (Qwix's PTQ starts from the unwrapped one) and the PTQ options of the same bits; None for any other run, and
  for weight-only or mixed-width QAT, which Qwix's int8 convolution cannot run (evaluated fake-quantized)."""
  given = config.get("quantization")
  if not given or quantize.parse(given)["mode"] != "qat":
    return None
  try:
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    options = quantize.parse({**given, "mode": "ptq", "calibration_batches": calibration_batches})
  except ValueError:
    return None
  float_config = config.copy_and_resolve_references()
  with float_config.unlocked():
    del float_config["quantization"]
  return build.model(float_config), options


def _fractions(values: Optional[Sequence[str]], flag: str, *, low_open: bool) -> List[float]:
  out = []
  for value in values or ():
    try:
      number = float(value)
    except ValueError:
      raise cli.UsageError(f"{flag}: {value!r} is not a number.") from None
    if not (0 < number < 1 if low_open else 0 <= number < 1):
      raise cli.UsageError(f"{flag}: {value} must be in {'(0, 1)' if low_open else '[0, 1)'}.")
    out.append(number)
  return out


def _raw_images(schemes) -> Optional[Any]:
  """Inverse of the exported function's own input normalisation, when it is an elementwise affine map (MedMNIST)
  or none (synthetic data): the split's images are already normalised by the dataset. None otherwise."""
  if all(s["scheme"] == "none" for s in schemes):
    return lambda x: x
  if all(s["scheme"] in ("none", "affine") for s in schemes):
    scale = np.array([s.get("scale", 1.0) for s in schemes], np.float32)
    offset = np.array([s.get("offset", 0.0) for s in schemes], np.float32)
    return lambda x: (x - offset) / scale
  return None


def _export_row(workdir, split, repeats, out, params, nonzero) -> report.Variant:
  """The original's exported predictor (logits out), reloaded; params and nonzero are the original's (the
  folder holds the same weights)."""
  from medjax.tools import export as export_tool
  folder = os.path.join(out, "export")
  export_tool.run_export(workdir, folder, output="logits", overwrite=True)
  predictor = predictor_loader.load(folder)
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
             if os.path.isfile(os.path.join(folder, f)))
  schemes = export_lib.preprocessing_from_data_config(split.config.get("data", {}),
                                                      split.dataset.info.num_channels).inside
  raw = _raw_images(schemes)
  metrics = split.metrics_of_outputs(lambda x: predictor.predict(raw(x))) if raw else {}
  return report.measure("export", f"jax.export predictor folder reloaded by its loader ({len(os.listdir(folder))} "
                        "files, bytes on disk)", predictor.predict, split.images(), metrics=metrics,
                        params=params, nonzero=nonzero, size=size, repeats=repeats)


def run(workdir: str, *, variants: Sequence[str] = (), ptq: bool = False, calibration_batches: int = 8,
        prune: Sequence[str] = (), filters: Sequence[str] = (), export: bool = False, split: Optional[str] = None,
        repeats: int = 20, out: Optional[str] = None) -> dict:
  """Builds, evaluates and times every variant (module docstring); writes report.md/json/png into `out`.

  Flag values come as the flags hold them (lists of strings for `prune` and `filters`). Returns the report
  dict written to report.json: {"workdir", "split", "rows": [Variant.as_dict()...], "table"}. Raises
  cli.UsageError naming the flag for a bad value, and what `checkpoint.load` raises for a missing run.
  """
  if repeats < 1:
    raise cli.UsageError(f"--repeats must be >= 1, got {repeats}.")
  if calibration_batches < 1:
    raise cli.UsageError(f"--calibration_batches must be >= 1, got {calibration_batches}.")
  sparsities = _fractions(prune, "--prune", low_open=True)
  keeps = _fractions(filters, "--filters", low_open=True)
  for path in variants:
    cli.check_workdir(path, "--variants")
  workdir = os.path.abspath(workdir)
  run_config = checkpoint.load_config(workdir)
  cli.refuse_pretext_run(run_config, workdir, "compress_report")
  split = split or build.settings(run_config).test_split or "test"
  out = os.path.abspath(out or os.path.join(workdir, f"compress_{split}"))
  dataset = build.dataset(run_config)
  source = cli.split_source(dataset, split, "--split")
  if build.whole_cases(run_config, dataset.info):
    raise cli.UsageError(f"--workdir {workdir}: a run evaluated on whole cases of varying size (trained on "
                         "patches) is not supported by compress_report yet; evaluate its variants with "
                         "medjax.tools.evaluate.")
  loaded = checkpoint.load(workdir, step="best")
  config, model, variables = loaded.config, loaded.model, loaded.variables
  evaluator = build.evaluator(config, dataset.info, surface_metrics=False)
  data = _Split(config, dataset, source, evaluator)
  float_params = structured.param_count(variables["params"])
  float_nonzero = report.count_nonzero(variables["params"])

  rows = [_model_row("original", f"float run {os.path.basename(workdir)} (step {loaded.step})", model, variables,
                     config, data, repeats)]
  train_source = None
  def int8_row(name, what, model, variables, config, options):
    nonlocal train_source
    if train_source is None:
      train_source = cli.split_source(dataset, build.settings(config).train_split, "--ptq (the training split)")
    calibration = pipeline.eval_batches(train_source, global_batch_size=data.batch_size)
    qmodel, qvars = quantize.calibrate_and_quantize(model, variables, calibration, options)
    used = min(options["calibration_batches"], -(-len(train_source) // data.batch_size))  # stops at the split's end
    return _model_row(name, f"{what}int8 weights and activations (per-channel weight scales), calibrated on {used} "
                      f"training batch(es) of {data.batch_size}", qmodel, qvars, config, data, repeats,
                      params=structured.param_count(variables["params"]),
                      nonzero=report.count_nonzero(variables["params"]))

  for path in variants:
    other = checkpoint.load(os.path.abspath(path), step="best")
    name, what = os.path.basename(os.path.normpath(path)), f"run {path} (step {other.step})"
    int8 = _qat_as_ptq(other.config, calibration_batches)
    if int8 is None:
      rows.append(_model_row(name, what, other.model, other.variables, other.config, data, repeats))
    else:  # a QAT run ends in the int8 model its training simulated
      float_model, options = int8
      rows.append(int8_row(f"{name} int8", f"{what}, QAT: ", float_model, other.variables, other.config, options))
  if ptq:
    options = quantize.parse(dict(mode="ptq", calibration_batches=calibration_batches))
    rows.append(int8_row("ptq int8", "", model, variables, config, options))
  for sparsity in sparsities:
    masks = pruning.magnitude_masks(variables["params"], sparsity)
    pruned = {**variables, "params": pruning.apply_masks(variables["params"], masks)}
    rows.append(_model_row(f"prune {sparsity:g}", f"one-shot global magnitude pruning to {sparsity:.0%} of the "
                           "prunable weights, no fine-tuning (dense storage)", model, pruned, config, data, repeats))
  for keep in keeps:
    try:
      smaller = structured.prune_filters(model, variables, keep=keep)
    except (TypeError, ValueError) as e:
      raise cli.UsageError(f"--filters {keep:g}: {cli.error_message(e)}") from None
    rows.append(_model_row(f"filters {keep:g}", f"structured filter pruning keeping {keep:.0%} of each inner conv's "
                           "filters (L1), no fine-tuning", smaller.model, smaller.variables, config, data, repeats))
  os.makedirs(out, exist_ok=True)
  if export:
    rows.append(_export_row(workdir, data, repeats, out, float_params, float_nonzero))

  table = report.markdown_table(rows)
  result = {"workdir": workdir, "split": split, "checkpoint_step": loaded.step, "device": str(jax.devices()[0]),
            "rows": [r.as_dict() for r in rows], "table": table}
  report.plot(rows, os.path.join(out, "report.png"))
  text = (f"# Compression report: {os.path.basename(workdir)}, split {split!r}\n\n{table}\n\n"
          f"Latency: median of {repeats} calls on {result['device']}.\n\n![report](report.png)\n")
  atomic.write_text_atomically(os.path.join(out, "report.json"), json.dumps(result, indent=1, allow_nan=False))
  atomic.write_text_atomically(os.path.join(out, "report.md"), text)
  return result


_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_WORKDIR = flags.DEFINE_string("workdir", None, "The original (float) run directory.", flag_values=_FLAGS)
_VARIANTS = flags.DEFINE_list("variants", [], "Other run directories to compare as they are (distilled, QAT, "
                              "pruned runs).", flag_values=_FLAGS)
_PTQ = flags.DEFINE_bool("ptq", False, "Add int8 post-training quantization of the original.", flag_values=_FLAGS)
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 8, "Training batches calibrating --ptq.",
                                    flag_values=_FLAGS)
_PRUNE = flags.DEFINE_list("prune", [], "Sparsities of one-shot global magnitude pruning, e.g. 0.5,0.8.",
                           flag_values=_FLAGS)
_FILTERS = flags.DEFINE_list("filters", [], "Keep fractions of structured filter pruning (ResNets), e.g. 0.5.",
                             flag_values=_FLAGS)
_EXPORT = flags.DEFINE_bool("export", False, "Add the exported predictor, reloaded by its loader.",
                            flag_values=_FLAGS)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the run's test split).", flag_values=_FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per latency (median).", flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/compress_<split>).", flag_values=_FLAGS)


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise cli.UsageError("compress_report needs --workdir (the original run).")
  cli.check_workdir(_WORKDIR.value)
  result = run(_WORKDIR.value, variants=_VARIANTS.value, ptq=_PTQ.value, calibration_batches=_CALIBRATION.value,
               prune=_PRUNE.value, filters=_FILTERS.value, export=_EXPORT.value, split=_SPLIT.value,
               repeats=_REPEATS.value, out=_OUT.value)
  print(result["table"])
  out = _OUT.value or os.path.join(os.path.abspath(_WORKDIR.value), f"compress_{result['split']}")
  print(f"Report: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
