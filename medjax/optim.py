"""Optimizers, learning-rate schedules and `make_optimizer(config) -> (tx, schedule_fn)`.

Config keys read (see notes/CONTRACTS.md):
  optim = dict(name="adamw", wd=1e-5, **optimizer kwargs)   # or just the name as a string
  lr = 3e-4                                                 # peak learning rate
  schedule = dict(decay="cosine", warmup_steps=100, warmup_init=0.0, **schedule kwargs)  # missing -> constant
  total_steps = 2_000                                       # optimizer updates, warmup included
  grad_clip_norm = 1.0                                      # None or 0 = off
Parameter groups (optional keys inside config.optim; absent = every parameter trains at the schedule's rate):
  freeze = ("stem", "layer1/*")       # these parameters get exactly zero updates
  train_only = ("head",)              # the complement: everything NOT matched is frozen (linear probing)
  lr_multipliers = {"backbone": 0.1}  # or (("backbone", 0.1), ...) pairs; lr(step) * multiplier
  layer_decay = 0.75                  # layer-wise lr decay (BEiT/ELECTRA), needs layer_groups
  layer_groups = ("stem", "layer1", "layer2", "layer3", "layer4", "head")  # ordered input -> output
A parameter's path is its "/"-joined key path in the params tree (no leading "params"), e.g.
"layer1/block0/conv1/kernel". Patterns (freeze, train_only, lr_multipliers) are shell globs matched with
`fnmatch.fnmatchcase` against the whole path; `*` also matches "/", and a pattern also selects every parameter
below a matching path, so "stem" == "stem/*" selects the whole "stem" subtree. Every pattern must match at
least one parameter (else an error naming it, with a few real paths). freeze and train_only are mutually
exclusive. Frozen parameters get zero updates (bit-identical forever), no weight decay and no optimizer
state, and their gradients are zeroed before clipping, so `grad_clip_norm` sees the trainable ones only.
lr_multipliers: given as (pattern, multiplier) pairs the first matching pattern wins; given as a mapping (whose
order ml_collections does not keep: ConfigDict sorts keys) a parameter matched by two patterns with different
multipliers is an error. Unmatched parameters keep multiplier 1.
layer_decay = d with n layer_groups: a parameter belongs to group i (0-based) if its path equals
layer_groups[i] or starts with layer_groups[i] + "/"; it must be in exactly one group unless frozen (else an
error naming it). Its multiplier is d ** (n - 1 - i): the last group (the head) trains at the full rate.
The effective rate is lr_multiplier * layer factor * schedule(step), i.e. the whole optimizer update of the
parameter (decoupled weight decay included) is scaled, as torch's per-param-group lr does. Each distinct
effective multiplier is one optax.multi_transform group with its own optimizer and state; clipping stays
global. The groups are a pure function of config + params tree, so a resumed run stays bit-exact. Gradual
unfreezing and BatchNorm-statistics freezing are not handled here.

`grad_accum_steps` is not handled here: the train step accumulates gradients and calls `tx.update` once per
optimizer step, so every `*_steps` above counts optimizer updates.

Weight-decay rule (all optimizers): a parameter is decayed iff it has ndim >= 2, i.e. conv and dense kernels
and embeddings are decayed, while biases, norm scales/offsets and other vectors/scalars are not (see
`decay_mask`). For "adamw" the decay is decoupled (optax.adamw: p -= lr * wd * p, outside the Adam moments);
for "adam", "sgd" and "rmsprop" it is the classic L2 term `wd * p` added to the gradient before the
optimizer, as torch's `weight_decay` does.

The schedule function maps an integer step (Python int or traced array) to a float32 learning rate and is
pure, so the train loop can log `schedule_fn(step)`; optax calls it with its own update count, which equals
`TrainState.step` when both start at 0.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from medjax.registry import Registry
import itertools

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")

ScheduleFn = Callable[[Any], jax.Array]


# ----------------------------------------------------------------------------------------------- masks


def decay_mask(params: Any) -> Any:
  """Pytree of bools like `params`: True where weight decay applies (leaf ndim >= 2).

  Works on arrays and on abstract leaves (anything with `.shape`, e.g. jax.ShapeDtypeStruct), so it can be
  evaluated under `jax.eval_shape`. Scalars and 1-D leaves (biases, norm scales, norm offsets) get False.
  """
  return jax.tree.map(lambda p: len(getattr(p, "shape", ())) >= 2, params)


def _with_l2(wd: float, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Adds the masked L2 gradient term `wd * p` before `tx` (coupled weight decay); identity for wd == 0."""
  if not wd:
    return tx
  return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)


