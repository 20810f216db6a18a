"""Rank-generic building blocks shared by the model families.

Everything here works for any number of spatial axes: the rank is read from the input, `(B, *spatial, C)`,
so a 2D and a 3D model are the same code. Kernel sizes and strides are an int (the same on every axis) or a
per-axis tuple such as `(1, 3, 3)` for thick-slice volumes.

Numerics: convolutions compute in `dtype` (e.g. bfloat16) with parameters in `param_dtype` (float32);
normalisation statistics are always reduced in float32 (Flax's float32 promotion of mean/variance), and the
normalised result is cast back to `dtype`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any
IntOrTuple = Union[int, Sequence[int]]

NORMS = ("batch", "instance", "group", "none")
ACTIVATIONS = {
  "relu": nn.relu,
  "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.01),  # nnU-Net's slope
  "gelu": nn.gelu,
  "silu": nn.silu,
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


def make_norm(kind: str, *, train: bool, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: Optional[str] = None, scale_init: Callable = nn.initializers.ones,
              momentum: float = 0.9) -> Callable[[Any], Any]:
  """Returns a normalisation layer `(B, *spatial, C) -> same shape` of the given kind; call it inside a
  compact method so it is bound to the caller.

  kind: "batch" (statistics over batch + space, running averages in the "batch_stats" collection,
    PyTorch momentum 0.1 == Flax momentum 0.9), "instance" (per sample and channel over space, with a
    per-channel affine), "group" (gcd(C, 32) groups, so tiny test widths still divide), or "none".
  Statistics are reduced in float32 whatever `dtype` is; the output has `dtype`.
  """
  common = dict(epsilon=NORM_EPSILON, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, name=name)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, **common)
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


def conv(features: int, kernel_size: Tuple[int, ...], strides: Tuple[int, ...] = None, *, use_bias: bool,
         dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None) -> nn.Conv:
  """An N-D convolution with symmetric `k // 2` padding (PyTorch / nnU-Net convention): stride s maps a
  length n to ceil(n / s) for odd kernels, and ported PyTorch weights give identical outputs."""
  strides = strides or (1,) * len(kernel_size)
  padding = [(k // 2, k // 2) for k in kernel_size]
  return nn.Conv(features, kernel_size, strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype, kernel_init=nn.initializers.he_normal(), name=name)


class ConvNormAct(nn.Module):
  """Conv -> norm -> activation on `(B, *spatial, C_in)` -> `(B, *spatial / strides, features)`.

  The conv has no bias when a norm follows it (the norm's shift makes it redundant).
  """
  features: int
  kernel_size: IntOrTuple = 3
  strides: IntOrTuple = 1
  norm: str = "instance"
  act: str = "leaky_relu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    k = to_tuple(self.kernel_size, nd, "kernel_size")
    s = to_tuple(self.strides, nd, "strides")
    x = conv(self.features, k, s, use_bias=self.norm == "none", dtype=self.dtype,
             param_dtype=self.param_dtype, name="conv")(x)
    x = make_norm(self.norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
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
