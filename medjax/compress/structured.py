"""Structured (filter) pruning of the ResNet family (Li et al. 2017, "Pruning Filters for Efficient ConvNets"):
remove the weakest output channels of each residual block's inner convolutions and rebuild a smaller model.

  pruned = structured.prune_filters(model, variables, keep=0.5)   # a ResNet (resnet18 ... resnet101, 2.5d)
  pruned.model.apply(pruned.variables, x, train=False)             # fewer parameters, fewer FLOPs
  config.model.inner_widths = pruned.inner_widths                  # the same architecture from a config

Which channels: the outputs of the inner convolutions (conv1 of a basic block; conv1 and conv2 of a bottleneck).
Through their norm and ReLU they feed only the block's next convolution, never the residual sum, so removing
them changes no other shape. The stem, the last convolution of a block, the projections and the head keep
their widths: their channels join a residual sum shared by a whole stage.

Scores: the L1 (default, as Li et al.) or L2 norm of each filter, `W[..., c]` over all other axes. Each inner
convolution keeps its round(keep * C) best channels (at least `min_channels`), rounded up to a multiple of
`multiple`; ties go to the lower channel index. Kept channels keep their order.

Rebuild: `model.clone(inner_widths=...)` (the `inner_widths` field of `medjax.models.resnet.ResNet`, one
entry per block) and the variables sliced: the conv kernel's output axis (and its bias, norm="none"), every
variable of the following norm (scale and offset; batch-norm mean and var), and the next conv kernel's input
axis. The pruned network computes the same function as the original with the removed channels silenced
(`zero_filters`: filter, bias and norm scale/offset zero, so the channel is exactly 0 after its ReLU): exactly
for norm="batch" in inference mode, "instance" and "none", up to float summation order in the next conv.

GroupNorm (norm="group"): the model normalises C channels in gcd(C, 32) groups (`layers.make_norm`), a divisor
of every C, so any kept count is valid. By default (`multiple=None`) a group-norm conv keeps a multiple of its
original group count G = gcd(C, 32), so it keeps at least G groups (exactly 32 for the usual widths, multiples
of 32: gcd(32 k, 32) = 32) instead of collapsing into few large groups (gcd(45, 32) = 1); a conv narrower than
32 channels has one channel per group and is then left whole unless `multiple` is given. Groups are re-formed
over fewer channels, so the function changes a little: fine-tune after pruning.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import flax.core
import jax
import numpy as np

from medjax.models import acs, layers, resnet

NORMS = ("l1", "l2")
# The next layers of an inner conv: (its norm, the conv that reads it).
_FOLLOWING = {"conv1": ("norm1", "conv2"), "conv2": ("norm2", "conv3")}
# Convolutions whose output channels are computed independently of their position (ACS assigns them to
# anatomical planes by index, so removing one would move others to another plane).
_CHANNEL_WISE = (layers.conv, acs.slice_conv)


class PrunedResNet(NamedTuple):
  """`prune_filters`' result.

  model: the original module cloned with `inner_widths`.
  variables: its Flax variables ({"params": ..., "batch_stats": ...} as given), sliced.
  inner_widths: per block, the kept widths of (conv1,) or (conv1, conv2); for `config.model.inner_widths`.
  kept: "stage1_block0/conv1" -> the kept output channels of that conv (ascending indices into the original).
  """
  model: Any
  variables: Dict[str, Any]
  inner_widths: Tuple[Tuple[int, ...], ...]
  kept: Dict[str, np.ndarray]


def _check_model(model: Any) -> None:
  if not isinstance(model, resnet.ResNet):
    raise TypeError(f"structured pruning: expected a medjax.models.resnet.ResNet (resnet18/34/50/101 and their "
                    f"2.5d variants), got {type(model).__name__}.")
  if model.conv_factory not in _CHANNEL_WISE:
    raise ValueError(f"structured pruning: {type(model).__name__} uses conv_factory {model.conv_factory!r}; only "
                     "the ordinary and the 2.5D convolutions are supported (an ACS convolution assigns output "
                     "channels to planes by position, so removing channels would move the others).")


def inner_convs(model: Any) -> Tuple[str, ...]:
  """Paths "stageI_blockJ/convK" of the prunable (inner) convolutions of `model`, in block order."""
  _check_model(model)
  names = ("conv1", "conv2") if model.bottleneck else ("conv1",)
  return tuple(f"stage{i + 1}_block{j}/{c}" for i, n in enumerate(model.stage_sizes) for j in range(n)
               for c in names)


def _kernel(params: Mapping[str, Any], conv: str) -> np.ndarray:
  block, name = conv.split("/")
  try:
    return np.asarray(jax.device_get(params[block][name]["kernel"]))
  except KeyError:
    raise ValueError(f"structured pruning: the params have no {conv}/kernel; were they made by this model? "
                     f"Top-level keys: {', '.join(sorted(params))}.") from None


def filter_scores(model: Any, params: Mapping[str, Any], *, norm: str = "l1") -> Dict[str, np.ndarray]:
  """conv path -> (C,) float64 norm of each output filter of the inner convolutions (module docstring)."""
  if norm not in NORMS:
    raise ValueError(f"structured pruning: norm must be one of {NORMS}, got {norm!r}.")
  scores = {}
  for conv in inner_convs(model):
    kernel = _kernel(params, conv).astype(np.float64)
    filters = kernel.reshape(-1, kernel.shape[-1])
    scores[conv] = np.abs(filters).sum(0) if norm == "l1" else np.sqrt(np.square(filters).sum(0))
  return scores


def kept_count(channels: int, keep: float, *, multiple: int = 1, min_channels: int = 1) -> int:
  """round(keep * channels), at least `min_channels`, rounded up to a multiple of `multiple`, at most
  `channels`."""
  count = max(int(round(keep * channels)), min_channels)
  return min(channels, -(-count // multiple) * multiple)


def choose_filters(scores: Mapping[str, np.ndarray], *, keep: float, multiple: Optional[int] = 1,
                   min_channels: int = 1, group_norm: bool = False) -> Dict[str, np.ndarray]:
  """conv path -> ascending indices of the channels kept: the `kept_count` highest scores, ties to the lower
  index. multiple=None: gcd(C, 32) with `group_norm` (module docstring), else 1."""
  if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
    raise ValueError(f"structured pruning: keep (fraction of channels kept) must lie in (0, 1], got {keep!r}.")
  if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
    raise ValueError(f"structured pruning: multiple must be an integer >= 1 or None, got {multiple!r}.")
  if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
    raise ValueError(f"structured pruning: min_channels must be an integer >= 1, got {min_channels!r}.")
  kept = {}
  for conv, score in scores.items():
    channels = len(score)
    step = multiple or (math.gcd(channels, layers.MAX_GROUPS) if group_norm else 1)
    count = kept_count(channels, keep, multiple=step, min_channels=min_channels)
    order = np.argsort(-np.asarray(score), kind="stable")  # best first; equal scores keep index order
    kept[conv] = np.sort(order[:count])
  return kept


def _slice_variables(variables: Mapping[str, Any], kept: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """Host copies of `variables` with each inner conv's output channels, its norm's channels and its next
  conv's input channels reduced to `kept`."""
  out = flax.core.unfreeze(jax.tree.map(np.asarray, jax.device_get(variables)))
  params = out["params"]
  for conv, index in kept.items():
    block, name = conv.split("/")
    norm, following = _FOLLOWING[name]
    layer = params[block][name]
    layer["kernel"] = layer["kernel"][..., index]
    if "bias" in layer:
      layer["bias"] = layer["bias"][index]
    for collection in out.values():  # params (scale, bias) and batch_stats (mean, var) of the norm
      if block in collection and norm in collection[block]:
        collection[block][norm] = jax.tree.map(lambda v: v[..., index], collection[block][norm])
    params[block][following]["kernel"] = params[block][following]["kernel"][..., index, :]
  return out


