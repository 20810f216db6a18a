"""The registered optimizers (`OPTIMIZERS`: adam, adamw, sgd, rmsprop) and the weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from medjax.registry import Registry

OPTIMIZERS = Registry("optimizer")


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


