"""Unstructured magnitude pruning (issue 23): masks, the gradual schedule, an optax transformation, a report.

  config.pruning = dict(method="magnitude", scope="global", target=0.8, begin_step=0, end_step=None,
                        frequency=100, power=3, exclude=("stem_conv", "head"))
  tx = pruning.wrap_optimizer(tx, config.pruning, total_steps)      # optax.chain(tx, prune(...))

What is pruned: conv and dense kernels (`is_prunable`: leaves named "kernel" with ndim >= 2); biases, norm
scales/offsets and embeddings never. `exclude` takes parameter-path patterns in the one convention of every
config key naming parameters (`medjax.param_paths`: shell globs on "stage1_block0/conv1/kernel", a pattern also
selecting everything below it, so "head" == "head/*"); a pattern matching no parameter is an error.

Masks: the k = round(s * n) weights of smallest magnitude are pruned, over all prunable kernels together
(scope="global": one threshold, so layers end up with different sparsities) or in each kernel separately
(scope="layer": every kernel at s). Ties are broken by position, never by chance: the earlier parameter in the
params tree's (sorted) key order and, within it, the lower flat (C-order) index is pruned first.

Schedule (Zhu & Gupta 2017, "To prune, or not to prune"): s(t) = target + (initial - target) (1 - p)^power with
p = clip((t - begin_step) / (end_step - begin_step), 0, 1); the masks are recomputed every `frequency` steps
from begin_step on and at end_step, so the run reaches `target` exactly at end_step, then keeps those masks.
Here t counts optimizer updates (TrainState.step); s(t) is the sparsity of the params after t updates.

In training, `prune` is an optax transformation that must be the LAST element of the optimizer chain: it
replaces the update of a pruned weight p by -p, so `optax.apply_updates` gives p + (-p), which is exactly +0.0
in IEEE arithmetic. Any transformation after it (learning-rate scaling, decoupled weight decay adding wd * p,
momentum, another optimizer) would change that update and let the weight move off zero; before it, they act
on the dense gradient as usual (pruned weights' gradients still enter Adam's moments and global-norm clipping,
but their updates are overridden every step). The masks live in the optimizer state (`PruneState`, a pytree of
arrays), so Orbax checkpoints them with it and a resumed run continues with the same masks bit for bit.
Masks only ever shrink: weights pruned earlier score below every kept one and stay pruned.
Not covered by the masks: `TrainState.ema_params` (an average of past dense values only decays towards zero on
pruned weights); `apply_masks` gives the pruned EMA for evaluation or export.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.param_paths import path_str, patterns, selects
from medjax.registry import merge_options

PyTree = Any
Prunable = Callable[[str, Any], bool]

DEFAULTS = dict(
    method="magnitude",  # unstructured magnitude pruning (filter pruning is medjax.compress.structured, offline)
    scope="global",      # "global": one magnitude threshold over all prunable kernels; "layer": each at `target`
    target=0.8,          # final sparsity: fraction of the prunable weights that are zero, in [0, 1)
    initial=0.0,         # sparsity at begin_step, in [0, target]
    begin_step=0,        # first optimizer step of the schedule
    end_step=None,       # step at which `target` is reached; None = config.total_steps
    frequency=100,       # optimizer steps between two mask updates
    power=3,             # exponent of the polynomial schedule (3 in Zhu & Gupta 2017)
    exclude=(),          # parameter-path patterns never pruned (medjax.param_paths), e.g. ("stem_conv", "head")
)
METHODS = ("magnitude",)
SCOPES = ("global", "layer")
WHERE = "config.pruning"


# ------------------------------------------------------------------------------------------------ options

def _integer(options: Mapping[str, Any], key: str, minimum: int) -> int:
  value = options[key]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{WHERE}.{key} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _real(options: Mapping[str, Any], key: str) -> float:
  value = options[key]
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
    raise ValueError(f"{WHERE}.{key} must be a finite number, got {value!r}.")
  return float(value)


def parse(pruning: Mapping[str, Any]) -> Dict[str, Any]:
  """`config.pruning` merged over DEFAULTS, every key and value checked; errors name the key (unknown keys get
  a did-you-mean). Idempotent: parse(parse(x)) == parse(x). end_step stays None until `wrap_optimizer`."""
  if hasattr(pruning, "to_dict"):  # ml_collections.ConfigDict
    pruning = pruning.to_dict()
  options = merge_options(pruning, DEFAULTS, WHERE)
  if options["method"] not in METHODS:
    raise ValueError(f"{WHERE}.method must be one of {METHODS}, got {options['method']!r} (filter pruning is a "
                     "one-shot rebuild of the model: medjax.compress.structured.prune_filters).")
  if options["scope"] not in SCOPES:
    raise ValueError(f"{WHERE}.scope must be one of {SCOPES}, got {options['scope']!r}.")
  options["target"], options["initial"], options["power"] = (_real(options, k) for k in ("target", "initial", "power"))
  if not 0.0 <= options["target"] < 1.0:
    raise ValueError(f"{WHERE}.target must lie in [0, 1), got {options['target']}.")
  if not 0.0 <= options["initial"] <= options["target"]:
    raise ValueError(f"{WHERE}.initial must lie in [0, target={options['target']}], got {options['initial']}.")
  if options["power"] <= 0:
    raise ValueError(f"{WHERE}.power must be > 0, got {options['power']}.")
  options["begin_step"] = _integer(options, "begin_step", 0)
  options["frequency"] = _integer(options, "frequency", 1)
  if options["end_step"] is not None:
    options["end_step"] = _integer(options, "end_step", options["begin_step"])
  options["exclude"] = patterns(options["exclude"], f"{WHERE}.exclude")
  return options


# ------------------------------------------------------------------------------------------------ schedule

def polynomial_sparsity(step: Any, *, target: float, begin_step: int, end_step: int, initial: float = 0.0,
                        power: float = 3) -> Any:
  """Zhu & Gupta's sparsity after `step` optimizer updates: `initial` up to begin_step, `target` from end_step
  on, target + (initial - target) (1 - (step - begin_step) / (end_step - begin_step))^power in between.

  A Python int step gives a Python float (float64 arithmetic); an array step (traced inside the train step) a
  float32 array. end_step == begin_step jumps from `initial` to `target` at that step.
  """
  span = end_step - begin_step
  if span < 0:
    raise ValueError(f"polynomial_sparsity: end_step={end_step} precedes begin_step={begin_step}.")
  if isinstance(step, (int, np.integer)):
    progress = float(step >= begin_step) if span == 0 else min(max((step - begin_step) / span, 0.0), 1.0)
    return target + (initial - target) * (1.0 - progress) ** power
  t = jnp.asarray(step, jnp.float32)
  if span == 0:
    progress = (t >= begin_step).astype(jnp.float32)
  else:
    progress = jnp.clip((t - begin_step) / span, 0.0, 1.0)
  return jnp.float32(target) + jnp.float32(initial - target) * (1.0 - progress) ** power


# ------------------------------------------------------------------------------------------------ masks

def is_prunable(path: str, leaf: Any) -> bool:
  """Default rule: conv and dense kernels (a leaf named "kernel" with ndim >= 2: nn.Conv, nn.Dense,
  nn.DenseGeneral). Not biases, norm scales/offsets, embeddings ("embedding", "pos_embedding") or scalars."""
  return path.rsplit("/", 1)[-1] == "kernel" and len(getattr(leaf, "shape", ())) >= 2


def prunable_paths(params: PyTree, *, exclude: Sequence[str] = (), prunable: Prunable = is_prunable,
                   where: str = f"{WHERE}.exclude") -> Tuple[str, ...]:
  """Paths of the leaves `prunable` accepts and no `exclude` pattern selects, in tree order. Raises
  ValueError naming `where` for a pattern that selects no parameter, or when nothing is left to prune."""
  paths = [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
  exclude = patterns(exclude, where)
  for pattern in exclude:
    if not any(selects(pattern, path) for path, _ in paths):
      shown = ", ".join(path for path, _ in paths[:8]) + (", ..." if len(paths) > 8 else "")
      raise ValueError(f"{where}: pattern {pattern!r} matches no parameter. Parameters: {shown}.")
  chosen = tuple(path for path, leaf in paths
                 if prunable(path, leaf) and not any(selects(p, path) for p in exclude))
  if not chosen:
    raise ValueError(f"{where}: no prunable parameter is left (conv/dense kernels not excluded by {exclude}).")
  return chosen


def _pruned_count(sparsity: Any, n: int) -> Any:
  """k = round(s * n) (half to even): exact for a Python float s, float32 for a traced one."""
  if isinstance(sparsity, (int, float, np.floating)):
    return int(round(float(sparsity) * n))
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)


def _keep_smallest_pruned(scores: jax.Array, k: Any) -> jax.Array:
  """Bool array of scores.shape: False on the k smallest scores (ties: lower flat index first), True else.
  k may be traced: the stable sort gives every entry its rank, and the k lowest ranks are pruned."""
  if isinstance(k, int) and k == 0:  # nothing to prune (a dense start): skip the sort
    return jnp.ones(scores.shape, bool)
  flat = scores.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return (rank >= k).reshape(scores.shape)


def magnitude_masks(params: PyTree, sparsity: Any, *, scope: str = "global", exclude: Sequence[str] = (),
                    prunable: Prunable = is_prunable, masks: Optional[PyTree] = None,
                    where: str = f"{WHERE}.exclude") -> PyTree:
  """Magnitude masks of `params` at `sparsity` (Python float or traced scalar in [0, 1]).

  Returns a tree shaped like `params`: for a prunable leaf a bool array of its shape, True where the weight is
  kept; for any other leaf a scalar True (it broadcasts: keep everything). scope="global" prunes the
  round(s * n) smallest |w| over all n prunable weights, scope="layer" round(s * n_l) in each kernel; ties as in
  the module docstring. `masks`: the previous masks; the weights they prune score below every other weight
  (-1 < |w|) and stay pruned whatever the count, so masks only shrink.
  """
  if scope not in SCOPES:
    raise ValueError(f"{WHERE}.scope must be one of {SCOPES}, got {scope!r}.")
  chosen = set(prunable_paths(params, exclude=exclude, prunable=prunable, where=where))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  old = treedef.flatten_up_to(masks) if masks is not None else [None] * len(flat)
  scores: Dict[str, jax.Array] = {}
  for (path, leaf), previous in zip(flat, old):
    name = path_str(path)
    if name in chosen:
      score = jnp.abs(jnp.asarray(leaf)).astype(jnp.float32)
      scores[name] = score if previous is None else jnp.where(previous, score, -1.0)
  if scope == "global":
    total = sum(s.size for s in scores.values())
    keep_all = _keep_smallest_pruned(jnp.concatenate([s.reshape(-1) for s in scores.values()]),
                                     _pruned_count(sparsity, total))
    keep, offset = {}, 0
    for name, score in scores.items():
      keep[name] = keep_all[offset:offset + score.size].reshape(score.shape)
      offset += score.size
  else:
    keep = {name: _keep_smallest_pruned(s, _pruned_count(sparsity, s.size)) for name, s in scores.items()}
  out = []
  for (path, _), previous in zip(flat, old):
    mask = keep.get(path_str(path))
    if mask is None:
      out.append(jnp.ones((), bool))
    else:
      out.append(mask if previous is None else mask & previous)
  return treedef.unflatten(out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """`params` with the masked weights set to 0 (same dtypes), e.g. for the EMA params before evaluation."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


