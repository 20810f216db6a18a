"""Explain a trained run's predictions: attribution maps of a few cases, as figures and a report.

  python -m medjax.tools.explain --workdir runs/demo --split val --method gradcam --num_cases 8
  python -m medjax.tools.explain --workdir DIR --method integrated_gradients --option steps=128 --nifti --html
  python -m medjax.tools.explain --workdir DIR --method gradcam --sanity --random_labels_workdir DIR2

Everything comes from the workdir (config.json names dataset and model, the checkpoint gives the weights, as for
`evaluate`). Cases: the first `--num_cases` of the split, taken in turn from each reference class for a
classification run, so every class shows. What is explained (`--target`): the predicted class (default), the
reference class, or a class index; for a segmentation run, the logits of `--region_class` (default 1) summed over
the predicted region of that class (the reference region when nothing is predicted): Grad-CAM of a class region.
Methods: `medjax.interpret.methods` (gradcam, gradcam++, saliency, gradient_x_input, smoothgrad,
integrated_gradients, occlusion, rollout); `--option k=v` passes a method option (e.g. layer=stage3, steps=128,
window=7); `--layer` is short for `--option layer=...`. The batch is split over the run's mesh like prediction.

The output folder (default WORKDIR/explain_<split>_<method>) receives:
  case_<id>.png     image | map | overlay (2D), or those three for the axial, coronal and sagittal slices through
                    the map's maximum (3D)
  overview.png      the first 16 cases in one figure on one colour scale
  maps.npz          ids, targets and the float32 maps (B, *spatial)
  case_<id>_map.nii.gz, case_<id>_image.nii.gz   with --nifti (3D): the map and the model's input on the input's
                    voxel grid and spacing (axis-aligned RAS affine; the preprocessing's crop and resampling are not
                    undone), so a viewer overlays them exactly
  explain.json, explain.md (explain.html with --html)   the cases, settings and the sanity checks
With `--sanity` (interpret.sanity; Adebayo et al. 2018, Petsiuk et al. 2018): cascading randomisation of the
weights from the head down with the Spearman rank correlation of each stage's maps to the trained model's;
deletion and insertion AUCs of the maps against random maps; with `--random_labels_workdir` (a run of the same
model trained on permuted labels), the correlation of its maps with this run's. A user's mistake prints one line
`medjax.tools.explain: error: ...` and exits with status 2 (tools/cli.py).
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from medjax import atomic, build, checkpoint, interpret
from medjax.data import io, pipeline
from medjax.interpret import figures, methods
from medjax.tools import cli

TARGETS = ("predicted", "label")
OVERVIEW_CASES = 16  # rows of overview.png (every case still gets its own figure)


def parse_options(pairs: Sequence[str]) -> Dict[str, Any]:
  """`["k=v", ...]` -> {k: literal v} (ints, floats, tuples, True/False/None; anything else stays a string)."""
  options = {}
  for pair in pairs or ():
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
      raise cli.UsageError(f"--option {pair!r}: expected key=value, e.g. --option steps=128.")
    try:
      options[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      options[key.strip()] = value.strip()
  return options


def choose_cases(source, num_cases: int, task: str) -> List[int]:
  """Indices of `num_cases` examples taken in turn from each reference class in split order (classification: a
  rare class shows too; the labels come from `source.labels()`, else from the first 32 x num_cases examples), or
  the first ones in split order (segmentation)."""
  n = min(int(num_cases), len(source))
  if task != "classification":
    return list(range(n))
  if hasattr(source, "labels"):
    labels = np.asarray(source.labels())
  else:
    labels = np.asarray([np.asarray(source[i]["label"]) for i in range(min(len(source), 32 * n))])
  if labels.ndim != 1:  # multi-label: no single class to take turns over
    return list(range(n))
  queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  chosen = []
  while len(chosen) < n and any(queues):
    for queue in queues:
      if queue and len(chosen) < n:
        chosen.append(int(queue.pop(0)))
  return sorted(chosen)


def _targets(task, logits, batch, target, region_class, num_classes):
  """(interpret target, per-case class index, per-case target description)."""
  logits = np.asarray(logits, np.float32)
  if task == "segmentation":
    predicted = logits.argmax(-1) == region_class
    reference = np.asarray(batch["label"]) == region_class if "label" in batch else np.zeros_like(predicted)
    spatial = tuple(range(1, predicted.ndim))
    use_predicted = predicted.any(axis=spatial)
    mask = np.where(use_predicted.reshape((-1,) + (1,) * len(spatial)), predicted, reference)
    if not mask.any(axis=spatial).all():
      empty = int(np.flatnonzero(~mask.any(axis=spatial))[0])
      raise cli.UsageError(f"case id {int(batch['id'][empty])}: class {region_class} is neither predicted nor in the "
                           "reference; choose another --region_class.")
    described = [f"class {region_class}, {'predicted' if p else 'reference'} region ({int(m.sum())} voxels)"
                 for p, m in zip(use_predicted, mask)]
    return interpret.RegionTarget(jnp.asarray(mask, jnp.float32), region_class), [region_class] * len(mask), described
  if target == "predicted":
    classes = logits.argmax(-1)
  elif target == "label":
    classes = np.asarray(batch["label"]).reshape(len(logits), -1)[:, 0]
  else:
    classes = np.full(len(logits), int(target))
  if ((classes < 0) | (classes >= num_classes)).any():
    raise cli.UsageError(f"--target {target}: class {int(classes.max())} is not one of the {num_classes} classes.")
  return jnp.asarray(classes, jnp.int32), [int(c) for c in classes], [f"class {int(c)} ({target})" for c in classes]


def _forward(model, variables, images):
  return jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables, images)


def run(workdir: str, *, split: str = "val", method: str = "gradcam", num_cases: int = 8, which: str = "best",
        out: Optional[str] = None, target: str = "predicted", region_class: int = 1,
        options: Optional[Dict[str, Any]] = None, nifti: bool = False, html: bool = False, sanity: bool = False,
        random_labels_workdir: Optional[str] = None, seed: int = 0) -> dict:
  """Explains `num_cases` cases of `split` with `method`; writes the files of the module docstring into `out`.

  Returns the explain.json dict: "method", "options", "cases" (id, label, class explained, its probability, the
  map's peak index and range, figure), "figures", and "sanity" with `sanity=True`.
  Raises cli.UsageError (a ValueError) for an unknown split, method or target, and what `checkpoint.load` raises.
  """
  name = methods.resolve(method)
  if target not in TARGETS and not str(target).lstrip("-").isdigit():
    raise cli.UsageError(f"--target {target!r}: choose 'predicted', 'label' or a class index.")
  workdir = os.path.abspath(workdir)
  out = os.path.abspath(out or os.path.join(workdir, f"explain_{split}_{name.replace('+', 'p')}"))
  run_config = checkpoint.load_config(workdir)
  cli.refuse_pretext_run(run_config, workdir, "explain")
  dataset = build.dataset(run_config)
  source = cli.split_source(dataset, split, "--split")
  info = dataset.info
  if info.task not in ("classification", "segmentation"):
    raise cli.UsageError(f"{workdir}: explain covers classification and segmentation runs, not {info.task!r}.")
  loaded = checkpoint.load(workdir, step=str(which))
  model, variables = loaded.model, loaded.variables
  indices = choose_cases(source, num_cases, info.task)
  examples = [source[i] for i in indices]
  mesh = build.mesh(loaded.config, fallback=True)
  pad = -len(examples) % mesh.shape[methods.DATA_AXIS]
  batch = pipeline.collate(examples + [examples[0]] * pad)
  images = jnp.asarray(batch["image"], jnp.float32)
  logits = _forward(model, variables, images)
  explained, classes, described = _targets(info.task, logits, batch, target, region_class, info.num_classes)
  options = {**methods.default_options(name, images.shape[1:-1]), **(options or {})}
  maps = np.asarray(jax.device_get(methods.explain(name, model, variables, images, explained, mesh=mesh, **options)))
  n = len(examples)
  maps, images_host = maps[:n], np.asarray(batch["image"])[:n]
  probabilities = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))[:n]
  os.makedirs(out, exist_ok=True)
  cases, overview = [], []
  for i in range(n):
    case_id = int(batch["id"][i])
    figure = f"case_{case_id}.png"
    title = f"id {case_id}: {method} of {described[i]}"
    figures.case_figure(images_host[i], maps[i], os.path.join(out, figure), title=title)
    entry = {"id": case_id, "index": indices[i], "explained": described[i], "class": classes[i],
             "peak": list(figures.peak(maps[i])), "map_min": float(maps[i].min()), "map_max": float(maps[i].max()),
             "figure": figure}
    if info.task == "classification":
      entry.update(label=np.asarray(batch["label"][i]).tolist(), predicted=int(probabilities[i].argmax()),
                   probability=float(probabilities[i, classes[i]]))
    if nifti and maps[i].ndim == 3:
      spacing = np.asarray(batch.get("spacing_mm", np.ones((n, 3)))[i], np.float64)
      for kind, array in (("map", maps[i]), ("image", images_host[i])):
        path = os.path.join(out, f"case_{case_id}_{kind}.nii.gz")
        io.write_nifti(path, io.Volume.from_array(np.asarray(array, np.float32), spacing_mm=tuple(spacing)))
        entry[f"nifti_{kind}"] = os.path.basename(path)
    cases.append(entry)
    overview.append((f"id {case_id}\n{described[i]}", images_host[i], maps[i]))
  figures.overview_figure(overview[:OVERVIEW_CASES], os.path.join(out, "overview.png"))
  np.savez_compressed(os.path.join(out, "maps.npz"), ids=np.asarray([c["id"] for c in cases]),
                      classes=np.asarray(classes[:n]), maps=maps.astype(np.float32))
  result = {"workdir": workdir, "split": split, "method": name, "description": methods.METHODS[name].description,
            "options": methods.option_summary(options), "target": target if info.task == "classification"
            else f"region of class {region_class}", "checkpoint": {"step": loaded.step, "selected": loaded.selected},
            "cases": cases, "figures": ["overview.png"] + [c["figure"] for c in cases]}
  if sanity:
    from medjax.tools import explain_sanity
    result["sanity"] = explain_sanity.checks(name, model, variables, images, explained, maps, options, n=n,
                                             seed=seed, random_labels_workdir=random_labels_workdir, which=which)
  atomic.write_text_atomically(os.path.join(out, "explain.json"), json.dumps(result, indent=1, allow_nan=False))
  atomic.write_text_atomically(os.path.join(out, "explain.md"), markdown(result))
  if html:
    atomic.write_text_atomically(os.path.join(out, "explain.html"), html_page(result))
  return result


def _lines(result: dict) -> List[str]:
  lines = [f"- run: `{result['workdir']}`, split **{result['split']}**, checkpoint step {result['checkpoint']['step']}"
           f" ({result['checkpoint']['selected']})",
           f"- method: **{result['method']}**, {result['description']}; options: {result['options'] or 'defaults'}",
           f"- explained: {result['target']}", ""]
  header = ["id", "explained", "label", "predicted", "probability", "map range", "peak"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for c in result["cases"]:
    probability = f"{c['probability']:.3f}" if "probability" in c else ""
    lines.append(f"| {c['id']} | {c['explained']} | {c.get('label', '')} | {c.get('predicted', '')} | {probability} | "
                 f"[{c['map_min']:.3g}, {c['map_max']:.3g}] | {tuple(c['peak'])} |")
  if "sanity" in result:
    from medjax.tools import explain_sanity
    lines += [""] + explain_sanity.markdown(result["sanity"])
  return lines


def markdown(result: dict) -> str:
  """explain.md: settings, the case table, the sanity checks and the figures."""
  lines = [f"# Explanations ({result['method']})", ""] + _lines(result) + ["", "## Figures", ""]
  return "\n".join(lines + [f"![{f}]({f})" for f in result["figures"]]) + "\n"


def html_page(result: dict) -> str:
  """explain.html: the Markdown's content as one page (tables kept as preformatted text)."""
  import html
  body = "\n".join(_lines(result))
  images = "".join(f"<img src='{html.escape(f)}' alt='{html.escape(f)}'><br>" for f in result["figures"])
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Explanations ({html.escape(result['method'])})"
          "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}</style></head>"
          f"<body><h1>Explanations ({html.escape(result['method'])})</h1><pre>{html.escape(body)}</pre>{images}"
          "</body></html>")


