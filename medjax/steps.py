"""Pure step functions: train, evaluate, predict.

Nothing here reads a config or logs. `train.py` binds the hyperparameters with `functools.partial` and
compiles each step once with `jax.jit` over the mesh; parallelism comes from the shardings it passes, so the
same function runs on one CPU or many accelerators.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from medjax.losses import Objective
from medjax.train_state import TrainState
from medjax.typing import Array, Batch, PyTree

ApplyFn = Callable[..., Any]
StatsFn = Callable[[Array, Mapping[str, PyTree], Batch], Dict[str, Array]]
AugmentFn = Callable[[Array, Batch], Batch]
# gradient_fn(params, model_state, batch, rng, *, apply_fn, objective) -> (loss, grads, new model_state)
GradientFn = Callable[..., Tuple[Array, PyTree, PyTree]]


def _split_micro_batches(batch: Batch, accum_steps: int) -> Batch:
  """(B, ...) -> (accum_steps, B // accum_steps, ...), micro-batch k holding examples k, k+A, k+2A, ...

  The strided assignment keeps every micro-batch spread over all devices when the batch is split over
  the data axis in contiguous blocks.
  """

  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def _loss_and_grads(params: PyTree, model_state: PyTree, batch: Batch, rng: Array, *, apply_fn: ApplyFn,
                    objective: Objective) -> Tuple[Array, PyTree, PyTree]:
  """Mean loss over `batch`, its gradient w.r.t. params, and the updated mutable model state."""
  mutable = list(model_state.keys()) or False

  def loss_fn(p):
    result = apply_fn({"params": p, **model_state}, batch["image"], train=True, rngs={"dropout": rng},
                      mutable=mutable)
    (outputs, aux), new_model_state = result if mutable else (result, model_state)
    return jnp.mean(objective(outputs, aux, batch)), new_model_state

  (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, new_model_state


def train_step(state: TrainState, batch: Batch, *, apply_fn: ApplyFn, objective: Objective,
               tx: optax.GradientTransformation, accum_steps: int = 1, ema_decay: float = 0.0,
               augment_fn: Optional[AugmentFn] = None,
               gradient_fn: Optional[GradientFn] = None) -> Tuple[TrainState, Dict[str, Array]]:
  """One optimizer update.

  Args:
    state: the current TrainState (donated by the caller).
    batch: dict with "image" (B, *spatial, C), "label" and optional "mask"; B divisible by accum_steps.
    apply_fn: the Flax module's `apply`.
    objective: `objective(outputs, aux, batch) -> (B,)` per-example loss.
    tx: optax transformation (clipping and weight decay included).
    accum_steps: number of micro-batches whose gradients are averaged before the update; equals one
      update on the whole batch (for models without batch statistics).
    ema_decay: decay of the EMA of the parameters and of the mutable collections (ignored when the state
      carries none); the decay used at update t (0-based) is min(ema_decay, (1 + t) / (10 + t)).
    augment_fn: `augment_fn(rng, batch) -> batch`, random augmentation applied on device inside this
      compiled step (before micro-batching), with a key derived from the step so resume stays exact.
    gradient_fn: replaces the mean-loss gradient of each (micro-)batch, e.g. DP-SGD's clipped and noised
      gradient (`medjax.privacy.clipping.gradient_fn`); same signature as `_loss_and_grads`.
  Returns:
    (new_state, metrics) with scalar metrics "loss", "grad_norm" and "finite" (1.0 when the loss and the
    gradients are finite). A non-finite step leaves params, optimizer state and EMA unchanged (only the
    step counter advances) so the caller can stop and keep the last good state.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  if augment_fn is not None:
    rng, augment_rng = jax.random.split(rng)
    batch = augment_fn(augment_rng, batch)
  bound = dict(apply_fn=apply_fn, objective=objective)
  gradients = gradient_fn or _loss_and_grads
  if accum_steps == 1:
    loss, grads, model_state = gradients(state.params, state.model_state, batch, rng, **bound)
  else:
    micro_batches = _split_micro_batches(batch, accum_steps)

    def accumulate(carry, inputs):
      grad_sum, loss_sum, model_state = carry
      index, micro = inputs
      loss, grads, model_state = gradients(state.params, model_state, micro,
                                                 jax.random.fold_in(rng, index), **bound)
      return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, model_state), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), state.model_state)
    (grad_sum, loss_sum, model_state), _ = jax.lax.scan(
        accumulate, init, (jnp.arange(accum_steps), micro_batches))
    grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
    loss = loss_sum / accum_steps

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params, ema_model_state = state.ema_params, state.ema_model_state
  if ema_params is not None:
    # Warm-up (as TensorFlow's ExponentialMovingAverage with num_updates): early on the average forgets its
    # random initialisation quickly; 0.99 ** 150 would otherwise still weigh the init 22% after 150 steps.
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))

    def average(old, new):  # integer leaves (counters) are taken as they are
      if not jnp.issubdtype(old.dtype, jnp.floating):
        return new
      # old + (1 - decay) (new - old), not decay old + (1 - decay) new: equal in exact arithmetic, but only
      # this form leaves the average of an unchanged (frozen) parameter bit-identical.
      return (old + (1.0 - decay) * (new - old)).astype(old.dtype)

    ema_params = jax.tree.map(average, ema_params, params)
    if ema_model_state is not None:  # None in checkpoints written before batch statistics were averaged
      ema_model_state = jax.tree.map(average, ema_model_state, model_state)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      model_state=keep_if_finite(model_state, state.model_state),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      ema_params=None if ema_params is None else keep_if_finite(ema_params, state.ema_params),
      ema_model_state=(None if ema_model_state is None
                       else keep_if_finite(ema_model_state, state.ema_model_state)),
  )
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
  return new_state, metrics


def predict_step(variables: PyTree, images: Array, *, apply_fn: ApplyFn) -> Tuple[Array, PyTree]:
  """Inference forward pass: (outputs, aux) for images (B, *spatial, C) with `train=False`."""
  return apply_fn(variables, images, train=False)


def eval_step(variables: PyTree, batch: Batch, *, apply_fn: ApplyFn, stats_fn: StatsFn) -> Dict[str, Array]:
  """Forward pass plus on-device per-example statistics (`stats_fn(outputs, aux, batch)`).

  Returning small per-example statistics instead of full predictions keeps the device-to-host transfer
  tiny (a few numbers per case instead of a label map).
  """
  outputs, aux = predict_step(variables, batch["image"], apply_fn=apply_fn)
  return stats_fn(outputs, aux, batch)
