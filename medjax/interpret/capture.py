"""Layer capture without touching model code: a named submodule's activation and the score's gradient w.r.t. it.

A layer is named by its "/"-joined module path inside the model ("stage4_block0", "enc2/conv0", ...), i.e. the
submodule's `name=` chain. Capture wraps `model.apply` in `flax.linen.intercept_methods`: when the submodule's
`__call__` returns `a`, the interceptor returns `a + delta` with `delta` an all-zero array of `a`'s shape, and
hands `a` out as an auxiliary output. Then `d score / d delta = d score / d a` at the unchanged forward pass, so
one `jax.value_and_grad` gives the activation and its gradient; everything is traceable (jit, 2D and 3D).

Flax caveats: only methods of Linen `Module`s are intercepted, so a layer is a submodule, not a plain function
(`nn.relu`, `nn.max_pool`) applied between modules; a submodule called more than once per forward pass (weight
sharing) has no single activation and is refused; lifted transforms (`nn.remat`) keep the module path, so
rematerialised blocks are captured under their usual names.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.interpret import targets as targets_lib


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def _apply(model: Any, variables: Any, images: jax.Array):
  # Eval mode, as every attribution method explains the deployed model (module docstring of `targets`).
  return model.apply(variables, images, train=False)


def module_outputs(model: Any, variables: Any, images: jax.Array) -> Dict[str, Tuple[jax.ShapeDtypeStruct, ...]]:
  """The output shapes of every submodule call, by "/"-joined path in call order (a module before its children),
  traced once (`jax.eval_shape`, no FLOPs). A path maps to one entry per call; a non-array output is recorded as
  `None`. The model itself (path "") is left out."""
  return trace(model, variables, images)[0]


def trace(model: Any, variables: Any, images: jax.Array, mutable: Sequence[str] = ()):
  """(`module_outputs`, the shape of the model's logits, the `mutable` collections as shapes) of one eval-mode
  forward pass under `jax.eval_shape`; `mutable` names collections the model fills when asked (e.g.
  "intermediates", where `vit.SelfAttention` sows its attention weights)."""
  calls: Dict[str, list] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or not context.module.path:
      return next_fun(*args, **kwargs)
    entries = calls.setdefault(_path(context.module), [])  # on entry: an ancestor precedes its submodules
    out = next_fun(*args, **kwargs)
    entries.append(jax.ShapeDtypeStruct(out.shape, out.dtype) if isinstance(out, jax.Array) else None)
    return out

  def run(v, x):
    if not mutable:
      return _apply(model, v, x)[0], {}
    (logits, _), state = model.apply(v, x, train=False, mutable=list(mutable))
    return logits, state

  with nn.intercept_methods(record):
    logits, state = jax.eval_shape(run, variables, images)
  return {k: tuple(v) for k, v in calls.items()}, logits.shape, state


def _is_feature_map(shape: jax.ShapeDtypeStruct | None, images: jax.Array) -> bool:
  """`(B, *spatial, C)` with the input's rank and more than one spatial position, or a sequence model's per-frame
  map `(B * T, *spatial, C)` of inputs `(B, T, *spatial, C)` (frames folded into the batch; `unfold_frames`)."""
  if shape is None or math.prod(shape.shape[1:-1]) <= 1:
    return False
  same_rank = len(shape.shape) == images.ndim and shape.shape[0] == images.shape[0]
  per_frame = (images.ndim >= 4 and len(shape.shape) == images.ndim - 1
               and shape.shape[0] == images.shape[0] * images.shape[1])
  return same_rank or per_frame


def unfold_frames(array: jax.Array, images: jax.Array) -> jax.Array:
  """A per-frame layer output `(B * T, *s, C)` of inputs `(B, T, *S, C)` as `(B, T, *s, C)` (frames become the first
  spatial axis of the map); any other array is returned as it is."""
  if array.ndim == images.ndim - 1 and array.shape[0] == images.shape[0] * images.shape[1] != images.shape[0]:
    return array.reshape(images.shape[:2] + array.shape[1:])
  return array


def top_level_names(outputs: Dict[str, Any]) -> Sequence[str]:
  """The model's direct children among `module_outputs`' paths, in call order."""
  return [p for p in outputs if "/" not in p]


def default_layer(model: Any, variables: Any, images: jax.Array) -> str:
  """The last submodule, at the shallowest nesting depth that has one, whose output is a spatial feature map
  `(B, *spatial, C)` with more than one spatial position: the last ResNet stage block, the last U-Net decoder
  stage, or inside an encoder that returns several outputs (CNN-GNN, CNN-LSTM per frame) its last stage. It is the
  deepest layer that still has a spatial layout, as Selvaraju et al. 2017 recommend for Grad-CAM. A segmentation
  head (output of the logits' shape) is skipped: its "channels" are the classes, so its map would just be the
  target's logit."""
  outputs, logits_shape, _ = trace(model, variables, images)
  found = [p for p in outputs if len(outputs[p]) == 1 and _is_feature_map(outputs[p][0], images)
           and tuple(outputs[p][0].shape) != tuple(logits_shape)]
  if not found:
    raise ValueError(f"{type(model).__name__} has no submodule with a spatial feature map output for input "
                     f"{images.shape}; pass layer= (top-level modules: {top_level_names(outputs)})")
  depth = min(p.count("/") for p in found)
  return [p for p in found if p.count("/") == depth][-1]


def check_layer(model: Any, variables: Any, images: jax.Array, layer: str) -> jax.ShapeDtypeStruct:
  """The output shape of `layer`; raises ValueError for an unknown layer (listing the top-level module names), a
  layer called more than once, or one whose output is not a single array."""
  outputs = module_outputs(model, variables, images)
  if layer not in outputs:
    raise ValueError(f"unknown layer {layer!r} of {type(model).__name__}; top-level modules: "
                     f"{top_level_names(outputs)} (nested layers are '/'-joined paths such as "
                     f"'{next(iter(outputs), 'name')}/...')")
  calls = outputs[layer]
  if len(calls) != 1:
    raise ValueError(f"layer {layer!r} is called {len(calls)} times per forward pass (shared weights); its "
                     f"activation is not unique")
  if calls[0] is None:
    raise ValueError(f"layer {layer!r} does not return a single array")
  return calls[0]


class Capture(NamedTuple):
  """What `capture` returns. activations / gradients: the layer's output `(B, *layer_spatial, C)` and
  `d scores.sum() / d activations` (each example's own gradient, as examples do not interact in eval mode);
  scores: `(B,)` float32; logits: the model's logits."""
  activations: jax.Array
  gradients: jax.Array
  scores: jax.Array
  logits: jax.Array


def capture(model: Any, variables: Any, images: jax.Array, target: targets_lib.Target, layer: str) -> Capture:
  """The activation of `layer` and the gradient of `targets.scores(logits, target)` w.r.t. it, in one forward
  and one backward pass. Traceable; the layer must exist (`check_layer`), which is checked at trace time."""
  shape = check_layer(model, variables, images, layer)

  def score(delta):
    captured = []

    def perturb(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and _path(context.module) == layer:
        captured.append(out)
        out = out + delta
      return out

    with nn.intercept_methods(perturb):
      logits, _ = _apply(model, variables, images)
    s = targets_lib.scores(logits, target)
    return s.sum(), (captured[0], s, logits)

  delta = jnp.zeros(shape.shape, shape.dtype)
  (_, (acts, s, logits)), grads = jax.value_and_grad(score, has_aux=True)(delta)
  return Capture(acts, grads, s, logits)