_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).", required=True,
                               flag_values=_FLAGS)
_SPLIT = flags.DEFINE_string("split", "val", "Dataset split.", flag_values=_FLAGS)
_METHOD = flags.DEFINE_string("method", "gradcam", f"One of {', '.join(methods.METHODS)}.", flag_values=_FLAGS)
_NUM_CASES = flags.DEFINE_integer("num_cases", 8, "Cases to explain.", lower_bound=1, flag_values=_FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.", flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder (default WORKDIR/explain_<split>_<method>).",
                           flag_values=_FLAGS)
_TARGET = flags.DEFINE_string("target", "predicted", "Classification: 'predicted', 'label' or a class index.",
                              flag_values=_FLAGS)
_REGION_CLASS = flags.DEFINE_integer("region_class", 1, "Segmentation: the class whose region is explained.",
                                     flag_values=_FLAGS)
_LAYER = flags.DEFINE_string("layer", None, "Grad-CAM layer (a module path; default the last feature map).",
                             flag_values=_FLAGS)
_OPTION = flags.DEFINE_multi_string("option", [], "A method option key=value (repeatable).", flag_values=_FLAGS)
_NIFTI = flags.DEFINE_bool("nifti", False, "3D: also write the maps and inputs as NIfTI.", flag_values=_FLAGS)
_HTML = flags.DEFINE_bool("html", False, "Also write explain.html.", flag_values=_FLAGS)
_SANITY = flags.DEFINE_bool("sanity", False, "Run the sanity checks (randomisation, deletion/insertion).",
                            flag_values=_FLAGS)
