"""DP-SGD's gradient: per-example clipping and Gaussian noise, as a gradient function `steps.train_step` is given.

The privatised gradient of a batch is (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS)

    g = ( sum_i v_i clip_C(g_i) + N(0, sigma^2 C^2 I) ) / B_expected,   clip_C(g) = g min(1, C / ||g||),

over the examples i of the batch (v_i = 0 for the padding of a Poisson batch), with B_expected = q N the
expected batch size (the unbiased normalisation under Poisson sampling). Two ways to get it:

- "ghost" (default where the model allows it): two passes over the batch, no per-example gradient of the
  whole model is ever materialised. Pass 1 computes every ||g_i|| from each layer's inputs and output
  gradients (`ghost_norms.grad_norms`); pass 2 is one ordinary batched backward of sum_i w_i loss_i with the
  constant weights w_i = v_i min(1, C/||g_i||) / B_expected, which equals the clipped sum above. Both passes
  see the same batch and the same dropout key, so the norms are those of the gradients being weighted. With
  C = inf and sigma = 0 the weights are exactly 1/B and pass 2 is the plain step's backward: DP-SGD then equals
  SGD bit for bit.
- "vmap" (any model): `jax_privacy.clipping.clipped_grad`, i.e. `vmap(grad)` over examples, each gradient
  clipped, then summed; `microbatch_size` bounds the memory (microbatches run one after another). Each
  example gets its own dropout key. It equals SGD only up to float32 rounding (a sum of per-example gradients
  is not the batched backward's reduction).

Models with BatchNorm are refused before this runs (`options.check_model`): batch statistics mix examples, so a
per-example gradient is not defined and the clipping bound would not hold.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from medjax.losses import Objective
from medjax.privacy import ghost_norms
from medjax.typing import Array, Batch, PyTree

NORM_METHODS = ("auto", "ghost", "vmap")
VALID_KEY = "example_valid"  # (B,) float32: 1 for a sampled example, 0 for the padding of a Poisson batch
_NOISE_STREAM = 0x0D9  # keeps the noise key apart from the dropout keys drawn from the same step key


def example_weights(batch: Batch) -> Array:
  """(B,) float32: `batch["example_valid"]`, or ones for a batch without padding."""
  if VALID_KEY in batch:
    return batch[VALID_KEY].astype(jnp.float32)
  return jnp.ones((batch["image"].shape[0],), jnp.float32)


def _per_example_losses(apply_fn: Callable, objective: Objective, model_state: Mapping[str, PyTree],
                        batch: Batch, rng: Array) -> Callable[[PyTree], Tuple[Array, PyTree]]:
  """params -> ((B,) per-example losses, the updated mutable collections)."""
  mutable = list(model_state.keys()) or False

  def losses(params):
    result = apply_fn({"params": params, **model_state}, batch["image"], train=True, rngs={"dropout": rng},
                      mutable=mutable)
    (outputs, aux), new_state = result if mutable else (result, model_state)
    return objective(outputs, aux, batch).astype(jnp.float32), new_state

  return losses


def add_noise(summed: PyTree, rng: Array, stddev: Array) -> PyTree:
  """`summed` plus independent N(0, stddev^2) noise on every coordinate (float32 noise, cast to each leaf)."""
  leaves, treedef = jax.tree.flatten(summed)
  keys = jax.random.split(rng, len(leaves))
  noisy = [leaf + (stddev * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
           for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def _ghost_clipped_sum(params, losses_fn, weights, clip_norm):
  """(sum_i v_i clip_C(g_i), per-example losses, norms, new model state) by two passes (module docstring)."""
  norms, _ = ghost_norms.grad_norms(lambda p: losses_fn(p)[0], params)
  factors = jnp.minimum(1.0, clip_norm / norms)  # norm 0 -> C/0 = inf -> 1
  factors = jnp.where(jnp.isfinite(factors), factors, 0.0)  # a non-finite norm contributes nothing
  scale = jax.lax.stop_gradient(weights * factors)

  def weighted(p):
    per_example, new_state = losses_fn(p)
    return jnp.sum(scale * per_example), (per_example, new_state)

  grads, (per_example, new_state) = jax.grad(weighted, has_aux=True)(params)
  return grads, per_example, norms, new_state


def _vmap_clipped_sum(params, apply_fn, objective, model_state, batch, rng, weights, clip_norm,
                      microbatch_size):
  """The same sum from per-example gradients (jax-privacy's clipped_grad); model state is not updated."""
  from jax_privacy import clipping  # a heavy import, only for models the ghost norms do not cover

  def one_example(p, example, key):
    outputs, aux = apply_fn({"params": p, **model_state}, example["image"], train=True, rngs={"dropout": key})
    # The padding weight multiplies the loss, so a padded example's gradient is exactly zero.
    return jnp.sum(objective(outputs, aux, example).astype(jnp.float32) * example[VALID_KEY])

  batch = {**batch, VALID_KEY: weights}
  grad_fn = clipping.clipped_grad(one_example, l2_clip_norm=clip_norm, batch_argnums=1, prng_argnum=2,
                                  return_values=True, return_grad_norms=True, microbatch_size=microbatch_size)
  grads, aux = grad_fn(params, batch, rng)
  return grads, aux.values, aux.grad_norms, model_state


def norm_method(method: str, apply_fn: Callable, objective: Objective, params: PyTree,
                model_state: Mapping[str, PyTree], batch: Batch, rng: Array) -> str:
  """Resolves "auto" to "ghost" when every parameter sits in a layer the ghost norms cover, else "vmap";
  "ghost" for a model they do not cover raises ghost_norms.UnsupportedModel naming the parameters."""
  if method == "vmap":
    return method
  losses_fn = _per_example_losses(apply_fn, objective, model_state, batch, rng)
  ok, reason = ghost_norms.supported(lambda p: losses_fn(p)[0], params)
  if ok:
    return "ghost"
  if method == "ghost":
    raise ghost_norms.UnsupportedModel(f"config.privacy.per_example_norms='ghost': {reason}")
  return "vmap"


def dp_loss_and_grads(params: PyTree, model_state: Mapping[str, PyTree], batch: Batch, rng: Array, *,
                      apply_fn: Callable, objective: Objective, clip_norm: float, noise_multiplier: float,
                      expected_batch_size: float, method: str = "ghost",
                      microbatch_size: Optional[int] = None) -> Tuple[Array, PyTree, PyTree]:
  """The privatised gradient of `batch` (module docstring), in `steps.train_step`'s gradient-function form.

  Args:
    params, model_state: the model's parameters and mutable collections (no batch statistics).
    batch: "image" (B, *spatial, C), the objective's keys, optional "example_valid" (B,) (0 = padding).
    rng: the step key; dropout keys and the noise key derive from it.
    clip_norm: C, the per-example L2 bound (inf: no clipping).
    noise_multiplier: sigma; the noise on the clipped sum has standard deviation sigma * C.
    expected_batch_size: B_expected (examples), the divisor of the noisy sum.
    method: "ghost" or "vmap" (resolved; see `norm_method`).
    microbatch_size: examples per vmap chunk for "vmap" (None: the whole batch at once).
  Returns:
    (mean loss over the sampled examples, privatised gradient, updated model state).
  """
  weights = example_weights(batch)
  dropout_rng, noise_rng = rng, jax.random.fold_in(rng, _NOISE_STREAM)
  clip = jnp.float32(clip_norm)
  if method == "ghost":
    losses_fn = _per_example_losses(apply_fn, objective, model_state, batch, dropout_rng)
    # Dividing the weights (not the sum) by B keeps pass 2 identical to the plain step's mean backward.
    grads, per_example, _, new_state = _ghost_clipped_sum(params, losses_fn, weights / expected_batch_size, clip)
    scale_noise = jnp.float32(1.0 / expected_batch_size)
  elif method == "vmap":
    grads, per_example, _, new_state = _vmap_clipped_sum(params, apply_fn, objective, model_state, batch,
                                                         dropout_rng, weights, clip, microbatch_size)
    grads = jax.tree.map(lambda g: g / expected_batch_size, grads)
    scale_noise = jnp.float32(1.0 / expected_batch_size)
  else:
    raise ValueError(f"dp_loss_and_grads: method must be 'ghost' or 'vmap', got {method!r}.")
  if noise_multiplier:
    stddev = jnp.float32(noise_multiplier) * clip * scale_noise
    grads = add_noise(grads, noise_rng, stddev)
  loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss, grads, new_state


def per_example_grad_norms(params: PyTree, model_state: Mapping[str, PyTree], batch: Batch, rng: Array, *,
                           apply_fn: Callable, objective: Objective, method: str = "ghost") -> Array:
  """(B,) the L2 norm of each example's loss gradient (unclipped), by the given method; for tests and probes."""
  if method == "ghost":
    losses_fn = _per_example_losses(apply_fn, objective, model_state, batch, rng)
    return ghost_norms.grad_norms(lambda p: losses_fn(p)[0], params)[0]
  _, _, norms, _ = _vmap_clipped_sum(params, apply_fn, objective, model_state, batch, rng,
                                     example_weights(batch), jnp.float32(jnp.inf), None)
  return norms


GradientFn = Callable[..., Tuple[Array, PyTree, PyTree]]


def gradient_fn(*, clip_norm: float, noise_multiplier: float, expected_batch_size: float, method: str,
                microbatch_size: Optional[int] = None) -> GradientFn:
  """`dp_loss_and_grads` bound to its hyperparameters: the `gradient_fn` argument of `steps.train_step`."""

  def fn(params, model_state, batch, rng, *, apply_fn, objective):
    return dp_loss_and_grads(params, model_state, batch, rng, apply_fn=apply_fn, objective=objective,
                             clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                             expected_batch_size=expected_batch_size, method=method,
                             microbatch_size=microbatch_size)

  return fn


__all__ = ["NORM_METHODS", "VALID_KEY", "GradientFn", "add_noise", "dp_loss_and_grads", "example_weights",
           "gradient_fn", "norm_method", "per_example_grad_norms"]
