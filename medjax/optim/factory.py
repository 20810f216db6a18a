"""`make_optimizer(config) -> (tx, schedule_fn)`: config.optim / lr / schedule / total_steps / grad_clip_norm
read, checked (errors name the key) and built."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import optax

from medjax.optim.config_values import as_dict, check_keys, get, kwarg_names, number
from medjax.optim.groups import GROUP_KEYS, grouped, resolve_groups
from medjax.optim.optimizers import OPTIMIZERS
from medjax.optim.schedules import SCHEDULES, ScheduleFn, make_schedule

_SCHEDULE_SPEC_KEYS = ("peak_value", "total_steps", "warmup_steps")  # supplied by us, not by the config
_SCHEDULE_CONFIG_KEYS = ("decay", "warmup_steps", "warmup_init")


def _resolve(config: Any) -> Dict[str, Any]:
  """Reads and checks every optimizer/schedule key of `config`; builds nothing."""
  optim = as_dict(get(config, "optim"), "config.optim")
  if "name" not in optim:
    raise ValueError("config.optim: missing 'name' (one of "
                     f"{', '.join(OPTIMIZERS.names())}).")
  opt_name = optim.pop("name")
  if opt_name not in OPTIMIZERS:
    raise KeyError(f"config.optim.name: {OPTIMIZERS.unknown_message(opt_name)}")
  opt_fn = OPTIMIZERS.get(opt_name)
  valid, required = kwarg_names(opt_fn, skip=("learning_rate",))
  check_keys("config.optim", f"optimizer {opt_name!r}", list(optim), valid + GROUP_KEYS, required)
  groups = resolve_groups(optim)
  if "wd" in optim:
    optim["wd"] = number(optim["wd"], "config.optim.wd")

  lr = number(get(config, "lr"), "config.lr")
  total_steps = number(get(config, "total_steps"), "config.total_steps", integer=True, minimum=1)

  sched = as_dict(get(config, "schedule"), "config.schedule")
  sched_name = sched.pop("decay", None) or "constant"
  if sched_name not in SCHEDULES:
    raise KeyError(f"config.schedule.decay: {SCHEDULES.unknown_message(sched_name)}")
  valid, required = kwarg_names(SCHEDULES.get(sched_name), skip=_SCHEDULE_SPEC_KEYS)
  check_keys("config.schedule", f"schedule {sched_name!r}", list(sched),
              valid + _SCHEDULE_CONFIG_KEYS[1:], required)
  warmup_steps = number(sched.pop("warmup_steps", 0) or 0, "config.schedule.warmup_steps", integer=True)
  if warmup_steps > total_steps:
    raise ValueError(f"config.schedule.warmup_steps={warmup_steps} exceeds config.total_steps={total_steps}.")
  warmup_init = number(sched.pop("warmup_init", 0.0) or 0.0, "config.schedule.warmup_init")

  clip = get(config, "grad_clip_norm")
  clip = number(clip, "config.grad_clip_norm") if clip else None

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

  def make_tx(multiplier: float = 1.0, offset: int = 0) -> optax.GradientTransformation:
    if offset:  # a group unfrozen at step `offset` counts its updates from there (groups._from_step)
      lr = lambda s: multiplier * schedule_fn(s + offset)
    else:
      lr = schedule_fn if multiplier == 1.0 else (lambda s: multiplier * schedule_fn(s))
    try:
      return r["opt_fn"](lr, **r["opt_kwargs"])
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.optim: {e}") from e

  if r["groups"] is not None:
    return grouped(r["groups"], make_tx, r["clip"]), schedule_fn
  tx = make_tx()
  if r["clip"]:
    tx = optax.chain(optax.clip_by_global_norm(r["clip"]), tx)
  return tx, schedule_fn
