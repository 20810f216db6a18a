"""The one loop of the batched methods (integrated gradients, SmoothGrad, occlusion, deletion/insertion): a sum
over chunks of model calls.

`sweep(body, init, xs)` is `lax.scan(body, init, xs)`, except that one chunk is a plain call and, on the CPU
backend, up to `CPU_UNROLL_LIMIT` chunks are unrolled into straight-line code. Measured on the 2-core CPU
(jax 0.10.2, ResNet-18 input gradients at 112^2, batch 8): one pass 0.16 s plain, 0.49 s as a one-step scan;
four passes 1.65 s scanned, 0.58 s unrolled. XLA:CPU runs a convolution's backward pass inside a while loop about
three times slower than outside one. Beyond the limit the scan stays, so the program (and its compile time) does
not grow with the number of chunks; on accelerators the scan is kept, since it bounds memory and compile time.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

CPU_UNROLL_LIMIT = 8


def sweep(body: Callable[[Any, Any], Any], init: Any, xs: Any) -> Tuple[Any, Any]:
  """`(final carry, stacked ys)` of `body(carry, x) -> (carry, y)` over the leading axis of `xs`, as `lax.scan`
  (module docstring); ys is None when `body` returns None for y."""
  length = jax.tree.leaves(xs)[0].shape[0]
  if length == 1 or (length <= CPU_UNROLL_LIMIT and jax.default_backend() == "cpu"):
    carry, ys = init, []
    for i in range(length):
      carry, y = body(carry, jax.tree.map(lambda a, i=i: a[i], xs))
      ys.append(y)
    if all(y is None for y in ys):
      return carry, None
    return carry, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)
  return jax.lax.scan(body, init, xs)