# ------------------------------------------------------------------------------------------ optimizers


@OPTIMIZERS.register("adam")
def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         wd: float = 0.0) -> optax.GradientTransformation:
  """Adam; `wd` is coupled L2 (added to the gradient), masked to ndim >= 2 leaves."""
  return _with_l2(wd, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


@OPTIMIZERS.register("adamw")
def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          wd: float = 1e-4) -> optax.GradientTransformation:
  """AdamW with decoupled weight decay `p -= lr(step) * wd * p`, masked to ndim >= 2 leaves."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)


@OPTIMIZERS.register("sgd")
def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False,
        wd: float = 0.0) -> optax.GradientTransformation:
  """SGD with optional (Nesterov) heavy-ball momentum; `wd` is coupled L2, masked to ndim >= 2 leaves."""
  if nesterov and not momentum:
    raise ValueError("optimizer 'sgd': nesterov=True needs momentum > 0.")
  return _with_l2(wd, optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


@OPTIMIZERS.register("rmsprop")
def rmsprop(learning_rate, decay: float = 0.9, eps: float = 1e-8, momentum: float = 0.0,
            centered: bool = False, wd: float = 0.0) -> optax.GradientTransformation:
  """RMSProp (optax semantics: eps inside the square root); `wd` is coupled L2, masked to ndim >= 2."""
  return _with_l2(wd, optax.rmsprop(learning_rate, decay=decay, eps=eps, momentum=momentum or None,
                                    centered=centered))


# ------------------------------------------------------------------------------------------- schedules
# Each registered schedule is `f(peak_value, total_steps, warmup_steps, **kw) -> fn(step)`; `fn` only has to
# be right for step >= warmup_steps (the linear warmup in `make_schedule` covers the steps before) and counts
# steps from 0, warmup included. Builders do all checks in Python and touch no device.


def _remaining(step, total_steps: int, warmup_steps: int) -> jax.Array:
  """Fraction in [0, 1] of the post-warmup span still ahead at `step` (float32).

  Computed as (total - step) / span rather than 1 - progress: near the end of training the latter loses
  most float32 digits to cancellation (relative error ~1e-5 at 1000 steps).
  """
  span = max(1, total_steps - warmup_steps)
  return jnp.clip((total_steps - jnp.asarray(step, jnp.float32)) / span, 0.0, 1.0)


@SCHEDULES.register("constant")
def constant(peak_value: float, total_steps: int, warmup_steps: int) -> ScheduleFn:
  """lr = peak after warmup."""
  del total_steps, warmup_steps
  return lambda step: jnp.full((), peak_value, jnp.float32)


@SCHEDULES.register("step")
def step_schedule(peak_value: float, total_steps: int, warmup_steps: int, boundaries: Sequence[float],
                  factor: float = 0.1) -> ScheduleFn:
  """Piecewise constant: lr = peak * factor ** (number of boundaries <= step).

  `boundaries` are absolute steps (ints) or fractions of `total_steps` (floats in (0, 1)); e.g. MedMNIST's
  x0.1 at 50% and 75% of training is `boundaries=(0.5, 0.75), factor=0.1`. The new rate applies from the
  boundary step itself. Boundaries must be increasing and lie in [warmup_steps, total_steps].
  """
  if isinstance(boundaries, (int, float)):
    boundaries = (boundaries,)
  steps = []
  for b in boundaries:
    if isinstance(b, bool) or not isinstance(b, (int, float)):
      raise ValueError(f"schedule 'step': boundaries must be numbers, got {b!r}.")
    if isinstance(b, float) and 0.0 < b < 1.0:
      steps.append(int(round(b * total_steps)))
    elif float(b).is_integer():
      steps.append(int(b))
    else:
      raise ValueError(f"schedule 'step': boundary {b!r} is neither a fraction in (0, 1) nor a whole step.")
  if any(b2 <= b1 for b1, b2 in itertools.pairwise(steps)):
    raise ValueError(f"schedule 'step': boundaries must be strictly increasing, got steps {steps}.")
  if steps and (steps[0] < warmup_steps or steps[-1] > total_steps):
    raise ValueError(f"schedule 'step': boundary steps {steps} must lie in [warmup_steps={warmup_steps}, "
                     f"total_steps={total_steps}].")
  # Precomputed per-interval rates, so the traced function is a lookup (no float32 pow drift).
  rates = tuple(peak_value * factor ** i for i in range(len(steps) + 1))

  def fn(s):
    idx = jnp.sum(jnp.asarray(s) >= jnp.asarray(steps, jnp.int32)) if steps else 0
    return jnp.asarray(rates, jnp.float32)[idx]

  return fn


@SCHEDULES.register("exponential")
def exponential(peak_value: float, total_steps: int, warmup_steps: int, decay_rate: float = 0.1,
                transition_steps: Optional[int] = None, staircase: bool = False) -> ScheduleFn:
  """lr = peak * decay_rate ** ((step - warmup) / transition_steps); floor of the exponent if `staircase`.

  `transition_steps` defaults to the post-warmup span, so the rate reaches peak * decay_rate at the end.
  """
  if not decay_rate > 0.0:
    raise ValueError(f"schedule 'exponential': decay_rate must be > 0, got {decay_rate!r}.")
  if transition_steps is None:
    transition_steps = max(1, total_steps - warmup_steps)
  if not transition_steps > 0:
    raise ValueError(f"schedule 'exponential': transition_steps must be > 0, got {transition_steps!r}.")

  def fn(s):
    exponent = jnp.maximum(jnp.asarray(s, jnp.float32) - warmup_steps, 0.0) / transition_steps
    if staircase:
      exponent = jnp.floor(exponent)
    return (peak_value * jnp.power(jnp.float32(decay_rate), exponent)).astype(jnp.float32)

  return fn


@SCHEDULES.register("cosine")
def cosine(peak_value: float, total_steps: int, warmup_steps: int, alpha: float = 0.0) -> ScheduleFn:
  """Half-cosine from peak at the end of warmup to `alpha * peak` at `total_steps` (then flat)."""
  end = alpha * peak_value

  def fn(s):
    # 0.5 * (1 + cos(pi * t)) with t = 1 - r, written as sin^2(pi * r / 2) to stay accurate as r -> 0.
    r = _remaining(s, total_steps, warmup_steps)
    return (end + (peak_value - end) * jnp.sin(0.5 * jnp.pi * r) ** 2).astype(jnp.float32)

  return fn


@SCHEDULES.register("polynomial")
def polynomial(peak_value: float, total_steps: int, warmup_steps: int, power: float = 1.0,
               end_value: float = 0.0) -> ScheduleFn:
  """lr = end + (peak - end) * (1 - t) ** power, t the post-warmup progress; nnU-Net's "poly" is power=0.9."""

  def fn(s):
    r = _remaining(s, total_steps, warmup_steps)
    return (end_value + (peak_value - end_value) * jnp.power(r, power)).astype(jnp.float32)

  return fn


