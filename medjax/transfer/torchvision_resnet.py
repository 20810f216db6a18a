"""torchvision ResNet state dicts <-> medjax ResNet variables (`{"params": ..., "batch_stats": ...}`).

Names (torchvision -> medjax; `i` the stage 1..4, `j` the block 0..n-1, `k` 1..3):
  conv1.weight                          params/stem_conv/kernel
  bn1.{weight,bias}                     params/stem_norm/{scale,bias}
  bn1.{running_mean,running_var}        batch_stats/stem_norm/{mean,var}
  layer{i}.{j}.conv{k}.weight           params/stage{i}_block{j}/conv{k}/kernel
  layer{i}.{j}.bn{k}.*                  stage{i}_block{j}/norm{k}/* (as bn1)
  layer{i}.{j}.downsample.0.weight      params/stage{i}_block{j}/proj_conv/kernel
  layer{i}.{j}.downsample.1.*           stage{i}_block{j}/proj_norm/* (as bn1)
  fc.{weight,bias}                      params/head/{kernel,bias}
  *.num_batches_tracked                 ignored on import (medjax keeps no counter); exported as 0
Layouts: conv weights `(O, I, *k)` (OIHW) <-> kernels `(*k, I, O)` (HWIO); the linear weight `(out, in)` <->
`(in, out)`; everything else is copied unchanged.

Conventions checked against medjax's ResNet (`medjax.models.resnet`, `layers.make_norm`): batch norm
epsilon 1e-5 (`layers.NORM_EPSILON`) equals torch's default, and momentum 0.9 (Flax: weight of the old
running average) equals torch's momentum 0.1, so fine-tuning updates the imported running statistics as
torch would. Convolutions pad `k // 2` on both sides and the stem max-pool pads 1 like torch, so eval-mode
logits agree at any input size (tests/transfer check non-square inputs). torchvision's resnet152 is
`resnet101` with `model_kwargs={"stage_sizes": (3, 8, 36, 3)}`.

Inputs: medjax takes channels-last `(B, H, W, C)`, torch `(B, C, H, W)`; the weights are the same either way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medjax import models

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")
# Input size used only to trace the model for its variable shapes (never compiled or run).
_TRACE_SIZE = 64

_MODULE_NAMES = {"stem_conv": "conv1", "stem_norm": "bn1", "head": "fc", "proj_conv": "downsample.0",
                 "proj_norm": "downsample.1"}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)$")
_BLOCK_CHILD = re.compile(r"(conv|norm)(\d)$")
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


class WeightMismatchError(ValueError):
  """The state dict does not fit the model's variables: lists every missing, unexpected and mis-shaped
  tensor (attributes `missing`, `unexpected`, `mismatched` hold them as (torch name, ...) tuples)."""

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


def _check_model_name(model_name: str) -> None:
  if model_name not in MODEL_NAMES:
    raise ValueError(f"no torchvision ResNet mapping for model {model_name!r}; supported: {list(MODEL_NAMES)}")


def torch_name(path: Tuple[str, ...]) -> str:
  """The torchvision state dict name of the medjax variable at `path` = (collection, *modules, leaf),
  e.g. ("params", "stage2_block0", "proj_conv", "kernel") -> "layer2.0.downsample.0.weight"."""
  collection, *modules, leaf = path
  parts = []
  for module in modules:
    block, child = _BLOCK.match(module), _BLOCK_CHILD.match(module)
    if module in _MODULE_NAMES:
      parts.append(_MODULE_NAMES[module])
    elif block:
      parts.append(f"layer{block[1]}.{block[2]}")
    elif child:
      parts.append(("conv" if child[1] == "conv" else "bn") + child[2])
    else:
      raise ValueError(f"no torchvision name for the medjax variable {'/'.join(path)} (module {module!r})")
  if (collection, leaf) not in _LEAF_NAMES:
    raise ValueError(f"no torchvision name for the medjax variable {'/'.join(path)} (leaf {leaf!r})")
  return ".".join(parts + [_LEAF_NAMES[collection, leaf]])


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  """medjax layout -> torch layout: kernels `(*k, I, O)` -> `(O, I, *k)`, Dense `(in, out)` -> `(out, in)`."""
  if leaf == "kernel":
    return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
  return x


def _torch_shape_to_medjax(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if leaf == "kernel" and len(shape) >= 2:
    return (*shape[2:], shape[1], shape[0])
  return tuple(shape)


def _to_medjax_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  """torch layout -> medjax layout (inverse of `_to_torch_layout`)."""
  if leaf == "kernel":
    return np.transpose(x, (*range(2, x.ndim), 1, 0))
  return x


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _model_kwargs(state_dict: Mapping[str, np.ndarray], model_kwargs: Optional[Mapping[str, Any]]) -> Dict:
  kwargs = dict(model_kwargs or {})
  if "num_classes" not in kwargs and "fc.weight" in state_dict:
    kwargs["num_classes"] = int(np.shape(state_dict["fc.weight"])[0])
  return kwargs


def variable_shapes(model_name: str, model_kwargs: Mapping[str, Any], in_channels: int = 3):
  """The medjax variables of `models.build_model(model_name, model_kwargs)` as `jax.ShapeDtypeStruct`s
  (traced at a `(1, 64, 64, in_channels)` input, never compiled)."""
  model = models.build_model(model_name, model_kwargs)
  x = jax.ShapeDtypeStruct((1,) + (_TRACE_SIZE,) * model.spatial_dims + (in_channels,), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False), x)


def import_torchvision(state_dict: Mapping[str, Any], model_name: str,
                       model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Converts a torchvision ResNet state dict into the variables of the medjax model `model_name`.

  state_dict: `{torch name: array}` (numpy arrays, or anything `np.asarray` takes, e.g. CPU tensors).
  model_name: a registered medjax ResNet ("resnet18", "resnet34", "resnet50", "resnet101").
  model_kwargs: the model's fields (as `config.model`); `num_classes` defaults to `fc.weight`'s rows. The
    input channels are read from `conv1.weight` `(64, C, 7, 7)`.
  Returns `{"params": ..., "batch_stats": ...}` nested dicts of numpy arrays in the model's parameter dtype.

  Raises:
    WeightMismatchError (a ValueError): one error listing every missing, unexpected and mis-shaped tensor.
    ValueError: `model_name` has no torchvision mapping.
  """
  _check_model_name(model_name)
  given = {name: np.asarray(value) for name, value in state_dict.items() if not name.endswith("num_batches_tracked")}
  kwargs = _model_kwargs(given, model_kwargs)
  conv1 = given.get("conv1.weight")
  in_channels = int(conv1.shape[1]) if conv1 is not None and conv1.ndim >= 2 else 3
  shapes = _flatten(variable_shapes(model_name, kwargs, in_channels))

  expected = {torch_name(path): path for path in shapes}
  missing, mismatched = [], []
  out = {}
  for name, path in expected.items():
    if name not in given:
      missing.append((name, "/".join(path), tuple(shapes[path].shape)))
      continue
    value = given[name]
    got = _torch_shape_to_medjax(path[-1], value.shape)
    if got != tuple(shapes[path].shape):
      mismatched.append((name, "/".join(path), tuple(value.shape), tuple(shapes[path].shape)))
      continue
    out[path] = _to_medjax_layout(path[-1], value).astype(shapes[path].dtype)
  unexpected = sorted((name, tuple(value.shape)) for name, value in given.items() if name not in expected)
  missing, mismatched = sorted(missing), sorted(mismatched)  # by torch name, like `unexpected`
  if missing or unexpected or mismatched:
    raise WeightMismatchError(_mismatch_message(model_name, kwargs, missing, unexpected, mismatched),
                              missing, unexpected, mismatched)
  return _unflatten(out)


