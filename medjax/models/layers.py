"""Rank-generic building blocks shared by the model families.

Everything here works for any number of spatial axes: the rank is read from the input, `(B, *spatial, C)`,
so a 2D and a 3D model are the same code. Kernel sizes and strides are an int (the same on every axis) or a
per-axis tuple such as `(1, 3, 3)` for thick-slice volumes.

Numerics: convolutions compute in `dtype` (e.g. bfloat16) with parameters in `param_dtype` (float32);
normalisation statistics are always reduced in float32 (Flax's float32 promotion of mean/variance), and the
normalised result is cast back to `dtype`.

This file holds the one activation table (`ACTIVATIONS` / `activation`), the one `make_norm` and the one
`ConvNormAct` of every model family. The blocks of the mobile classifiers (inverted residual / MBConv,
squeeze-excitation, stochastic depth, channel rounding) are built on them in `mobile_blocks.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
IntOrTuple = Union[int, Sequence[int]]

NORMS = ("batch", "instance", "group", "none")
# Activations by name (module fields stay hashable strings, so blocks can be rematerialised with static
# arguments). "hard_sigmoid" is relu6(x + 3) / 6 and "hard_swish" x * hard_sigmoid(x), as in PyTorch.
ACTIVATIONS = {
  "relu": nn.relu,
  "relu6": jax.nn.relu6,
  "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.01),  # nnU-Net's slope
  "gelu": nn.gelu,
  "silu": nn.silu,
  "sigmoid": nn.sigmoid,
  "hard_sigmoid": jax.nn.hard_sigmoid,
  "hard_swish": jax.nn.hard_swish,
  "none": lambda x: x,
}
NORM_EPSILON = 1e-5  # PyTorch's default for batch / instance / group norm, so ported weights agree
MAX_GROUPS = 32


def to_tuple(value: IntOrTuple, ndim: int, what: str = "value") -> Tuple[int, ...]:
  """`3 -> (3,) * ndim`; a sequence must have exactly `ndim` entries."""
  if isinstance(value, (int, np.integer)):
    return (int(value),) * ndim
  value = tuple(int(v) for v in value)
  if len(value) != ndim:
    raise ValueError(f"{what} {value} has {len(value)} entries but the input has {ndim} spatial axes.")
  return value


def per_stage(value: Any, num: int, ndim: int, what: str) -> Tuple[Tuple[int, ...], ...]:
  """Expands a per-stage kernel size or stride to `num` per-axis tuples of length `ndim`.

  Accepts an int (every stage, every axis); a sequence of `num` entries, each an int or a per-axis tuple
  (nnU-Net plans: `((1, 3, 3), (3, 3, 3), ...)`); or one per-axis tuple of `ndim` ints shared by every
  stage. A flat tuple of ints whose length is both `num` and `ndim` is ambiguous and refused unless its
  entries are all equal (then both readings agree).
  """
  if isinstance(value, (int, np.integer)):
    return ((int(value),) * ndim,) * num
  value = tuple(value)
  if all(isinstance(v, (int, np.integer)) for v in value):
    if len(value) == num and len(value) == ndim and len(set(value)) > 1:
      raise ValueError(f"{what}={value} is ambiguous: {num} stages and {ndim} spatial axes. Write it per "
                       f"stage with per-axis tuples, e.g. {(tuple(value),) * num}.")
    if len(value) == num:
      return tuple((int(v),) * ndim for v in value)
    if len(value) == ndim:
      return (tuple(int(v) for v in value),) * num
    raise ValueError(f"{what}={value} must have {num} per-stage entries or {ndim} per-axis entries.")
  if len(value) != num:
    raise ValueError(f"{what} has {len(value)} per-stage entries, expected {num}: {value}.")
  return tuple(to_tuple(v, ndim, what) for v in value)


def activation(name: str) -> Callable[[Any], Any]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"Unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}.") from None


_FROZEN_BATCH_STATS = contextvars.ContextVar("medjax_frozen_batch_stats", default=False)


@contextlib.contextmanager
def frozen_batch_stats() -> Iterator[None]:
  """Within this context (at trace time), batch norms built with `train=True` normalise with their running
  statistics and leave them unchanged, as PyTorch's `module.eval()` on the norms while the rest trains
  (dropout stays on). `config.freeze_batch_stats` wraps the train step's forward pass in it."""
  token = _FROZEN_BATCH_STATS.set(True)
  try:
    yield
  finally:
    _FROZEN_BATCH_STATS.reset(token)


