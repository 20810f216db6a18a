r"""Probe a pretrained encoder on a labelled task: linear probe and fine-tuning against training from scratch.

  python -m medjax.tools.probe --config experiments/medmnist_resnet.py:subset=breastmnist \
      --init runs/ssl/simclr_s0 --workdir runs/probe/breast [--seeds 0,1,2] [--head head] \
      [--variants scratch,linear_probe,finetune] [--steps 2000] [--init_step latest] [--config.key=value ...]

The way self-supervised papers report a pretrained encoder, on the downstream experiment `--config` (its
data, model, recipe and splits), each variant trained once per seed with `medjax.train.main`:

  scratch       the config as given, from random initialisation (an `init_from` the config has is dropped);
  linear_probe  the encoder frozen: every parameter not matched by `--head` keeps the pretrained value
                exactly (`config.optim.train_only` = the head patterns: zero updates) and batch normalisation
                runs in inference mode with the loaded running statistics (`config.freeze_batch_stats`); only
                the freshly initialised head trains. This is the linear evaluation protocol of Chen et al.
                2020 ("A Simple Framework for Contrastive Learning of Visual Representations", SimCLR, ICML;
                after Zhang et al. 2016 and Kolesnikov et al. 2019), which measures what the representation
                holds without letting the labelled data change it (the config's optim.freeze / unfreeze are
                dropped: train_only replaces them);
  finetune      every parameter trains, starting from the pretrained weights, with a new head (SimCLR's
                fine-tuning; Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?").

Every variant runs the same config with the same number of steps (`--steps` overrides config.total_steps
for all of them; the schedule's warmup and whole-step boundaries, and `optim.unfreeze` steps, are scaled by
the same factor so the recipe keeps its shape and validates), so the comparison is at an equal budget.
The pretrained weights (`--init`: a medjax workdir or a weight file, anything `config.init_from.path`
accepts) are read through `config.init_from = dict(path=INIT, step=--init_step, exclude=--head)`, keeping
the config's own init_from options (inflate, source, ...) when it has some. `--init_step` defaults to
"latest": a pretraining run rarely has a validation metric worth selecting on. `--head` takes the patterns
(`medjax.param_paths`, comma separated, default "head") of the parameters the downstream task replaces;
each must match a parameter of the model, and they must leave an encoder to probe.

Runs go to WORKDIR/<variant>/seed<k> (config.seed = k). Running the same command again resumes: a finished
run (its results.json reached config.total_steps or stopped early) is not trained again, an interrupted one
resumes from its checkpoint, and a run directory started with another config is refused (start a fresh
--workdir). Runs that read the pretrained weights train first, so a bad --init or --head fails early.

Outputs: WORKDIR/probe.json (per variant: each seed's metrics from its results.json, and their mean and
sample standard deviation) and WORKDIR/probe.md (one row per variant, headline metrics as mean ± sd over
n seeds), also printed. The metrics are the test split's at the best-validation checkpoint ("test_best/...")
when the config has a test split and a best metric, else the test split's at the last step ("test/..."),
else the last validation ("val/..."); the report names the prefix used. A user's mistake (an unknown
variant, a missing --init, no seeds, a head pattern that matches no parameter) prints one line
`medjax.tools.probe: error: ...` and exits with status 2 (tools/cli.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import flags

from medjax import atomic, build, checkpoint, config_lib, train
from medjax.build.run_settings import INIT_STEPS
from medjax.data import pipeline
from medjax.param_paths import path_str, selects
from medjax.tools import cli

VARIANTS = ("scratch", "linear_probe", "finetune")
_USES_INIT = ("linear_probe", "finetune")  # trained first: they read --init and check --head
# The metrics probe.md shows (probe.json keeps every metric of the chosen prefix), in this order.
HEADLINE = ("auc", "accuracy", "balanced_accuracy", "dice_mean", "dice_case_mean", "mae", "rmse", "pearson_r")
# results.json sections in order of preference, with the metric prefix they hold.
SOURCES = (("test_best", "test_best/"), ("test", "test/"), ("final", "val/"))
JSON_FILE, MARKDOWN_FILE = "probe.json", "probe.md"


# ------------------------------------------------------------------------------------------------ configs


def _patterns(value: Union[str, Sequence[str]], flag: str) -> Tuple[str, ...]:
  items = value.split(",") if isinstance(value, str) else list(value)
  items = tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
  if not items:
    raise cli.UsageError(f"{flag} is empty: give at least one value, separated by commas.")
  return items


def check_variants(variants: Union[str, Sequence[str]]) -> Tuple[str, ...]:
  """The variant names, without repeats; a UsageError naming an unknown one, with did-you-mean."""
  variants = _patterns(variants, "--variants")
  for name in variants:
    if name not in VARIANTS:
      raise cli.UsageError(f"--variants: unknown variant {name!r}; the variants are {', '.join(VARIANTS)}."
                           f"{config_lib.suggest(name, VARIANTS)}")
  return variants


def _init_step(value: Any) -> Any:
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  if value in INIT_STEPS or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
    return value
  raise cli.UsageError(f"--init_step must be 'best', 'latest' or a step number, got {value!r}.")


def set_steps(config: mlc.ConfigDict, steps: int) -> Dict[str, List[Any]]:
  """Sets config.total_steps = `steps` in place, scaling the keys counted in steps of the schedule by the same
  factor (warmup_steps, whole-step `boundaries` of the "step" schedule; fractions stay) and the steps of
  `optim.unfreeze`, so the recipe keeps its shape and validates. Returns {key: [old, new]} of what changed."""
  old = int(config.total_steps)
  if steps == old:
    return {}
  factor = steps / old
  changed: Dict[str, List[Any]] = {"total_steps": [old, steps]}
  config.total_steps = steps
  schedule = config.get("schedule")
  if isinstance(schedule, (dict, mlc.ConfigDict)):
    if schedule.get("warmup_steps"):
      new = min(steps, round(int(schedule["warmup_steps"]) * factor))
      changed["schedule.warmup_steps"] = [schedule["warmup_steps"], new]
      schedule["warmup_steps"] = new
    bounds = schedule.get("boundaries")
    if bounds is not None:
      single = isinstance(bounds, (int, float))
      items = (bounds,) if single else tuple(bounds)
      new_bounds = tuple(round(b * factor) if isinstance(b, int) and not isinstance(b, bool) and b >= 1 else b
                         for b in items)
      if new_bounds != items:
        changed["schedule.boundaries"] = [list(items), list(new_bounds)]
        schedule["boundaries"] = new_bounds[0] if single else new_bounds
  optim = config.get("optim")
  if isinstance(optim, (dict, mlc.ConfigDict)) and optim.get("unfreeze"):
    pairs = tuple((p, round(int(s) * factor)) for p, s in optim["unfreeze"])
    changed["optim.unfreeze"] = [[list(p) for p in optim["unfreeze"]], [list(p) for p in pairs]]
    optim["unfreeze"] = pairs
  return changed


def variant_config(config: mlc.ConfigDict, variant: str, *, seed: int, init: Optional[str],
                   head: Sequence[str], init_step: Any = "latest", steps: Optional[int] = None) -> mlc.ConfigDict:
  """A copy of `config` for `variant` (module docstring) and `seed`; `config` is left as it is."""
  c = mlc.ConfigDict(config.to_dict(), type_safe=False)
  c.seed = int(seed)
  if steps is not None:
    set_steps(c, int(steps))
  existing = c.get("init_from")
  if "init_from" in c:
    del c["init_from"]
  if variant == "scratch":
    return c
  options = {} if isinstance(existing, str) else dict(existing or {})  # keeps inflate, source, ...
  options.update(path=init, step=init_step, exclude=tuple(head))
  c.init_from = options
  if variant == "linear_probe":
    optim = c.get("optim")
    if isinstance(optim, str):
      c.optim = optim = mlc.ConfigDict(dict(name=optim), type_safe=False)
    for key in ("freeze", "unfreeze"):  # everything but the head is frozen for good
      if key in optim:
        del optim[key]
    optim.train_only = tuple(head)
    c.freeze_batch_stats = True
  return c


def parameter_paths(config: mlc.ConfigDict) -> List[str]:
  """The "/"-joined paths of the model's parameters, from an abstract init on a training example's shape (as
  `train.main` initialises it; nothing is compiled)."""
  dataset = build.dataset(config)
  source = pipeline.prepare_source(build.split_source(dataset, "train", "the training split"), config.input,
                                   seed=config.seed, num_classes=dataset.info.num_classes, for_training=True)
  image = np.asarray(source[0]["image"])
  net = build.model(config)
  key = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(lambda x: net.init({"params": key, "dropout": key}, x, train=False),
                          jax.ShapeDtypeStruct((1,) + image.shape, jnp.float32))
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]]


def check_head(head: Sequence[str], paths: Sequence[str]) -> None:
  """UsageError when a head pattern matches no parameter, or the patterns select every parameter."""
  for pattern in head:
    if not any(selects(pattern, p) for p in paths):
      shown = ", ".join(paths[-8:])
      raise cli.UsageError(f"--head: pattern {pattern!r} matches no parameter of the model; its last parameters "
                           f"are {shown}.")
  if all(any(selects(pattern, p) for pattern in head) for p in paths):
    raise cli.UsageError(f"--head {','.join(head)} selects every parameter of the model: there is no encoder "
                         "left to probe.")


# ------------------------------------------------------------------------------------------------ runs


def _read_results(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, train.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def finished_results(workdir: str, config: mlc.ConfigDict) -> Optional[Dict[str, Any]]:
  """results.json of a run in `workdir` that needs no more training, else None. Raises ConfigError when the
  workdir's run was started with another config (`checkpoint.check_config`)."""
  checkpoint.check_config(workdir, config)
  results = _read_results(workdir)
  if results is None:
    return None
  done = results.get("status") in (train.EARLY_STOPPED, train.STOPPED) or \
      int(results.get("step") or 0) >= int(config.total_steps)
  return results if done else None