def _mismatch_message(model_name: str, kwargs: Mapping[str, Any], missing: List, unexpected: List,
                      mismatched: List) -> str:
  lines = [f"the torchvision state dict does not fit medjax {model_name}({dict(kwargs)}): {len(missing)} missing, "
           f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensors"]
  if missing:
    lines.append("missing from the state dict (torch name <- medjax path, medjax shape):")
    lines += [f"  {name} <- {path} {shape}" for name, path, shape in missing]
  if unexpected:
    lines.append("unexpected in the state dict (torch name, torch shape):")
    lines += [f"  {name} {shape}" for name, shape in unexpected]
  if mismatched:
    lines.append("mis-shaped (torch name: torch shape -> medjax path: expected medjax shape):")
    lines += [f"  {name}: {tshape} -> {path}: {mshape}" for name, path, tshape, mshape in mismatched]
  return "\n".join(lines)


def export_torchvision(variables: Mapping[str, Any], model_name: str) -> Dict[str, np.ndarray]:
  """Converts medjax ResNet variables (`{"params": ..., "batch_stats": ...}`) into a torchvision state dict
  `{torch name: np.ndarray}` that torchvision's `load_state_dict` accepts (strict): `num_batches_tracked`
  (not kept by medjax) is written as int64 0 for every batch norm. `import_torchvision` inverts it exactly.

  Raises ValueError: `model_name` has no mapping, or a variable has no torchvision name (e.g. a model built
  with `norm="group"`).
  """
  _check_model_name(model_name)
  flat = _flatten({c: variables[c] for c in ("params", "batch_stats") if c in variables})
  state_dict = {}
  for path, value in flat.items():
    state_dict[torch_name(path)] = np.array(_to_torch_layout(path[-1], np.asarray(value)))
    if path[0] == "batch_stats" and path[-1] == "mean":
      state_dict[torch_name(path).rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, dtype=np.int64)
  return state_dict
