"""Grad-CAM and Grad-CAM++: class activation maps from a layer's activations weighted by the score's gradients.

With `A` the activation `(B, *s, C)` of a layer (`medjax.interpret.capture`) and `g = d score / d A`:

  Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization"):   w_c = mean_s g_sc,   map_s = ReLU(sum_c w_c A_sc).

  Grad-CAM++ (Chattopadhay et al. 2018, "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep
  Convolutional Networks", eq. 19 with the exponential score exp(S)): the higher derivatives of exp(S) are
  exp(S) g^2 and exp(S) g^3 when S is piecewise linear in A (ReLU networks), and the exp(S) factors cancel in

      alpha_sc = g_sc^2 / (2 g_sc^2 + sum_s' A_s'c g_sc^3)      (0 where the denominator is 0),
      w_c = sum_s alpha_sc ReLU(g_sc),   map_s = ReLU(sum_c w_c A_sc)

  (the paper's weights use ReLU(exp(S) g), a positive per-example factor that only rescales the map; it is left
  out, as in the authors' code).

Segmentation is explained through `targets.RegionTarget`: the score is the class logit summed over a region, which
is Grad-CAM of a class region (Vinogradova et al. 2020, "Towards Interpretable Semantic Segmentation via
Gradient-weighted Class Activation Mapping").

Maps are float32 `(B, *spatial)` at the input's resolution (linear upsampling with `jax.image.resize`, half-pixel
centres, i.e. PyTorch's `align_corners=False`), or at the layer's resolution with `upsample=None`. Captum's
`LayerGradCam` returns the layer-resolution map (and `LayerAttribution.interpolate` upsamples it), so a Captum
cross-check compares `upsample=None`. Because the map is upsampled after the ReLU, a linear upsampling stays
non-negative.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from medjax.interpret import capture
from medjax.interpret import targets as targets_lib

_METHODS = ("grad_cam", "grad_cam_plus_plus")


def grad_cam_weights(activations: jax.Array, gradients: jax.Array) -> jax.Array:
  """Grad-CAM channel weights `(B, C)`: the spatial mean of the gradients `(B, *s, C)`."""
  del activations
  return gradients.mean(axis=tuple(range(1, gradients.ndim - 1)))


def grad_cam_plus_plus_weights(activations: jax.Array, gradients: jax.Array) -> jax.Array:
  """Grad-CAM++ channel weights `(B, C)` (module docstring): sum_s alpha_sc ReLU(g_sc)."""
  spatial = tuple(range(1, gradients.ndim - 1))
  g2 = gradients ** 2
  g3 = g2 * gradients
  denom = 2.0 * g2 + activations.sum(axis=spatial, keepdims=True) * g3
  # Zero gradients give 0/0; such positions carry no evidence, so their alpha is 0 (the paper's convention).
  safe = jnp.where(denom != 0, denom, 1.0)
  alpha = jnp.where(denom != 0, g2 / safe, 0.0)
  return (alpha * jax.nn.relu(gradients)).sum(axis=spatial)


def weighted_map(activations: jax.Array, weights: jax.Array, relu: bool = True) -> jax.Array:
  """`sum_c weights[b, c] * activations[b, ..., c]` `(B, *s)`, ReLU'd unless `relu=False`."""
  cam = jnp.einsum("b...c,bc->b...", activations, weights)
  return jax.nn.relu(cam) if relu else cam


@functools.partial(jax.jit, static_argnames=("model", "layer", "region_class", "method", "relu", "upsample"))
def _cam(variables, images, target, *, model, layer, region_class, method, relu, upsample):
  # The model and the options are static (hashed Flax dataclass fields), so calls with the same shapes reuse
  # the compiled function; the layer is resolved and checked once, at trace time.
  if layer is None:
    layer = capture.default_layer(model, variables, images)
  target = targets_lib.join_target(target, region_class)
  cap = capture.capture(model, variables, images, target, layer)
  acts = capture.unfold_frames(cap.activations.astype(jnp.float32), images)
  grads = capture.unfold_frames(cap.gradients.astype(jnp.float32), images)
  weight_fn = grad_cam_weights if method == "grad_cam" else grad_cam_plus_plus_weights
  cam = weighted_map(acts, weight_fn(acts, grads), relu)
  if upsample is not None:
    cam = jax.image.resize(cam, cam.shape[:1] + images.shape[1:-1], method=upsample)
  return cam


def _run(method, model, variables, images, target, layer, relu, upsample):
  if method not in _METHODS:
    raise ValueError(f"unknown method {method!r}; one of {_METHODS}")
  images = jnp.asarray(images)
  target_array, region_class = targets_lib.split_target(target)
  return _cam(variables, images, target_array, model=model, layer=layer, region_class=region_class,
              method=method, relu=relu, upsample=upsample)


def grad_cam(model: Any, variables: Any, images: jax.Array, target: targets_lib.Target, *,
             layer: Optional[str] = None, relu: bool = True, upsample: Optional[str] = "linear") -> jax.Array:
  """Grad-CAM maps `(B, *spatial)` float32 of `targets.scores(logits, target)` (module docstring).

  Args:
    model / variables: a Linen module whose `apply(variables, x, train=False)` returns `(logits, aux)`.
    images: `(B, *spatial, C)`, 2D or 3D.
    target: `(B,)` class indices, or `RegionTarget(mask, class_index)` for segmentation logits.
    layer: "/"-joined module path of the explained layer; default the last top-level submodule with a spatial
      feature map output (`capture.default_layer`).
    relu: apply the ReLU of the paper (False keeps negative evidence).
    upsample: a `jax.image.resize` method ("linear", "nearest", "cubic") to the input's spatial size, or None for
      the layer-resolution map `(B, *layer_spatial)`.

  Raises:
    ValueError: an unknown layer (the message lists the top-level module names), or an invalid target.
  """
  return _run("grad_cam", model, variables, images, target, layer, relu, upsample)


def grad_cam_plus_plus(model: Any, variables: Any, images: jax.Array, target: targets_lib.Target, *,
                       layer: Optional[str] = None, relu: bool = True,
                       upsample: Optional[str] = "linear") -> jax.Array:
  """Grad-CAM++ maps `(B, *spatial)` float32 (module docstring for the formula); arguments as `grad_cam`."""
  return _run("grad_cam_plus_plus", model, variables, images, target, layer, relu, upsample)
