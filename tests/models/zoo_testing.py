"""Helpers shared by the model tests (imported as a sibling module; pytest puts this folder on sys.path).

Shapes come from `jax.eval_shape`, which traces a model without compiling it; real-number tests fill the
variables on the host, because compiling a jitted `init` costs as much as the forward/backward program on
a 2-core CPU. RBG keys: threefry's random.normal takes seconds to compile there.
"""

import jax
import jax.numpy as jnp
import numpy as np

KEY = jax.random.key(0, impl="rbg")


def num_params(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def init_shapes(model, x, **kwargs):
  """(eval-mode outputs, variables) as shapes and dtypes, without compiling."""
  return jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False, **kwargs), x)


def variables_and_outputs(model, x, **kwargs):
  """(variables, eval-mode outputs) as shapes and dtypes, without compiling."""
  return init_shapes(model, x, **kwargs)[::-1]


def host_variables(shapes, seed: int = 0):
  """Real variables for a tree of shapes: kernels ~ N(0, 2 / fan_in) (He), norm scales and running
  variances 1, biases and running means 0; anything else (embeddings, tables) ~ N(0, 0.02)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in ("scale", "var"):
      return jnp.ones(s.shape, s.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(s.shape, s.dtype)
    if name == "kernel" and len(s.shape) >= 2:
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * 0.02, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def host_variables_for(model, x, seed: int = 0):
  """`host_variables` for `model` at input `x`."""
  return host_variables(init_shapes(model, x)[1], seed)


def train_mode_gradients(model, variables, x):
  """One jitted train-mode forward/backward with the batch statistics mutable and dropout on.

  Loss mean(logits^2). Returns (loss, logits, new model state, grads w.r.t. params).
  """

  def loss(params):
    (logits, _), new_state = model.apply({**variables, "params": params}, x, train=True,
                                         mutable=["batch_stats"], rngs={"dropout": KEY})
    return jnp.mean(logits ** 2), (logits, new_state)

  (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return value, logits, state, grads