def use_running_average(train: bool) -> bool:
  """Whether a batch norm uses (and keeps) its running statistics: outside training, or when frozen."""
  return not train or _FROZEN_BATCH_STATS.get()


def make_norm(kind: str, *, train: bool, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: Optional[str] = None, scale_init: Callable = nn.initializers.ones,
              momentum: float = 0.9, epsilon: float = NORM_EPSILON) -> Callable[[Any], Any]:
  """Returns a normalisation layer `(B, *spatial, C) -> same shape` of the given kind; call it inside a
  compact method so it is bound to the caller.

  kind: "batch" (statistics over batch + space, running averages in the "batch_stats" collection,
    PyTorch momentum 0.1 == Flax momentum 0.9), "instance" (per sample and channel over space, with a
    per-channel affine), "group" (gcd(C, 32) groups, so tiny test widths still divide), or "none".
  momentum: batch norm's running-average momentum (Flax convention: 1 - PyTorch's momentum).
  epsilon: added to the variance (PyTorch's 1e-5 by default, so ported weights agree).
  Statistics are reduced in float32 whatever `dtype` is; the output has `dtype`.
  """
  common = dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, name=name)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=use_running_average(train), momentum=momentum, **common)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, **common)
  if kind == "group":
    return _GroupNormGcd(**common)
  if kind == "none":
    return lambda x: x.astype(dtype)
  raise ValueError(f"Unknown norm {kind!r}; choose from {', '.join(repr(n) for n in NORMS)}.")


class _GroupNormGcd(nn.Module):
  """GroupNorm with gcd(C, 32) groups (the group count depends on the input width, known only at call)."""
  epsilon: float
  dtype: Dtype
  param_dtype: Dtype
  scale_init: Callable

  @nn.compact
  def __call__(self, x):
    groups = math.gcd(x.shape[-1], MAX_GROUPS)
    return nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, scale_init=self.scale_init, name="norm")(x)