# ------------------------------------------------------------------------------------------------ optax

class PruneState(NamedTuple):
  """State of `prune`: `count` (int32 scalar, updates applied so far) and `masks` (as `magnitude_masks`)."""
  count: jax.Array
  masks: PyTree


def prune(*, target: float, end_step: int, begin_step: int = 0, frequency: int = 100, initial: float = 0.0,
          power: float = 3, scope: str = "global", exclude: Sequence[str] = (), prunable: Prunable = is_prunable,
          where: str = f"{WHERE}.exclude") -> optax.GradientTransformation:
  """Gradual magnitude pruning as the last optax transformation of a chain (module docstring: why last).

  Update number c (0-based; it makes the params of step t = c + 1) first recomputes the masks when t is a mask
  step (t = begin_step + i * frequency <= end_step, or t = end_step): magnitudes of the would-be params p + u,
  sparsity `polynomial_sparsity(t)`, previously pruned weights kept pruned. It then returns u where a weight is
  kept and -p where it is pruned, so p + update is exactly 0.0 there. At `init`, the masks of step 0
  (sparsity `polynomial_sparsity(0)` when begin_step == 0, else dense). `update` needs `params`.
  """
  schedule = functools.partial(polynomial_sparsity, target=target, begin_step=begin_step, end_step=end_step,
                               initial=initial, power=power)
  masks_at = functools.partial(magnitude_masks, scope=scope, exclude=exclude, prunable=prunable, where=where)

  def init_fn(params):
    sparsity = schedule(0) if begin_step == 0 else 0.0
    return PruneState(count=jnp.zeros((), jnp.int32), masks=masks_at(params, sparsity))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("pruning.prune: tx.update(updates, state, params) needs the params (masks follow them).")
    step = state.count + 1
    on_grid = (step - begin_step) % frequency == 0
    due = (step >= begin_step) & (step <= end_step) & (on_grid | (step == end_step))

    def recompute(masks):
      candidate = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
      return masks_at(candidate, schedule(step), masks=masks)

    masks = jax.lax.cond(due, recompute, lambda masks: masks, state.masks)
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
    return updates, PruneState(count=optax.safe_increment(state.count), masks=masks)

  return optax.GradientTransformation(init_fn, update_fn)


