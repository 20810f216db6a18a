"""Parameter groups of `config.optim` (module docstring of `medjax.optim`): freezing, linear probing, lr
multipliers by pattern and layer-wise lr decay, as one optax transformation around the optimizer."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from medjax.optim.config_values import as_dict, number
from medjax.param_paths import path_str, patterns, selects

GROUP_KEYS = ("freeze", "train_only", "lr_multipliers", "layer_decay", "layer_groups", "unfreeze")
_FROZEN = "frozen"


def resolve_groups(optim: Dict[str, Any]) -> Optional[Dict[str, Any]]:
  """Pops and checks the parameter-group keys of config.optim; None when none is set."""
  given = {k: optim.pop(k) for k in GROUP_KEYS if k in optim}
  if all(v is None or (hasattr(v, "__len__") and not len(v)) for v in given.values()):
    return None  # the plain transformation, so runs without groups keep their optimizer state layout
  freeze = patterns(given.get("freeze"), "config.optim.freeze")
  train_only = patterns(given.get("train_only"), "config.optim.train_only")
  if freeze and train_only:
    raise ValueError(f"config.optim.freeze={freeze} and config.optim.train_only={train_only} are mutually "
                     "exclusive: train_only freezes everything it does not match.")
  mults = given.get("lr_multipliers") or ()
  ordered = not isinstance(mults, Mapping) and not hasattr(mults, "to_dict")
  pairs = tuple(mults) if ordered else tuple(as_dict(mults, "config.optim.lr_multipliers").items())
  if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and p[0] for p in pairs):
    raise ValueError("config.optim.lr_multipliers must be a {pattern: multiplier} mapping or a sequence of "
                     f"(pattern, multiplier) pairs, got {mults!r}.")
  pairs = tuple((p, number(m, f"config.optim.lr_multipliers[{p!r}]")) for p, m in pairs)
  decay, layers = given.get("layer_decay"), patterns(given.get("layer_groups"), "config.optim.layer_groups")
  if (decay is None) != (not layers):
    raise ValueError("config.optim.layer_decay and config.optim.layer_groups must be given together, got "
                     f"layer_decay={decay!r}, layer_groups={layers!r}.")
  if decay is not None:
    decay = number(decay, "config.optim.layer_decay")
    if decay <= 0.0 or len(set(layers)) != len(layers):
      raise ValueError(f"config.optim.layer_decay must be > 0 and config.optim.layer_groups unique, got "
                       f"{decay!r} and {layers}.")
  layer_factors = tuple(decay ** (len(layers) - 1 - i) for i in range(len(layers))) if layers else (1.0,)
  unfreeze = given.get("unfreeze") or ()
  if hasattr(unfreeze, "to_dict") or isinstance(unfreeze, Mapping):
    raise ValueError("config.optim.unfreeze must be a sequence of (pattern, step) pairs (the first matching "
                     f"pattern wins; a mapping would lose the order), got {unfreeze!r}.")
  if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and p[0] for p in unfreeze):
    raise ValueError(f"config.optim.unfreeze must be a sequence of (pattern, step) pairs, got {unfreeze!r}.")
  unfreeze = tuple((p, number(s, f"config.optim.unfreeze[{p!r}]", integer=True)) for p, s in unfreeze)
  # Every multiplier a parameter can get, known before the params tree is, since multi_transform needs
  # its transformations up front; sorted so the group names (and the optimizer state) are deterministic.
  multipliers = sorted({m * f for m in {1.0, *(m for _, m in pairs)} for f in layer_factors})
  starts = sorted({0, *(s for _, s in unfreeze)})
  return dict(frozen_patterns=freeze or train_only, train_only=bool(train_only), pairs=pairs, ordered=ordered,
              layers=layers, layer_factors=layer_factors, multipliers=multipliers, unfreeze=unfreeze, starts=starts)


def _label(k: int, start: int) -> str:
  return f"group{k}" if start == 0 else f"group{k}_from{start}"


def _no_match_error(key: str, pattern: str, paths: Sequence[str]) -> ValueError:
  shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
  return ValueError(f"config.optim.{key}: pattern {pattern!r} matches no parameter. Parameters: {shown}.")


def _group_labels(g: Mapping[str, Any], params: Any) -> Any:
  """Pytree of group names like `params`: "frozen", "group<k>" or "group<k>_from<step>" (unfrozen at that step),
  k indexing g["multipliers"].

  Raises ValueError for patterns that match nothing and for parameters in no (or several) layer groups.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in leaves]
  frozen_key = "train_only" if g["train_only"] else "freeze"
  for key, given in ((frozen_key, g["frozen_patterns"]), ("lr_multipliers", [p for p, _ in g["pairs"]]),
                     ("unfreeze", [p for p, _ in g["unfreeze"]])):
    for pattern in given:
      if not any(selects(pattern, path) for path in paths):
        raise _no_match_error(key, pattern, paths)
  labels = []
  for path in paths:
    hit = any(selects(p, path) for p in g["frozen_patterns"])
    if hit != g["train_only"]:
      labels.append(_FROZEN)
      continue
    matched = [(p, m) for p, m in g["pairs"] if selects(p, path)]
    if not g["ordered"] and len({m for _, m in matched}) > 1:
      raise ValueError(f"config.optim.lr_multipliers: parameter {path!r} is matched by patterns "
                       f"{[p for p, _ in matched]} with different multipliers; give (pattern, multiplier) pairs "
                       "to make the first match win.")
    factor = 1.0
    if g["layers"]:
      groups = [i for i, pattern in enumerate(g["layers"]) if selects(pattern, path)]
      if len(groups) != 1:
        what = "no layer group" if not groups else f"several layer groups {[g['layers'][i] for i in groups]}"
        raise ValueError(f"config.optim.layer_groups: parameter {path!r} is in {what}; groups: {g['layers']}.")
      factor = g["layer_factors"][groups[0]]
    start = next((step for p, step in g["unfreeze"] if selects(p, path)), 0)
    labels.append(_label(g["multipliers"].index((matched[0][1] if matched else 1.0) * factor), start))
  return jax.tree_util.tree_unflatten(treedef, labels)