def make_schedule(name: str, peak_value: float, total_steps: int, warmup_steps: int = 0,
                  warmup_init: float = 0.0, **kwargs) -> ScheduleFn:
  """Schedule `name` with a linear warmup from `warmup_init` (step 0) to `peak_value` (step warmup_steps).

  Returns fn(step) -> float32 scalar learning rate; jittable, step may be a Python int or int array.
  """
  decay_fn = SCHEDULES.get(name)(peak_value, total_steps, warmup_steps, **kwargs)
  if not warmup_steps:
    return decay_fn

  def fn(s):
    s_f = jnp.asarray(s, jnp.float32)
    warm = warmup_init + (peak_value - warmup_init) * s_f / warmup_steps
    return jnp.where(s_f < warmup_steps, warm, decay_fn(s)).astype(jnp.float32)

  return fn


# ------------------------------------------------------------------------------------- config reading

_SCHEDULE_SPEC_KEYS = ("peak_value", "total_steps", "warmup_steps")  # supplied by us, not by the config
_SCHEDULE_CONFIG_KEYS = ("decay", "warmup_steps", "warmup_init")


def _kwarg_names(fn: Callable, skip: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(all keyword names, required keyword names) of `fn`, leaving out the names in `skip`."""
  names, required = [], []
  for p in inspect.signature(fn).parameters.values():
    if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    names.append(p.name)
    if p.default is p.empty:
      required.append(p.name)
  return tuple(names), tuple(required)


def _check_keys(where: str, what: str, given: Sequence[str], valid: Sequence[str],
                required: Sequence[str] = ()) -> None:
  for key in given:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{where}: unknown key {key!r} for {what}.{hint} Valid: {', '.join(sorted(valid))}.")
  missing = [k for k in required if k not in given]
  if missing:
    raise ValueError(f"{where}: {what} needs {', '.join(repr(k) for k in missing)}.")


def _get(config: Any, key: str, default: Any = None) -> Any:
  try:
    value = config.get(key, default)
  except AttributeError:  # plain object with attributes
    value = getattr(config, key, default)
  return default if value is None and default is not None else value


def _as_dict(value: Any, where: str) -> Dict[str, Any]:
  if value is None:
    return {}
  if isinstance(value, str):
    return {"name": value}
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ValueError(f"{where} must be a dict (or a name string), got {type(value).__name__}.")
  return dict(value)


def _number(value: Any, where: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  if ok and integer:
    ok = float(value).is_integer()
  if not ok or value < minimum:
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{where} must be {kind} >= {minimum:g}, got {value!r}.")
  return int(value) if integer else float(value)


# ------------------------------------------------------------------------------------- parameter groups

_GROUP_KEYS = ("freeze", "train_only", "lr_multipliers", "layer_decay", "layer_groups")
_FROZEN = "frozen"


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _selects(pattern: str, path: str) -> bool:
  """True if the glob `pattern` matches `path` or one of its ancestors (so "stem" selects "stem/conv/kernel")."""
  return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def _strings(value: Any, where: str) -> Tuple[str, ...]:
  value = (value,) if isinstance(value, str) else tuple(value or ())
  if not all(isinstance(v, str) and v for v in value):
    raise ValueError(f"{where} must be a non-empty string or a sequence of them, got {value!r}.")
  return value


def _resolve_groups(optim: Dict[str, Any]) -> Optional[Dict[str, Any]]:
  """Pops and checks the parameter-group keys of config.optim; None when none is set."""
  given = {k: optim.pop(k) for k in _GROUP_KEYS if k in optim}
  if all(v is None or (hasattr(v, "__len__") and not len(v)) for v in given.values()):
    return None  # the plain transformation, so runs without groups keep their optimizer state layout
  freeze = _strings(given.get("freeze"), "config.optim.freeze")
  train_only = _strings(given.get("train_only"), "config.optim.train_only")
  if freeze and train_only:
    raise ValueError(f"config.optim.freeze={freeze} and config.optim.train_only={train_only} are mutually "
                     "exclusive: train_only freezes everything it does not match.")
  mults = given.get("lr_multipliers") or ()
  ordered = not isinstance(mults, Mapping) and not hasattr(mults, "to_dict")
  pairs = tuple(mults) if ordered else tuple(_as_dict(mults, "config.optim.lr_multipliers").items())
  if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and p[0] for p in pairs):
    raise ValueError("config.optim.lr_multipliers must be a {pattern: multiplier} mapping or a sequence of "
                     f"(pattern, multiplier) pairs, got {mults!r}.")
  pairs = tuple((p, _number(m, f"config.optim.lr_multipliers[{p!r}]")) for p, m in pairs)
  decay, layers = given.get("layer_decay"), _strings(given.get("layer_groups"), "config.optim.layer_groups")
  if (decay is None) != (not layers):
    raise ValueError("config.optim.layer_decay and config.optim.layer_groups must be given together, got "
                     f"layer_decay={decay!r}, layer_groups={layers!r}.")
  if decay is not None:
    decay = _number(decay, "config.optim.layer_decay")
    if decay <= 0.0 or len(set(layers)) != len(layers):
      raise ValueError(f"config.optim.layer_decay must be > 0 and config.optim.layer_groups unique, got "
                       f"{decay!r} and {layers}.")
  layer_factors = tuple(decay ** (len(layers) - 1 - i) for i in range(len(layers))) if layers else (1.0,)
  # Every multiplier a parameter can get, known before the params tree is, since multi_transform needs
  # its transformations up front; sorted so the group names (and the optimizer state) are deterministic.
  multipliers = sorted({m * f for m in {1.0, *(m for _, m in pairs)} for f in layer_factors})
  return dict(frozen_patterns=freeze or train_only, train_only=bool(train_only), pairs=pairs, ordered=ordered,
              layers=layers, layer_factors=layer_factors, multipliers=multipliers)


def _no_match_error(key: str, pattern: str, paths: Sequence[str]) -> ValueError:
  shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
  return ValueError(f"config.optim.{key}: pattern {pattern!r} matches no parameter. Parameters: {shown}.")


def _group_labels(g: Mapping[str, Any], params: Any) -> Any:
  """Pytree of group names like `params`: "frozen" or "group<k>", k indexing g["multipliers"].

  Raises ValueError for patterns that match nothing and for parameters in no (or several) layer groups.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_path_str(p) for p, _ in leaves]
  frozen_key = "train_only" if g["train_only"] else "freeze"
  for key, patterns in ((frozen_key, g["frozen_patterns"]), ("lr_multipliers", [p for p, _ in g["pairs"]])):
    for pattern in patterns:
      if not any(_selects(pattern, path) for path in paths):
        raise _no_match_error(key, pattern, paths)
  labels = []
  for path in paths:
    hit = any(_selects(p, path) for p in g["frozen_patterns"])
    if hit != g["train_only"]:
      labels.append(_FROZEN)
      continue
    matched = [(p, m) for p, m in g["pairs"] if _selects(p, path)]
    if not g["ordered"] and len({m for _, m in matched}) > 1:
      raise ValueError(f"config.optim.lr_multipliers: parameter {path!r} is matched by patterns "
                       f"{[p for p, _ in matched]} with different multipliers; give (pattern, multiplier) pairs "
                       "to make the first match win.")
    factor = 1.0
    if g["layers"]:
      groups = [i for i, prefix in enumerate(g["layers"]) if path == prefix or path.startswith(prefix + "/")]
      if len(groups) != 1:
        what = "no layer group" if not groups else f"several layer groups {[g['layers'][i] for i in groups]}"
        raise ValueError(f"config.optim.layer_groups: parameter {path!r} is in {what}; groups: {g['layers']}.")
      factor = g["layer_factors"][groups[0]]
    labels.append(f"group{g['multipliers'].index((matched[0][1] if matched else 1.0) * factor)}")
  return jax.tree_util.tree_unflatten(treedef, labels)