def wrap_optimizer(tx: optax.GradientTransformation, pruning: Mapping[str, Any],
                   total_steps: int) -> optax.GradientTransformation:
  """`optax.chain(tx, prune(...))` for `config.pruning` (raw or `parse`d); end_step None = total_steps.
  Raises ValueError naming the key when the schedule does not fit in `total_steps` optimizer updates."""
  options = parse(pruning)
  end = total_steps if options["end_step"] is None else options["end_step"]
  if end > total_steps:
    raise ValueError(f"{WHERE}.end_step={end} exceeds config.total_steps={total_steps}.")
  if options["begin_step"] > end:  # begin == end: one-shot pruning to `target` at that step
    raise ValueError(f"{WHERE}.begin_step={options['begin_step']} exceeds end_step={end} "
                     f"(config.total_steps={total_steps}).")
  return optax.chain(tx, prune(target=options["target"], end_step=end, begin_step=options["begin_step"],
                               frequency=options["frequency"], initial=options["initial"], power=options["power"],
                               scope=options["scope"], exclude=options["exclude"]))


def find_state(opt_state: PyTree) -> Optional[PruneState]:
  """The PruneState inside an optimizer state (e.g. `wrap_optimizer`'s chain), or None without pruning."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(s, PruneState)]
  if len(found) > 1:
    raise ValueError(f"The optimizer state holds {len(found)} PruneStates; chain `prune` once.")
  return found[0] if found else None


# ------------------------------------------------------------------------------------------------ report

@jax.jit
def _zero_counts(leaves: List[jax.Array]) -> List[jax.Array]:
  return [jnp.sum(x == 0, dtype=jnp.int32) for x in leaves]


SUMMARY_ROWS = ("prunable", "total")


def sparsity_report(params: PyTree, *, exclude: Sequence[str] = (),
                    prunable: Prunable = is_prunable) -> List[Dict[str, Any]]:
  """One row per parameter leaf, {"name": "a/b/kernel", "shape": [..], "params": n, "zeros": z, "sparsity":
  z / n}, in tree order, then two summary rows (shape []): "prunable" over the leaves `prunable` accepts and no
  `exclude` pattern selects (pass config.pruning's `exclude`: the weights the target refers to), and "total"
  over all. Exact zeros are counted (a pruned weight is exactly 0.0; so is a zero-initialised bias), on
  device, so sharded params are never gathered. JSON-ready (results.json)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  zeros = jax.device_get(_zero_counts([leaf for _, leaf in flat]))
  chosen = set(prunable_paths(params, exclude=exclude, prunable=prunable))
  rows = []
  for (path, leaf), z in zip(flat, zeros):
    n = int(np.prod(leaf.shape, dtype=np.int64))
    rows.append(dict(name=path_str(path), shape=[int(d) for d in leaf.shape], params=n, zeros=int(z),
                     sparsity=int(z) / n if n else 0.0))
  for name, selected in zip(SUMMARY_ROWS, ([r for r in rows if r["name"] in chosen], list(rows))):
    n, z = sum(r["params"] for r in selected), sum(r["zeros"] for r in selected)
    rows.append(dict(name=name, shape=[], params=n, zeros=z, sparsity=z / n if n else 0.0))
  return rows


def format_report(rows: Sequence[Mapping[str, Any]]) -> str:
  """`sparsity_report` rows as a Markdown table (sparsity in percent, one decimal; summary rows in bold)."""
  lines = ["| parameter | shape | params | zeros | sparsity |", "|---|---|---:|---:|---:|"]
  for r in rows:
    shape = "x".join(str(d) for d in r["shape"]) or "-"
    name = f"**{r['name']}**" if r["name"] in SUMMARY_ROWS and not r["shape"] else r["name"]
    lines.append(f"| {name} | {shape} | {r['params']:,} | {r['zeros']:,} | {100 * r['sparsity']:.1f}% |")
  return "\n".join(lines)


__all__ = ["DEFAULTS", "METHODS", "SCOPES", "SUMMARY_ROWS", "PruneState", "apply_masks", "find_state", "format_report",
           "is_prunable", "magnitude_masks", "parse", "polynomial_sparsity", "prunable_paths", "prune",
           "sparsity_report", "wrap_optimizer"]