def conv(features: int, kernel_size: Tuple[int, ...], strides: Optional[Tuple[int, ...]] = None, *, use_bias: bool,
         dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None, groups: int = 1,
         padding: Any = None) -> nn.Conv:
  """An N-D convolution with symmetric `k // 2` padding (PyTorch / nnU-Net convention): stride s maps a
  length n to ceil(n / s) for odd kernels, and ported PyTorch weights give identical outputs.

  groups: channel groups (Flax `feature_group_count`); `groups == C_in == features` is a depthwise conv.
  padding: None for the symmetric `k // 2` padding, else anything `nn.Conv` takes ("SAME", "VALID",
    per-axis `(low, high)` pairs). Convolution factories standing in for `conv` (`ResNet.conv_factory`,
    `acs.CONV_KINDS`) need not take `groups` or `padding`: ResNet never passes them.
  """
  strides = strides or (1,) * len(kernel_size)
  if padding is None:
    padding = [(k // 2, k // 2) for k in kernel_size]
  return nn.Conv(features, kernel_size, strides=strides, padding=padding, feature_group_count=groups,
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=nn.initializers.he_normal(),
                 name=name)


class ConvNormAct(nn.Module):
  """Conv -> norm -> activation on `(B, *spatial, C_in)` -> `(B, *spatial / strides, features)`, the
  conv-norm-activation unit of every model family (U-Net blocks, the mobile classifiers' expand / depthwise
  / project convs, GoogLeNet's `BasicConv2d`, ...). Submodules: "conv" and "norm" (no "norm" params for
  norm="none").

  Fields:
    features: output channels.
    kernel_size / strides: an int (every axis) or a per-axis tuple.
    norm: a `make_norm` kind; act: an `ACTIVATIONS` name.
    groups: conv channel groups; `groups == C_in == features` is a depthwise conv.
    use_bias: conv bias; None (default) gives one only when norm="none" (a norm's shift makes it redundant).
    padding: None for symmetric `k // 2` padding, else as `nn.Conv` (see `conv`).
    bn_epsilon / bn_momentum: batch norm's epsilon and running-average momentum (Flax convention), e.g.
      MobileNetV3's PyTorch eps 1e-3 / momentum 0.01 == 0.99. Batch norm only: instance and group norm
      keep `NORM_EPSILON`.
    dtype / param_dtype: compute / parameter dtypes (norm statistics in float32).
  """
  features: int
  kernel_size: IntOrTuple = 3
  strides: IntOrTuple = 1
  norm: str = "instance"
  act: str = "leaky_relu"
  groups: int = 1
  use_bias: Optional[bool] = None
  padding: Any = None
  bn_epsilon: float = NORM_EPSILON
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    k = to_tuple(self.kernel_size, nd, "kernel_size")
    s = to_tuple(self.strides, nd, "strides")
    use_bias = self.norm == "none" if self.use_bias is None else self.use_bias
    x = conv(self.features, k, s, use_bias=use_bias, groups=self.groups, padding=self.padding,
             dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    # The batch-norm settings are scoped to batch norm so that e.g. MobileNetV3 with norm="group" keeps the
    # group norm's usual epsilon.
    bn = self.norm == "batch"
    x = make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype, name="norm",
                  epsilon=self.bn_epsilon if bn else NORM_EPSILON, momentum=self.bn_momentum)(x)
    return activation(self.act)(x)


def depth_to_space(x, strides: Sequence[int]):
  """`(B, *d, prod(s) * F) -> (B, *(d * s), F)`; channel index `((o_1 * s_2 + o_2) ...) * F + f` goes to
  spatial offset `(o_1, o_2, ...)` inside each output block (the offsets are the leading channel factors)."""
  b, *dims, c = x.shape
  nd = len(dims)
  f = c // int(np.prod(strides))
  x = x.reshape(b, *dims, *strides, f)
  # interleave: (B, d1, s1, d2, s2, ..., F)
  perm = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
  x = x.transpose(perm)
  return x.reshape(b, *(d * s for d, s in zip(dims, strides)), f)


class Upsample(nn.Module):
  """Learned upsampling by integer per-axis `strides`, e.g. `2` or `(1, 2, 2)`.

  Computes exactly a transposed convolution with kernel == stride (the U-Net "up-conv"), but as a 1x1 conv
  to `prod(strides) * features` channels followed by `depth_to_space`: `nn.ConvTranspose` in 3D was ~13x
  slower on GPU (PERFORMANCE.md). `upsample_kernel_from_conv_transpose` converts weights between the forms.
  `(B, *d, C) -> (B, *(d * strides), features)`.
  """
  features: int
  strides: IntOrTuple = 2
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    s = to_tuple(self.strides, nd, "strides")
    n = int(np.prod(s))
    kernel = self.param("kernel", nn.initializers.he_normal(), (x.shape[-1], n * self.features),
                        self.param_dtype)
    # A 1x1 conv is a matmul over channels; einsum keeps it one dot for XLA.
    y = jnp.einsum("...c,cf->...f", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + jnp.tile(bias.astype(self.dtype), n)  # one bias per output feature, shared by the offsets
    return depth_to_space(y, s)


def upsample_kernel_from_conv_transpose(kernel, flipped: bool = True):
  """Converts a kernel-size == stride transposed-conv kernel `(*s, C_in, F)` to `Upsample`'s `(C_in,
  prod(s) * F)` kernel.

  flipped=True for Flax `nn.ConvTranspose` / `lax.conv_transpose` with the default `transpose_kernel=False`
  (they apply the kernel unflipped to the dilated input, so offset o reads tap s - 1 - o); flipped=False for
  a PyTorch-style kernel already indexed by output offset (torch `ConvTranspose` weight `(C_in, F, *s)`
  moved to `(*s, C_in, F)`).
  """
  kernel = jnp.asarray(kernel)
  nd = kernel.ndim - 2
  if flipped:
    kernel = jnp.flip(kernel, axis=tuple(range(nd)))
  c_in = kernel.shape[-2]
  # (*s, C, F) -> (C, *s, F) -> (C, prod(s) * F), offsets leading as depth_to_space expects
  kernel = jnp.moveaxis(kernel, nd, 0)
  return kernel.reshape(c_in, -1)


def global_avg_pool(x):
  """`(B, *spatial, C) -> (B, C)` mean over space, accumulated in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))


def check_rank(x, spatial_dims: int, model: str) -> None:
  """Raises a clear ValueError when the input is not `(B, *spatial, C)` with `spatial_dims` spatial axes."""
  if x.ndim != spatial_dims + 2:
    axes = {2: "(B, y, x, C)", 3: "(B, z, y, x, C)"}.get(spatial_dims, "(B, *spatial, C)")
    raise ValueError(f"{model}(spatial_dims={spatial_dims}) expects input {axes} (channels-last), got shape "
                     f"{tuple(x.shape)}.")


# ------------------------------------------------------------------------------------------- pooling and sizes

SizeStep = Tuple[str, Callable[[int], int]]  # (stage name, spatial length in -> spatial length out)


def pool_out_size(n: int, kernel: int, stride: int, pad: int = 0, ceil_mode: bool = False) -> int:
  """Output length of a PyTorch pooling window; with `ceil_mode` the last window must start inside the
  input or its left padding (PyTorch's rule), so a ceil-mode pool never adds a window of padding only."""
  span = n + 2 * pad - kernel
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= n + pad:
    out -= 1
  return out


def check_min_size(x_shape: Sequence[int], steps: Sequence[SizeStep], model: str) -> None:
  """Raises a ValueError naming `model`, the first stage that would shrink a spatial axis below 1 voxel and
  the smallest input length (per axis) that every stage accepts.

  steps: `(stage, fn)` pairs in network order; `fn` maps a spatial length to the stage's output length.
  Axes shrink independently, so each axis is followed on its own; the check is static (shapes only).
  """
  def first_failure(n):
    for stage, fn in steps:
      n = fn(n)
      if n < 1:
        return stage
    return None

  spatial = tuple(x_shape[1:-1])
  for axis, n in enumerate(spatial):
    stage = first_failure(n)
    if stage is not None:
      minimum = next(m for m in range(1, 1 << 16) if first_failure(m) is None)
      raise ValueError(f"{model}: input spatial size {spatial} is too small: {stage} would shrink spatial "
                       f"axis {axis} (length {n}) below 1 voxel; {model} needs at least {minimum} voxels "
                       f"per spatial axis.")


def _adaptive_weights(n: int, m: int) -> np.ndarray:
  """`(m, n)` averaging matrix: output i averages inputs floor(i n / m) .. ceil((i + 1) n / m) - 1."""
  w = np.zeros((m, n), np.float32)
  for i in range(m):
    start, end = (i * n) // m, -(-((i + 1) * n) // m)
    w[i, start:end] = 1.0 / (end - start)
  return w


def adaptive_avg_pool(x, output_size: IntOrTuple):
  """PyTorch-style adaptive average pooling: `(B, *spatial, C) -> (B, *output_size, C)`, any rank.

  Output index i along an axis of length n pooled to m averages the inputs from floor(i n / m) to
  ceil((i + 1) n / m) - 1 (windows overlap or repeat when m does not divide n, also when m > n). A box mean
  is separable, so the axes are pooled one after another: a reshape-mean where m divides n, otherwise a
  small static averaging matrix. Accumulates in float32 and returns `x.dtype`.
  """
  nd = x.ndim - 2
  out = to_tuple(output_size, nd, "output_size")
  y = x.astype(jnp.float32)
  for axis, (n, m) in enumerate(zip(x.shape[1:-1], out), start=1):
    if n == m:
      continue
    if n % m == 0:
      y = y.reshape(y.shape[:axis] + (m, n // m) + y.shape[axis + 1:]).mean(axis=axis + 1)
    else:
      # tensordot puts the pooled axis last; move it back into place.
      y = jnp.moveaxis(jnp.tensordot(y, _adaptive_weights(n, m), axes=[[axis], [1]]), -1, axis)
  return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# VGG


def max_pool_ceil(x, kernel: int, stride: int):
  """PyTorch `MaxPool(kernel, stride, ceil_mode=True)` on `(B, *s, C)`: floor pooling plus one more window
  where the input does not tile exactly (padded with -inf on the far side)."""
  extra = [max(0, (pool_out_size(n, kernel, stride, ceil_mode=True) - 1) * stride + kernel - n)
           for n in x.shape[1:-1]]
  nd = x.ndim - 2
  return nn.max_pool(x, (kernel,) * nd, strides=(stride,) * nd, padding=[(0, e) for e in extra])
