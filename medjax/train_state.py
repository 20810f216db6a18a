"""The training state: one pytree holding everything a step reads and writes.

Checkpoints save exactly this tree, so a restored state resumes a run bit for bit: the step counter, the
parameters, the model's mutable collections (e.g. batch statistics), the optimizer state, the EMA of the
parameters and of the mutable collections, and the base PRNG key (per-step keys are `fold_in(rng, step)`).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from medjax.typing import PyTree


@flax.struct.dataclass
class TrainState:
  """Pytree of the whole training state.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
    params: model parameters (float32 master copy).
    model_state: mutable Flax collections other than params (e.g. {"batch_stats": ...}); {} if none.
    opt_state: optax state of the optimizer chain.
    ema_params: exponential moving average of `params`, or None when EMA is off.
    ema_model_state: the same average of `model_state` (float leaves; others copied), or None when EMA is
      off. Evaluating EMA weights with the live batch statistics mixes two models: the live statistics
      follow the current weights within ~10 steps (momentum 0.9), the EMA weights lag ~1/(1 - decay).
    rng: base PRNG key (uint32[2]) of the run; the step key is `jax.random.fold_in(rng, step)`.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  ema_params: Optional[PyTree]
  rng: jax.Array
  ema_model_state: Optional[PyTree] = None

  @classmethod
  def create(cls, *, variables: PyTree, tx: Any, rng: jax.Array, use_ema: bool) -> TrainState:
    """Builds the state at step 0 from freshly initialised Flax `variables` and an optax transform."""
    variables = dict(variables)
    params = variables.pop("params")
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=rng,
        ema_model_state=jax.tree.map(jnp.copy, variables) if use_ema else None,
    )

  def variables(self, use_ema: bool = False) -> PyTree:
    """Flax variables for `model.apply`: params and mutable collections, or their EMAs when `use_ema`."""
    if use_ema and self.ema_params is not None:
      model_state = self.model_state if self.ema_model_state is None else self.ema_model_state
      return {"params": self.ema_params, **model_state}
    return {"params": self.params, **self.model_state}
