"""Evaluate a trained run on a split and write a report: metrics with 95% CIs, per-case values, plots.

  python -m medjax.tools.evaluate --workdir runs/demo                     # test split, best checkpoint
  python -m medjax.tools.evaluate --workdir runs/demo --split val --checkpoint latest --html

Everything comes from the workdir: `config.json` names the dataset, model and evaluator, the checkpoint
gives the weights (EMA weights when the run kept them and evaluated with them). The whole split is
predicted: whole cases with a sliding window for a run trained on patches of segmentation cases (the same
program as the run's whole-case validation, so the scores agree), else the examples as batches (with a
sliding window when the config has `inference.roi_size`). The output
folder (default WORKDIR/eval_<split>) receives:

  report.json   metrics {"value", "low", "high"}, per-case values with ids, subgroups, curve data,
                config summary and checkpoint step
  report.md     the same for people (report.html with --html), with the plots inline
  cases.csv     the per-case table
  *.png         classification: roc_pr.png, confusion_matrix.png, calibration.png;
                segmentation: dice_per_case.png and overlays.png (best and worst cases; 3D: one z slice);
                regression: scatter.png
  explain/      with --explain METHOD: attribution maps of --explain_cases cases (medjax.tools.explain), whose
                overview figure the report shows

Host batch keys other than the model inputs and "id" that hold one scalar per case (patient_id, sex, site)
become metadata columns: "patient_id" makes the bootstrap resample patients, the others give subgroup
tables. The tool runs as a single process (the case ids are read on the host that runs it). A user's mistake
(a missing or empty workdir, an unknown split, a bad --checkpoint, a config that `build` refuses) prints one
line `medjax.tools.evaluate: error: ...` and exits with status 2 (tools/cli.py).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import jax
import numpy as np
from absl import flags

from medjax import atomic, build, checkpoint, config_lib, evaluators, inference, provenance, sharding
from medjax.data import pipeline
from medjax.data.datasets import multimodal
from medjax.evaluators import plots, render, reporting
from medjax.tools import cli

# Keys of a host batch that are neither model input nor metadata.
_NOT_METADATA = set(pipeline.DEVICE_KEYS) | {"id"}


class _Recorder:
  """Passes host batches through while keeping the ids and metadata columns of the real (weight > 0) cases."""

  def __init__(self, batches: Iterator[Dict[str, np.ndarray]]):
    self.batches = batches
    self.ids: List[Any] = []
    self.metadata: Dict[str, List[Any]] = {}

  def __iter__(self):
    for batch in self.batches:
      keep = np.asarray(batch["weight"]) > 0
      self.ids += [v.item() if hasattr(v, "item") else v for v in np.asarray(batch["id"])[keep]]
      for key, values in batch.items():
        values = np.asarray(values)
        if key not in _NOT_METADATA and values.ndim == 1:  # one scalar per case: a metadata column
          self.metadata.setdefault(key, []).extend(v.item() if hasattr(v, "item") else v for v in values[keep])
      yield batch


def _config_summary(config) -> dict:
  keys = ("model_name", "model", "data", "evaluator", "loss", "compute_dtype", "total_steps", "seed",
          "inference", "best_metric", "ema_decay")
  plain = json.loads(config_lib.to_json(config))
  return {k: plain[k] for k in keys if k in plain}


def _segmentation_overlays(report, source, forward_batch, num_classes, class_names, out) -> List[str]:
  """Best and worst cases by mean foreground Dice, predicted again (only those) for the overlay figure."""
  cases = report["cases"]
  scored = [(c["dice_case_mean"], i) for i, c in enumerate(cases) if c.get("dice_case_mean") is not None]
  if not scored:
    return []
  scored.sort()
  chosen = [("best", scored[-1][1])] + ([("worst", scored[0][1])] if len(scored) > 1 else [])
  examples = [source[i] for _, i in chosen]
  predictions = forward_batch(examples)
  rows = [(f"{tag} (id {cases[i]['id']}, Dice {cases[i]['dice_case_mean']:.3f})", ex["image"], ex["label"], pred)
          for (tag, i), ex, pred in zip(chosen, examples, predictions)]
  return [plots.overlays(rows, num_classes, os.path.join(out, "overlays.png"), class_names)]


def _write_plots(report, evaluator, out, overlay_fn) -> List[str]:
  task = report["task"]
  written = []
  if task == "classification":
    curves = report["curves"]
    written.append(plots.roc_pr(curves, os.path.join(out, "roc_pr.png")))
    cm = curves["confusion_matrix"]
    per_label = report.get("classification_task") == "multi-label"
    written.append(plots.confusion(
        cm["matrix"], cm["rows"], cm["columns"], os.path.join(out, "confusion_matrix.png"),
        title="Per-label counts at the threshold" if per_label else plots.CONFUSION_TITLE))
    written.append(plots.calibration(curves["calibration"], os.path.join(out, "calibration.png")))
  elif task == "segmentation":
    names = [f"dice/{c}" for c in evaluator.reported_names]
    values = {n.split("/", 1)[1]: [c.get(n) for c in report["cases"]] for n in names}
    written.append(plots.case_boxplot(values, os.path.join(out, "dice_per_case.png")))
    written += overlay_fn()
  elif task == "regression":
    scatter = report["curves"]["scatter"]
    written.append(plots.scatter(scatter["prediction"], scatter["target"], os.path.join(out, "scatter.png")))
  return [os.path.basename(p) for p in written]


def run(workdir: str, *, split: str = "test", which: str = "best", out: Optional[str] = None,
        num_samples: int = 1000, seed: int = 0, surface_metrics: bool = True, html: bool = False,
        explain: Optional[str] = None, explain_cases: int = 8, absent: Sequence[str] = ()) -> dict:
  """Evaluates `workdir`'s checkpoint `which` on `split`; writes the report files into `out`.

  Args:
    workdir: a medjax run directory (config.json + checkpoints/).
    split: dataset split to evaluate ("test", "val", ...).
    which: "best" (by the run's best_metric; the latest step when it has none), "latest" or a step number.
    out: output folder; default `workdir/eval_<split>`.
    num_samples: bootstrap resamples for the confidence intervals (0: no intervals).
    seed: bootstrap seed.
    surface_metrics: for segmentation, also HD95 and ASSD (host side, slower on large volumes).
    html: also write report.html.
    explain: an attribution method (`medjax.tools.explain`, e.g. "gradcam"): also explain `explain_cases` cases of the
      split into `out/explain/`; the report links their overview figure and lists them under "explain".
    absent: multimodal runs: sources (image modality names, "tabular") made missing in every case of the split
      (`multimodal.WithAbsent`), to measure what the model loses without them; the default `out` becomes
      `workdir/eval_<split>_without_<names>`.
  Returns: the report dict as written to report.json.
  Raises: cli.UsageError (a ValueError) naming the splits for an unknown `split`; what `checkpoint.load`
    raises for a missing workdir or checkpoint step; ConfigError for a config `build` refuses.
  """
  workdir = os.path.abspath(workdir)
  absent = tuple(absent or ())
  suffix = f"_without_{'_'.join(absent)}" if absent else ""
  out = os.path.abspath(out or os.path.join(workdir, f"eval_{split}{suffix}"))
  # The split first, from the config alone: a mistyped --split fails before any weights are read.
  run_config = checkpoint.load_config(workdir)
  cli.refuse_pretext_run(run_config, workdir, "evaluate")
  dataset = build.dataset(run_config)
  source = cli.split_source(dataset, split, "--split")
  if absent:
    try:
      source = multimodal.WithAbsent(source, absent)
    except ValueError as e:
      raise cli.UsageError(f"--absent: {e}") from None
  loaded = checkpoint.load(workdir, step=str(which))  # the run's model, compute dtype and EMA choice
  config, model, step = loaded.config, loaded.model, loaded.step
  evaluator = build.evaluator(config, dataset.info, surface_metrics=surface_metrics)

  mesh = build.mesh(config, fallback=True)  # the run's mesh when this machine can build it
  batch_size = build.eval_batch_size(config, mesh, round_up=True)
  variables = jax.device_put(loaded.variables, sharding.replicated(mesh))
  # Whole cases of varying size (a run trained on patches): one case per batch on its sliding-window canvas,
  # its windows split over the mesh, exactly as the run's validation did. Otherwise batches of examples, with
  # a sliding window when the config sets inference.roi_size.
  whole = build.whole_cases(config, dataset.info)
  if whole:
    cases = build.case_evaluation(model, config, evaluator.stats_fn, mesh)
    eval_step = cases.step
    recorder = _Recorder(pipeline.case_batches(source, cases.place))
    device_batches = pipeline.device_batches(iter(recorder), mesh, replicate=True)
  else:
    forward = build.eval_apply_fn(model, config, sliding_window=bool((config.get("inference") or {}).get("roi_size")))

    @jax.jit
    def eval_step(variables, batch):
      outputs, aux = forward(variables, batch["image"], train=False)
      return evaluator.stats_fn(outputs, aux, batch)

    predict = jax.jit(lambda variables, images: forward(variables, images, train=False)[0].argmax(-1))
    recorder = _Recorder(pipeline.eval_batches(source, global_batch_size=batch_size))
    device_batches = pipeline.device_batches(iter(recorder), mesh)
  stats = evaluators.collect(functools.partial(eval_step, variables), device_batches)
  report = evaluator.report(stats, recorder.ids, recorder.metadata or None, num_samples=num_samples, seed=seed)
  report.update(workdir=workdir, split=split, absent=list(absent), out=out, config=_config_summary(config),
                checkpoint={"step": step, "selected": loaded.selected,
                            "saved_metrics": reporting.json_safe(loaded.metrics)},
                env=provenance.read(workdir))

  def forward_examples(examples):
    """Argmax predictions of a few examples: whole cases one at a time, cropped from their canvases; else
    padded to the eval batch so the compiled shapes are reused."""
    if whole:
      predictions = []
      for example in examples:
        placed = pipeline.collate([cases.place(example)])
        batch = sharding.host_to_replicated({k: v for k, v in placed.items() if k in pipeline.DEVICE_KEYS}, mesh)
        prediction = np.asarray(jax.device_get(cases.predict(variables, batch)))[0]
        predictions.append(inference.crop_to_case(prediction, placed["mask"][0]))
      return predictions
    padded = pipeline.collate(list(examples) + [examples[0]] * (batch_size - len(examples)))
    batch = sharding.host_to_global({k: v for k, v in padded.items() if k in pipeline.DEVICE_KEYS}, mesh)
    return np.asarray(jax.device_get(predict(variables, batch["image"])))[:len(examples)]

  os.makedirs(out, exist_ok=True)
  overlay_fn = lambda: _segmentation_overlays(report, source, forward_examples, dataset.info.num_classes,
                                              dataset.info.class_names, out)
  report["plots"] = _write_plots(report, evaluator, out, overlay_fn)
  if explain:
    from medjax.tools import explain as explain_tool
    explained = explain_tool.run(workdir, split=split, method=explain, num_cases=explain_cases, which=str(which),
                                 out=os.path.join(out, "explain"), html=html)
    report["explain"] = {key: explained[key] for key in ("method", "description", "options", "target", "cases")}
    report["plots"].append(os.path.join("explain", "overview.png"))
  atomic.write_text_atomically(os.path.join(out, "report.json"), json.dumps(report, indent=1, allow_nan=False))
  atomic.write_text_atomically(os.path.join(out, "report.md"), render.markdown(report, report["plots"]))
  atomic.write_text_atomically(os.path.join(out, "cases.csv"), render.cases_csv(report))
  if html:
    atomic.write_text_atomically(os.path.join(out, "report.html"), render.html_page(report, report["plots"]))
  return report


_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).", required=True,
                               flag_values=_FLAGS)
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to evaluate.", flag_values=_FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.", flag_values=_FLAGS)
flags.register_validator("checkpoint", lambda v: v in ("best", "latest") or str(v).isdigit(),
                         "must be 'best', 'latest' or a step number", flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/eval_<split>).", flag_values=_FLAGS)
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the 95% CIs (0: none).",
                                  flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.", flag_values=_FLAGS)
_SURFACE = flags.DEFINE_bool("surface_metrics", True, "Segmentation: also HD95 and ASSD.", flag_values=_FLAGS)
_HTML = flags.DEFINE_bool("html", False, "Also write report.html.", flag_values=_FLAGS)
_EXPLAIN = flags.DEFINE_string("explain", None, "Also explain cases with this attribution method (e.g. gradcam) into "
                               "OUT/explain (medjax.tools.explain).", flag_values=_FLAGS)
_EXPLAIN_CASES = flags.DEFINE_integer("explain_cases", 8, "Cases --explain shows.", lower_bound=1, flag_values=_FLAGS)
_ABSENT = flags.DEFINE_list("absent", [], "Multimodal runs: sources made missing in every case (e.g. t2,tabular).",
                            flag_values=_FLAGS)


def main(argv):
  del argv
  cli.check_workdir(_WORKDIR.value)
  report = run(_WORKDIR.value, split=_SPLIT.value, which=_CHECKPOINT.value, out=_OUT.value,
               num_samples=_BOOTSTRAP.value, seed=_SEED.value, surface_metrics=_SURFACE.value, html=_HTML.value,
               explain=_EXPLAIN.value, explain_cases=_EXPLAIN_CASES.value, absent=_ABSENT.value)
  out = report["out"]
  shown = {k: v for k, v in report["metrics"].items() if k != "num_cases"}
  for name, entry in shown.items():
    ci = f" [{entry['low']:.4f}, {entry['high']:.4f}]" if entry["low"] is not None else ""
    value = "n/a" if entry["value"] is None else f"{entry['value']:.4f}"
    print(f"{name}: {value}{ci}")
  print(f"Report: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