_RANDOM_LABELS = flags.DEFINE_string("random_labels_workdir", None, "With --sanity: a run trained on permuted labels.",
                                     flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the randomisations.", flag_values=_FLAGS)


def main(argv):
  del argv
  cli.check_workdir(_WORKDIR.value)
  if _RANDOM_LABELS.value:
    cli.check_workdir(_RANDOM_LABELS.value)
  options = parse_options(_OPTION.value)
  if _LAYER.value:
    options["layer"] = _LAYER.value
  result = run(_WORKDIR.value, split=_SPLIT.value, method=_METHOD.value, num_cases=_NUM_CASES.value,
               which=_CHECKPOINT.value, out=_OUT.value, target=_TARGET.value, region_class=_REGION_CLASS.value,
               options=options, nifti=_NIFTI.value, html=_HTML.value, sanity=_SANITY.value,
               random_labels_workdir=_RANDOM_LABELS.value, seed=_SEED.value)
  print("\n".join(_lines(result)))
  out = _OUT.value or os.path.join(result["workdir"], f"explain_{_SPLIT.value}_{result['method'].replace('+', 'p')}")
  print(f"Report: {os.path.join(out, 'explain.md')}")


if __name__ == "__main__":
  cli.run(main, _FLAGS)  # a user's mistake: one line on stderr, exit status 2 (tools/cli.py)