class _CountState(NamedTuple):
  count: jax.Array  # optimizer updates so far (int32)


def _start_of(label: str) -> int:
  """The unfreeze step in a `_label` ("group3_from200" -> 200; 0 for "group3" and "frozen")."""
  return int(label.split("_from")[1]) if "_from" in label else 0


def _zero_until_unfrozen(labels: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Zeroes the gradient of every parameter before its unfreeze step (before clipping, as for frozen ones)."""

  def init(params):
    del params
    return _CountState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    steps = jax.tree.map(_start_of, labels(updates))
    updates = jax.tree.map(lambda u, s: u if s == 0 else jnp.where(state.count >= s, u, jnp.zeros_like(u)),
                           updates, steps)
    return updates, _CountState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


class _FromStepState(NamedTuple):
  count: jax.Array
  inner: Any


def _from_step(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  """`inner` (built with its schedule offset by `start`) from update `start` on: before, zero updates and its
  state untouched, so Adam's moments and bias correction start at the unfreezing, as for a fresh optimizer."""

  def init(params):
    return _FromStepState(count=jnp.zeros((), jnp.int32), inner=inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    active = state.count >= start
    new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
    return new_updates, _FromStepState(count=optax.safe_int32_increment(state.count), inner=new_inner)

  return optax.GradientTransformation(init, update)


def grouped(g: Mapping[str, Any], make_tx: Callable[..., optax.GradientTransformation],
            clip: Optional[float]) -> optax.GradientTransformation:
  """[zero frozen grads] -> [zero not-yet-unfrozen grads] -> [global clip] -> multi_transform(one
  `make_tx(multiplier, offset)` per group and unfreeze step, frozen: 0)."""
  labels = functools.partial(_group_labels, g)
  transforms = {}
  for k, m in enumerate(g["multipliers"]):
    for start in g["starts"]:
      # The group's optimizer counts its own updates from `start`; the offset keeps lr at the run's lr(step).
      tx = make_tx(m, start)
      transforms[_label(k, start)] = tx if start == 0 else _from_step(tx, start)
  parts = []
  if g["frozen_patterns"]:
    transforms[_FROZEN] = optax.set_to_zero()
    # Zeroed before clipping so the global norm is that of the trainable gradients, as with torch's
    # requires_grad=False; set_to_zero keeps no state.
    parts.append(optax.masked(optax.set_to_zero(), lambda t: jax.tree.map(lambda s: s == _FROZEN, labels(t))))
  if g["unfreeze"]:
    parts.append(_zero_until_unfrozen(labels))
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]
