"""The one converter between PyTorch state dicts and medjax variables; each model family only names tensors.

A family (`TorchMapping` subclass, one module per source and family) says, for every medjax variable path
`(collection, *modules, leaf)`, which torch tensor holds it (`TorchKey`): the torch name, the layout change,
and, for fused tensors such as attention's `in_proj_weight` (q, k and v stacked on axis 0), which part. Then
`from_torch` / `to_torch` do the rest the same way for every family: shape checks that list every missing,
unexpected and mis-shaped tensor in one error, layouts, dtypes, and torch buffers medjax does not keep.

Layouts (`Layout`): torch keeps conv weights `(O, I, *k)` and linear weights `(out, in)`, medjax (Flax)
kernels `(*k, I, O)` and `(in, out)`. `AUTO` picks by the medjax rank: a rank-2 "kernel" is a linear layer, a
higher rank a convolution, any other leaf (biases, norm scales, running statistics, embeddings) is copied.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medjax import models

Path = Tuple[str, ...]
# Input side used only to trace a model for its variable shapes (never compiled or run).
TRACE_SIZE = 64


class WeightMismatchError(ValueError):
  """The state dict does not fit the model's variables: lists every missing, unexpected and mis-shaped
  tensor (attributes `missing`, `unexpected`, `mismatched` hold them as (torch name, ...) tuples)."""

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A layout change between a medjax array and its torch tensor.

  to_medjax(t, shape): the torch tensor `t` as the medjax array of `shape`.
  to_torch(x): the medjax array `x` as its torch tensor.
  torch_shape(shape): the torch shape of a medjax `shape` (for shape checks before converting).
  """
  name: str
  to_medjax: Callable[[np.ndarray, Tuple[int, ...]], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[Tuple[int, ...]], Tuple[int, ...]]


def _reversed_last_two(shape):
  return (shape[-1], shape[-2], *shape[:-2])


COPY = Layout("copy", lambda t, shape: t, lambda x: x, tuple)
# (*k, I, O) <-> (O, I, *k); also a rank-2 Dense kernel (in, out) <-> (out, in).
KERNEL = Layout("kernel", lambda t, shape: np.transpose(t, (*range(2, t.ndim), 1, 0)),
                lambda x: np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))), _reversed_last_two)
# A torch tensor stored flat whose medjax array has more axes (e.g. attention biases (H*d,) <-> (H, d)).
RESHAPE = Layout("reshape", lambda t, shape: t.reshape(shape), lambda x: x.reshape(-1), lambda s: (int(np.prod(s)),))
# Attention projections: medjax DenseGeneral kernels (D, H, d) (q/k/v) and (H, d, D) (out) <-> torch (H*d, D)
# and (D, H*d).
ATTENTION_IN = Layout("attention_in", lambda t, shape: t.T.reshape(shape),
                      lambda x: x.reshape(x.shape[0], -1).T, lambda s: (int(np.prod(s[1:])), s[0]))
ATTENTION_OUT = Layout("attention_out", lambda t, shape: t.T.reshape(shape),
                       lambda x: x.reshape(-1, x.shape[-1]).T, lambda s: (s[-1], int(np.prod(s[:-1]))))


LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def leaf_name(path: Path) -> str:
  """The torch tensor name of a Conv / Dense / norm leaf (PyTorch's for every family): kernel and scale ->
  weight, bias -> bias, mean -> running_mean, var -> running_var."""
  try:
    return LEAF_NAMES[path[0], path[-1]]
  except KeyError:
    raise ValueError(f"no torch name for the medjax variable {'/'.join(path)} (leaf {path[-1]!r})") from None


def auto_layout(path: Path) -> Layout:
  """KERNEL for a "kernel" leaf, COPY for anything else."""
  return KERNEL if path[-1] == "kernel" else COPY


@dataclasses.dataclass(frozen=True)
class TorchKey:
  """Where a medjax variable lives in the torch state dict: `name`, `layout`, and for a fused tensor `part`
  = (index, count): the medjax array is part `index` of `count` equal slices of the tensor along axis 0."""
  name: str
  layout: Optional[Layout] = None  # None: auto_layout(path)
  part: Optional[Tuple[int, int]] = None