def _grouped(g: Mapping[str, Any], make_tx: Callable[[float], optax.GradientTransformation],
             clip: Optional[float]) -> optax.GradientTransformation:
  """[zero frozen grads] -> [global clip] -> multi_transform(one `make_tx(multiplier)` per group, frozen: 0)."""
  labels = functools.partial(_group_labels, g)
  transforms = {f"group{k}": make_tx(m) for k, m in enumerate(g["multipliers"])}
  parts = []
  if g["frozen_patterns"]:
    transforms[_FROZEN] = optax.set_to_zero()
    # Zeroed before clipping so the global norm is that of the trainable gradients, as with torch's
    # requires_grad=False; set_to_zero keeps no state.
    parts.append(optax.masked(optax.set_to_zero(), lambda t: jax.tree.map(lambda s: s == _FROZEN, labels(t))))
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def _resolve(config: Any) -> Dict[str, Any]:
  """Reads and checks every optimizer/schedule key of `config`; builds nothing."""
  optim = _as_dict(_get(config, "optim"), "config.optim")
  if "name" not in optim:
    raise ValueError("config.optim: missing 'name' (one of "
                     f"{', '.join(OPTIMIZERS.names())}).")
  opt_name = optim.pop("name")
  if opt_name not in OPTIMIZERS:
    raise KeyError(f"config.optim.name: {OPTIMIZERS.unknown_message(opt_name)}")
  opt_fn = OPTIMIZERS.get(opt_name)
  valid, required = _kwarg_names(opt_fn, skip=("learning_rate",))
  _check_keys("config.optim", f"optimizer {opt_name!r}", list(optim), valid + _GROUP_KEYS, required)
  groups = _resolve_groups(optim)
  if "wd" in optim:
    optim["wd"] = _number(optim["wd"], "config.optim.wd")

  lr = _number(_get(config, "lr"), "config.lr")
  total_steps = _number(_get(config, "total_steps"), "config.total_steps", integer=True, minimum=1)

  sched = _as_dict(_get(config, "schedule"), "config.schedule")
  sched_name = sched.pop("decay", None) or "constant"
  if sched_name not in SCHEDULES:
    raise KeyError(f"config.schedule.decay: {SCHEDULES.unknown_message(sched_name)}")
  valid, required = _kwarg_names(SCHEDULES.get(sched_name), skip=_SCHEDULE_SPEC_KEYS)
  _check_keys("config.schedule", f"schedule {sched_name!r}", list(sched),
              valid + _SCHEDULE_CONFIG_KEYS[1:], required)
  warmup_steps = _number(sched.pop("warmup_steps", 0) or 0, "config.schedule.warmup_steps", integer=True)
  if warmup_steps > total_steps:
    raise ValueError(f"config.schedule.warmup_steps={warmup_steps} exceeds config.total_steps={total_steps}.")
  warmup_init = _number(sched.pop("warmup_init", 0.0) or 0.0, "config.schedule.warmup_init")

  clip = _get(config, "grad_clip_norm")
  clip = _number(clip, "config.grad_clip_norm") if clip else None

  return dict(opt_name=opt_name, opt_fn=opt_fn, opt_kwargs=optim, lr=lr, total_steps=total_steps,
              sched_name=sched_name, sched_kwargs=sched, warmup_steps=warmup_steps,
              warmup_init=warmup_init, clip=clip, groups=groups)


