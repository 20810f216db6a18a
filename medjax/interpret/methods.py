"""The attribution methods by name, with defaults that scale with the input, and one entry point that shards.

`explain(name, model, variables, images, target, mesh=..., **options)` is what the explain tool, `evaluate --explain`
and the sanity checks call: it fills in the method's defaults (`default_options`), splits the batch over the mesh's
"data" axis like prediction does (the weights replicated), and returns float32 maps `(B, *spatial)` at the input's
resolution. Methods (`METHODS`), each documented at its function:

  gradcam            grad_cam             the last feature map by default (`layer=`)
  gradcam++          grad_cam_plus_plus
  saliency           saliency
  gradient_x_input   gradient_x_input
  smoothgrad         smoothgrad           needs `rng` (default key 0)
  integrated_gradients (alias ig)         64 Gauss-Legendre steps, zero baseline
  occlusion          occlusion            window ~ 1/7 of each axis (at least 2), stride half the window
  rollout            attention_rollout    ViT family and hybrids only
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.interpret import gradcam, gradients
from medjax.interpret import targets as targets_lib
from medjax.interpret.occlusion import occlusion
from medjax.interpret.rollout import attention_rollout

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Method:
  """An attribution method: `fn(model, variables, images, target, **options) -> (B, *spatial)`."""
  fn: Callable[..., jax.Array]
  needs_rng: bool = False
  attention_only: bool = False
  description: str = ""


METHODS: Mapping[str, Method] = {
    "gradcam": Method(gradcam.grad_cam, description="Grad-CAM (Selvaraju et al. 2017)"),
    "gradcam++": Method(gradcam.grad_cam_plus_plus, description="Grad-CAM++ (Chattopadhay et al. 2018)"),
    "saliency": Method(gradients.saliency, description="vanilla gradient (Simonyan et al. 2014)"),
    "gradient_x_input": Method(gradients.gradient_x_input, description="gradient x input (Shrikumar et al. 2016)"),
    "smoothgrad": Method(gradients.smoothgrad, needs_rng=True, description="SmoothGrad (Smilkov et al. 2017)"),
    "integrated_gradients": Method(gradients.integrated_gradients,
                                   description="integrated gradients (Sundararajan et al. 2017)"),
    "occlusion": Method(occlusion, description="occlusion sensitivity (Zeiler and Fergus 2014)"),
    "rollout": Method(attention_rollout, attention_only=True,
                      description="attention rollout (Abnar and Zuidema 2020)"),
}
ALIASES = {"ig": "integrated_gradients", "grad_cam": "gradcam", "grad_cam_plus_plus": "gradcam++",
           "attention_rollout": "rollout"}


def resolve(name: str) -> str:
  """The canonical method name of `name` (or an alias); ValueError listing the methods for an unknown one."""
  canonical = ALIASES.get(name, name)
  if canonical not in METHODS:
    raise ValueError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)} "
                     f"(aliases: {', '.join(f'{a}={c}' for a, c in ALIASES.items())}).")
  return canonical


def occlusion_window(spatial: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """Default occluder `(window, stride)` per axis: about a seventh of the axis (at least 2 voxels, at most the axis),
  moved by half a window, so a 28 px image takes 4 x 4 windows at stride 2 and a 224 px one 32 x 32 at stride 16."""
  window = tuple(min(n, max(2, round(n / 7))) for n in spatial)
  return window, tuple(max(1, w // 2) for w in window)


def default_options(name: str, spatial: Sequence[int]) -> Dict[str, Any]:
  """The options `explain` uses for method `name` on inputs of spatial shape `spatial` unless given."""
  name = resolve(name)
  if name == "occlusion":
    window, stride = occlusion_window(spatial)
    return {"window": window, "stride": stride}
  if name == "smoothgrad":
    return {"rng": jax.random.key(0)}
  return {}


def _shard(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda a: jax.device_put(a, sharding) if isinstance(a, (jax.Array, jnp.ndarray)) else a, tree)


def explain(name: str, model: Any, variables: Any, images: jax.Array, target: targets_lib.Target, *,
            mesh: Optional[Mesh] = None, **options) -> jax.Array:
  """Maps `(B, *spatial)` float32 of method `name` (module docstring) for `images` `(B, *spatial, C)`.

  target: `(B,)` class indices, or `targets.RegionTarget` for a segmentation model's class region.
  mesh: optional device mesh with a "data" axis: images and target are split over it along the batch (B must be a
    multiple of its size), the variables replicated; the jitted method then runs where the data is, as prediction.
  options: the method's keywords; `default_options` fills the ones not given.
  Raises ValueError for an unknown method, a batch the mesh cannot split, or what the method refuses.
  """
  method = METHODS[resolve(name)]
  images = jnp.asarray(images)
  options = {**default_options(name, images.shape[1:-1]), **options}
  if mesh is not None:
    if DATA_AXIS not in mesh.shape:
      raise ValueError(f"explain: mesh axes {tuple(mesh.shape)} lack {DATA_AXIS!r}.")
    devices = mesh.shape[DATA_AXIS]
    if images.shape[0] % devices:
      raise ValueError(f"explain: batch of {images.shape[0]} is not a multiple of the mesh's {DATA_AXIS!r} axis "
                       f"({devices} devices); pad the batch.")
    batch = NamedSharding(mesh, P(DATA_AXIS))
    variables = _shard(variables, NamedSharding(mesh, P()))
    images = jax.device_put(images, batch)
    if isinstance(target, targets_lib.RegionTarget):
      target = targets_lib.RegionTarget(jax.device_put(jnp.asarray(target.mask), batch), target.class_index)
    else:
      target = jax.device_put(jnp.asarray(target), batch)
  return method.fn(model, variables, images, target, **options)


def option_summary(options: Mapping[str, Any]) -> str:
  """`k=v` pairs of the options a report states (keys and PRNG keys left out)."""
  shown = []
  for key, value in sorted(options.items()):
    if key == "rng":
      continue
    if isinstance(value, float) and not math.isfinite(value):
      value = str(value)
    shown.append(f"{key}={value}")
  return ", ".join(shown)