class TorchMapping(abc.ABC):
  """One family's names. Subclasses set `source`, `model_names` and implement `torch_key`."""

  source: str = ""
  model_names: Tuple[str, ...] = ()
  # Torch buffers medjax does not keep, ignored on import (suffixes of the names).
  ignored_suffixes: Tuple[str, ...] = ("num_batches_tracked",)

  @abc.abstractmethod
  def torch_key(self, path: Path) -> TorchKey:
    """The torch tensor of the medjax variable at `path`; ValueError if it has none."""

  def ignored(self, name: str) -> bool:
    """Whether the torch tensor `name` is a buffer medjax keeps no counterpart of (skipped on import; default:
    names ending in one of `ignored_suffixes`)."""
    return name.endswith(self.ignored_suffixes)

  def bind(self, model_name: str, model_kwargs: Mapping[str, Any]) -> TorchMapping:
    """The mapping for one model: a family whose names depend on the model's fields (VGG's layer numbering,
    DynUNet's strides) returns an instance configured for them. Default: itself."""
    del model_name, model_kwargs
    return self

  def model_kwargs(self, state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The model's fields: `model_kwargs` completed from the state dict (e.g. num_classes from the head)."""
    return dict(model_kwargs)

  def in_channels(self, state_dict: Mapping[str, np.ndarray]) -> int:
    """The input channels the state dict was trained with (3 unless a family reads it off the first conv)."""
    return 3

  def input_shape(self, model: Any, model_kwargs: Mapping[str, Any], in_channels: int) -> Tuple[int, ...]:
    """A batch-1 input the model accepts, to trace its variable shapes."""
    return (1,) + (TRACE_SIZE,) * model.spatial_dims + (in_channels,)

  def extra_torch_tensors(self, variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Torch buffers written on export that medjax does not keep (default: none beyond `num_batches_tracked`)."""
    return {}

  def check_model_name(self, model_name: str) -> None:
    if model_name not in self.model_names:
      raise ValueError(f"no {self.source} mapping of {type(self).__name__} for model {model_name!r}; it maps "
                       f"{list(self.model_names)}")


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  """Nested dicts -> `{path tuple: leaf}`."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
  """`{path tuple: leaf}` -> nested dicts."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def variable_shapes(model_name: str, model_kwargs: Mapping[str, Any], in_channels: int = 3,
                    mapping: Optional[TorchMapping] = None):
  """The medjax variables of `models.build_model(model_name, model_kwargs)` as `jax.ShapeDtypeStruct`s, traced
  (never compiled) at `mapping.input_shape` (default a `(1, 64, ..., in_channels)` input)."""
  model = models.build_model(model_name, dict(model_kwargs))
  if mapping is None:
    shape = (1,) + (TRACE_SIZE,) * model.spatial_dims + (in_channels,)
  else:
    shape = mapping.input_shape(model, model_kwargs, in_channels)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False), x)


def _key(mapping: TorchMapping, path: Path) -> Tuple[TorchKey, Layout]:
  key = mapping.torch_key(path)
  return key, key.layout or auto_layout(path)


def from_torch(mapping: TorchMapping, state_dict: Mapping[str, Any], model_name: str,
               model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The torch state dict as the variables of the medjax model `model_name` (`medjax.transfer.from_torch`)."""
  mapping.check_model_name(model_name)
  given = {name: np.asarray(value) for name, value in state_dict.items() if not mapping.ignored(name)}
  kwargs = mapping.model_kwargs(given, dict(model_kwargs or {}))
  mapping = mapping.bind(model_name, kwargs)
  shapes = flatten(variable_shapes(model_name, kwargs, mapping.in_channels(given), mapping))

  missing, mismatched, used, out = [], [], set(), {}
  for path, target in shapes.items():
    key, layout = _key(mapping, path)
    shape = tuple(target.shape)
    expected = layout.torch_shape(shape)
    if key.part is not None:
      expected = (expected[0] * key.part[1], *expected[1:])
    if key.name not in given:
      if key.name not in {m[0] for m in missing}:
        missing.append((key.name, "/".join(path), expected))
      continue
    value = given[key.name]
    used.add(key.name)
    if tuple(value.shape) != expected:
      mismatched.append((key.name, "/".join(path), tuple(value.shape), expected))
      continue
    if key.part is not None:
      value = np.split(value, key.part[1], axis=0)[key.part[0]]
    out[path] = np.asarray(layout.to_medjax(value, shape), dtype=target.dtype)
  unexpected = sorted((name, tuple(value.shape)) for name, value in given.items() if name not in used)
  unexpected = [u for u in unexpected if u[0] not in {m[0] for m in missing}]
  if missing or unexpected or mismatched:
    missing, mismatched = sorted(missing), sorted(set(mismatched))
    raise WeightMismatchError(_mismatch_message(mapping, model_name, kwargs, missing, unexpected, mismatched),
                              missing, unexpected, mismatched)
  return unflatten(out)


def _mismatch_message(mapping: TorchMapping, model_name: str, kwargs: Mapping[str, Any], missing: List,
                      unexpected: List, mismatched: List) -> str:
  lines = [f"the {mapping.source} state dict does not fit medjax {model_name}({dict(kwargs)}): {len(missing)} "
           f"missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensors"]
  if missing:
    lines.append("missing from the state dict (torch name <- medjax path, expected torch shape):")
    lines += [f"  {name} <- {path} {shape}" for name, path, shape in missing]
  if unexpected:
    lines.append("unexpected in the state dict (torch name, torch shape):")
    lines += [f"  {name} {shape}" for name, shape in unexpected]
  if mismatched:
    lines.append("mis-shaped (torch name: torch shape -> medjax path: expected torch shape):")
    lines += [f"  {name}: {tshape} -> {path}: {mshape}" for name, path, tshape, mshape in mismatched]
  return "\n".join(lines)


def to_torch(mapping: TorchMapping, variables: Mapping[str, Any], model_name: str,
             model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, np.ndarray]:
  """Converts medjax variables into the torch state dict (see `medjax.transfer.to_torch`)."""
  mapping.check_model_name(model_name)
  mapping = mapping.bind(model_name, dict(model_kwargs or {}))
  flat = flatten({c: variables[c] for c in ("params", "batch_stats") if c in variables})
  parts: Dict[str, Dict[int, np.ndarray]] = {}
  state_dict: Dict[str, np.ndarray] = {}
  for path, value in flat.items():
    key, layout = _key(mapping, path)
    tensor = np.array(layout.to_torch(np.asarray(value)))
    if key.part is None:
      state_dict[key.name] = tensor
    else:
      parts.setdefault(key.name, {})[key.part[0]] = tensor
    if path[0] == "batch_stats" and path[-1] == "mean" and mapping.ignored("x.num_batches_tracked"):
      state_dict[key.name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, dtype=np.int64)
  for name, pieces in parts.items():
    state_dict[name] = np.concatenate([pieces[i] for i in sorted(pieces)], axis=0)
  state_dict.update(mapping.extra_torch_tensors(variables))
  return state_dict