def zero_filters(model: Any, variables: Mapping[str, Any], kept: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """`variables` (same shapes) with every channel of an inner conv not in `kept` silenced: its filter, bias
  and norm scale/offset set to 0, so the channel is exactly 0 after norm and ReLU (batch, instance and no
  norm; with group norm the zero channel still counts in its group's statistics)."""
  out = flax.core.unfreeze(jax.tree.map(lambda v: np.array(v, copy=True), jax.device_get(variables)))
  params = out["params"]
  for conv in inner_convs(model):
    block, name = conv.split("/")
    channels = params[block][name]["kernel"].shape[-1]
    drop = np.setdiff1d(np.arange(channels), kept[conv])
    params[block][name]["kernel"][..., drop] = 0
    if "bias" in params[block][name]:
      params[block][name]["bias"][drop] = 0
    norm = params[block].get(_FOLLOWING[name][0], {})
    for leaf in jax.tree.leaves(norm):  # scale and offset (nested one level deeper for group norm)
      leaf[..., drop] = 0
  return out


def prune_filters(model: Any, variables: Mapping[str, Any], *, keep: float, norm: str = "l1",
                  multiple: Optional[int] = None, min_channels: int = 1) -> PrunedResNet:
  """Filter-prunes `model` (a ResNet) with `variables` (params and, for batch norm, batch_stats), keeping the
  fraction `keep` of every inner convolution's channels by filter `norm` ("l1" or "l2"); `multiple` and
  `min_channels` as in `choose_filters`. Returns the rebuilt model and its sliced variables (host arrays)."""
  if "params" not in variables:
    raise ValueError(f"structured pruning: variables need a 'params' collection, got {sorted(variables)}.")
  scores = filter_scores(model, variables["params"], norm=norm)
  kept = choose_filters(scores, keep=keep, multiple=multiple, min_channels=min_channels,
                        group_norm=model.norm == "group")
  per_block: Dict[str, list] = {}
  for conv in inner_convs(model):
    per_block.setdefault(conv.split("/")[0], []).append(len(kept[conv]))
  widths = tuple(tuple(w) for w in per_block.values())
  return PrunedResNet(model=model.clone(inner_widths=widths), variables=_slice_variables(variables, kept),
                      inner_widths=widths, kept=kept)


def param_count(variables_or_params: Any) -> int:
  """Number of entries of every array leaf (e.g. of `variables["params"]`)."""
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(variables_or_params)))


__all__ = ["NORMS", "PrunedResNet", "choose_filters", "filter_scores", "inner_convs", "kept_count", "param_count",
           "prune_filters", "zero_filters"]