def train_once(config: mlc.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> Tuple[Dict, bool]:
  """(results.json, whether it trained now) of `config` in `workdir`: trains or resumes unless finished."""
  results = finished_results(workdir, config)
  if results is not None:
    log(f"probe: {workdir} finished already (step {results.get('step')}); not trained again.")
    return results, False
  log(f"probe: training {workdir}")
  train.main(config, workdir)
  return _read_results(workdir), True


def metric_source(all_results: Sequence[Dict[str, Any]]) -> Tuple[str, str]:
  """(results.json section, metric prefix): the first of `SOURCES` that every run has."""
  for section, prefix in SOURCES:
    if all(r.get(section) for r in all_results):
      return section, prefix
  return SOURCES[-1]


def _metrics(results: Dict[str, Any], section: str, prefix: str) -> Dict[str, Optional[float]]:
  values = results.get(section) or {}
  return {k[len(prefix):]: v for k, v in sorted(values.items())
          if k.startswith(prefix) and (v is None or isinstance(v, (int, float)))}


def summarise(values: Sequence[Optional[float]]) -> Dict[str, Any]:
  """{"mean", "std" (sample, ddof=1; None for one value), "n"} over the finite values."""
  finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not finite:
    return {"mean": None, "std": None, "n": 0}
  std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
  return {"mean": float(np.mean(finite)), "std": std, "n": len(finite)}


def _cell(stats: Dict[str, Any]) -> str:
  sd = f" ± {stats['std']:.4f}" if stats["std"] is not None else ""
  return "n/a" if stats["mean"] is None else f"{stats['mean']:.4f}{sd}"


def markdown(report: Dict[str, Any]) -> str:
  """probe.md: one row per variant, the headline metrics as mean ± sample sd over n seeds."""
  present = {m for v in report["variants"].values() for m in v["summary"]}
  rank = {m: HEADLINE.index(m.removeprefix(build.PSEUDO_PREFIX)) for m in present
          if m.removeprefix(build.PSEUDO_PREFIX) in HEADLINE}
  names = sorted(rank, key=lambda m: (rank[m], m))
  if not names:  # no headline metric: the first few the runs have
    names = sorted(present)[:4]
  what = {"test_best": f"the test split at the best checkpoint by {report['best_metric']}",
          "test": "the test split at the last step", "final": "the validation split at the last step"}
  lines = [f"# Probe of {report['init']}", "",
           f"Downstream config: `{report['config']}`; steps per run: {report['total_steps']}; head: "
           f"{', '.join(report['head'])}; init step: {report['init_step']}.", "",
           f"Metrics: `{report['prefix']}...`, {what[report['section']]} (results.json's \"{report['section']}\"); "
           "mean ± sample sd over n seeds.", "",
           "| variant | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for variant, entry in report["variants"].items():
    cells = [_cell(entry["summary"].get(m, summarise([]))) for m in names]
    lines.append(f"| {variant} | {len(entry['runs'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(workdir: str, report: Dict[str, Any]) -> str:
  """Writes probe.json and probe.md into `workdir`; returns the Markdown table."""
  text = markdown(report)
  atomic.write_text_atomically(os.path.join(workdir, JSON_FILE), json.dumps(report, indent=2) + "\n")
  atomic.write_text_atomically(os.path.join(workdir, MARKDOWN_FILE), text)
  return text


def run(config: Union[str, mlc.ConfigDict], init: Optional[str], workdir: str, *, seeds: Sequence[int] = (0,),
        head: Union[str, Sequence[str]] = ("head",), variants: Union[str, Sequence[str]] = VARIANTS,
        steps: Optional[int] = None, init_step: Any = "latest", overrides: Sequence[str] = (),
        log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Trains (or resumes) every variant for every seed and writes WORKDIR/probe.json and probe.md.

  Args:
    config: an experiment spec "path.py[:arg]" or a ConfigDict: the labelled downstream task.
    init: the pretrained weights (a medjax workdir or a weight file); unused by "scratch" alone.
    workdir: the probe's folder; each run goes to workdir/<variant>/seed<k>.
    seeds, head, variants, steps, init_step: as the flags (module docstring); `head` and `variants` may be
      comma-separated strings.
    overrides: `key.path=value` overrides of the config (`config_lib.apply_overrides`, as `--config.key=value`).
  Returns:
    The report written to probe.json, plus "markdown" (the table) and "trained" (the run directories trained
    in this call).
  """
  variants = check_variants(variants)
  head = _patterns(head, "--head")
  seeds = tuple(int(s) for s in seeds)
  if not seeds:
    raise cli.UsageError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2.")
  if len(set(seeds)) != len(seeds):
    raise cli.UsageError(f"--seeds has repeats: {','.join(map(str, seeds))}.")
  if steps is not None and int(steps) < 1:
    raise cli.UsageError(f"--steps must be a positive number of steps, got {steps}.")
  init_step = _init_step(init_step)
  needs_init = any(v in _USES_INIT for v in variants)
  if needs_init:
    if not init:
      raise cli.UsageError(f"--init is required for the variants {', '.join(_USES_INIT)}.")
    init = cli.check_exists(os.path.expanduser(init), "--init")
  spec = config if isinstance(config, str) else "(a ConfigDict)"
  base = config_lib.load_config(config) if isinstance(config, str) else config
  if overrides:
    base = config_lib.apply_overrides(base, overrides)
  workdir = os.path.abspath(workdir)
  step_changes = set_steps(mlc.ConfigDict(base.to_dict(), type_safe=False), int(steps)) if steps else {}
  configs = {(v, s): variant_config(base, v, seed=s, init=init, head=head, init_step=init_step, steps=steps)
             for v in variants for s in seeds}
  for variant in variants:  # the seeds differ in config.seed only
    build.validate(configs[(variant, seeds[0])])
  if needs_init:
    check_head(head, parameter_paths(next(iter(configs.values()))))
  order = sorted(configs, key=lambda k: (k[0] not in _USES_INIT, variants.index(k[0]), seeds.index(k[1])))
  results, trained = {}, []
  for key in order:
    run_dir = os.path.join(workdir, key[0], f"seed{key[1]}")
    results[key], fresh = train_once(configs[key], run_dir, log)
    if fresh:
      trained.append(run_dir)
  section, prefix = metric_source(list(results.values()))
  any_config = next(iter(configs.values()))
  report: Dict[str, Any] = dict(
      config=spec, overrides=list(overrides), init=init, init_step=init_step, head=list(head), seeds=list(seeds),
      total_steps=int(any_config.total_steps), step_changes=step_changes,
      best_metric=build.settings(any_config).best_metric, section=section, prefix=prefix, variants={})
  for variant in variants:
    runs = []
    for seed in seeds:
      r = results[(variant, seed)]
      runs.append(dict(seed=seed, workdir=os.path.join(workdir, variant, f"seed{seed}"), step=r.get("step"),
                       status=r.get("status"), metrics=_metrics(r, section, prefix)))
    names = sorted({m for r in runs for m in r["metrics"]})
    report["variants"][variant] = dict(
        runs=runs, summary={m: summarise([r["metrics"].get(m) for r in runs]) for m in names})
  os.makedirs(workdir, exist_ok=True)
  text = write_report(workdir, report)
  log(text)
  return dict(report, markdown=text, trained=trained)


# ------------------------------------------------------------------------------------------------ CLI

_FLAGS = flags.FlagValues()  # private, so tools imported together do not clash (tools/cli.py)
_CONFIG = flags.DEFINE_string("config", None, "Downstream experiment: path.py[:arg]; --config.key=value overrides "
                              "follow as for medjax.main.", flag_values=_FLAGS)
_INIT = flags.DEFINE_string("init", None, "Pretrained weights: a medjax workdir or a weight file.", flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: <variant>/seed<k> runs, probe.json, probe.md.",
                               flag_values=_FLAGS)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, comma separated (config.seed of each run).", flag_values=_FLAGS)
_HEAD = flags.DEFINE_list("head", ["head"], "Patterns of the parameters the task replaces (new, and the only ones "
                          "the linear probe trains).", flag_values=_FLAGS)
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Any of {', '.join(VARIANTS)}.", flag_values=_FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "Steps of every run (default: config.total_steps).", flag_values=_FLAGS)
_INIT_STEP = flags.DEFINE_string("init_step", "latest", "Step of a pretrained workdir: latest, best or a number.",
                                 flag_values=_FLAGS)
_OVERRIDES: List[str] = []  # the --config.key=value arguments, split off before absl parses the flags
_OVERRIDE_PREFIX = "--config."


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(argv without `--config.a.b=v` arguments, those arguments without the prefix)."""
  rest = [a for a in argv if not a.startswith(_OVERRIDE_PREFIX)]
  return rest, [a[len(_OVERRIDE_PREFIX):] for a in argv if a.startswith(_OVERRIDE_PREFIX)]


def main(argv) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  for name, value in (("config", _CONFIG.value), ("workdir", _WORKDIR.value)):
    if not value:
      raise cli.UsageError(f"--{name} is required.")
  seeds = cli.numbers(_SEEDS.value, "seeds")
  run(_CONFIG.value, _INIT.value, _WORKDIR.value, seeds=seeds, head=_HEAD.value, variants=_VARIANTS.value,
      steps=_STEPS.value, init_step=_INIT_STEP.value, overrides=list(_OVERRIDES))
  print(f"Report: {os.path.join(os.path.abspath(_WORKDIR.value), MARKDOWN_FILE)}")


def call(argv: Sequence[str]) -> object:
  """The command line `argv` (program name first, `--config.key=value` overrides allowed) in this process, as
  `cli.call` runs a tool: for tests and notebooks."""
  rest, overrides = split_overrides(argv)
  _OVERRIDES[:] = overrides
  return cli.call(main, _FLAGS, rest)


if __name__ == "__main__":
  sys.argv[:], _OVERRIDES[:] = split_overrides(sys.argv)
  cli.run(main, _FLAGS)