def _schedule_from(r: Mapping[str, Any]) -> ScheduleFn:
  try:
    return make_schedule(r["sched_name"], r["lr"], r["total_steps"], r["warmup_steps"], r["warmup_init"],
                         **r["sched_kwargs"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.schedule: {e}") from e


def validate_optim_config(config: Any) -> None:
  """Checks config.optim / lr / schedule / total_steps / grad_clip_norm; raises ValueError or KeyError.

  Cheap: resolves names, checks keys and values, and builds the schedule closure and the optax
  transformation, both pure Python objects (no arrays are created and no device is touched). Parameter-group
  patterns are checked for type here but against the params tree only at `tx.init(params)`.
  """
  make_optimizer(config)


def make_optimizer(config: Any) -> Tuple[optax.GradientTransformation, ScheduleFn]:
  """Builds `(tx, schedule_fn)` from `config` (keys in the module docstring).

  tx = [clip_by_global_norm(grad_clip_norm)] -> optimizer(learning_rate=schedule_fn, **config.optim).
  Clipping acts on the raw (accumulated) gradient, before weight decay and the optimizer. With parameter
  groups (module docstring) the optimizer is an optax.multi_transform whose labels are computed from the
  params tree at `tx.init` / `tx.update`, which is where a pattern matching nothing raises.
  """
  r = _resolve(config)
  schedule_fn = _schedule_from(r)

  def make_tx(multiplier: float = 1.0) -> optax.GradientTransformation:
    lr = schedule_fn if multiplier == 1.0 else (lambda s: multiplier * schedule_fn(s))
    try:
      return r["opt_fn"](lr, **r["opt_kwargs"])
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.optim: {e}") from e

  if r["groups"] is not None:
    return _grouped(r["groups"], make_tx, r["clip"]), schedule_fn
  tx = make_tx()
  if r["clip"]:
    tx = optax.chain(optax.clip_by_global_norm(r["clip"]), tx)
  return tx, schedule_fn
