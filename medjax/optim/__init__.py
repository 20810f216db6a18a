"""Optimizers, learning-rate schedules and `make_optimizer(config) -> (tx, schedule_fn)`.

Modules: `optimizers` (OPTIMIZERS, decay_mask), `schedules` (SCHEDULES, make_schedule), `groups` (parameter
groups: freezing, gradual unfreezing, lr multipliers, layer-wise decay), `factory` (config -> optimizer).

Config keys read:
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
  unfreeze = (("layer4", 100), ("layer3", 200), ("*", 300))  # gradual unfreezing: frozen before that step
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
layer_decay = d with n layer_groups: a parameter belongs to group i (0-based) if the pattern layer_groups[i]
selects it (as above: "layer1" is the layer1 subtree, "stage1_*" every stage-1 block); it must be in exactly one
group unless frozen (else an error naming it). Its multiplier is d ** (n - 1 - i): the last group (the head)
trains at the full rate. The effective rate is lr_multiplier * layer factor * schedule(step), i.e. the whole
optimizer update of the parameter (decoupled weight decay included) is scaled, as torch's per-param-group lr
does. Each distinct effective multiplier is one optax.multi_transform group with its own optimizer and state;
clipping stays global. The groups are a pure function of config + params tree, so a resumed run stays bit-exact.
unfreeze = ((pattern, step), ...): a parameter matched by a pattern (the first match wins) trains from that
optimizer step on (ULMFiT's gradual unfreezing, Howard & Ruder 2018); before it, its gradient is zeroed before
clipping, as a frozen one's, and it gets no update. Its group's optimizer starts fresh at the step (Adam's moments
and bias correction count from there) while the learning rate stays the run's lr(step). Parameters no pattern
matches train from step 0; `freeze` / `train_only` still win (frozen for good). Batch-norm statistics are frozen
by `config.freeze_batch_stats` (medjax.build), not here. The train step's logged `train/grad_norm` is the norm of
the whole raw gradient, frozen parameters included (the step does not know the groups); clipping sees only the
trainable part.

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

from medjax.optim.factory import make_optimizer, validate_optim_config
from medjax.optim.optimizers import OPTIMIZERS, decay_mask
from medjax.optim.schedules import SCHEDULES, ScheduleFn, make_schedule

__all__ = ["OPTIMIZERS", "SCHEDULES", "ScheduleFn", "decay_mask", "make_optimizer", "make_schedule",
           "validate_optim_config"]
