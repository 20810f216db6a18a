"""The one loop of the batched methods (integrated gradients, SmoothGrad, occlusion, deletion/insertion): a sum
over chunks of model calls.

`sweep(body, init, xs)` is `lax.scan(body, init, xs)`, except that a single chunk is a plain call with no loop
around it. The scan bounds memory to one chunk and compiles the model once; but XLA:CPU runs a convolution's
backward pass inside a while loop about three times slower than outside one (jax 0.10.2, 2-core CPU, ResNet-18
input gradients at 112^2, batch 8: 0.16 s plain, 0.49 s as a one-step scan; four passes 1.65 s scanned, 0.58 s
unrolled), so on CPU one chunk (`batch_steps=None`, the default, where memory allows) is the fast choice. Unrolling
the chunks was tried and dropped: a 3D ResNet-18 with 8 unrolled chunks did not finish compiling in 7 minutes
(the scan: 17 s) and the 2D program held every chunk's activations at once (13 GB).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax


def sweep(body: Callable[[Any, Any], Any], init: Any, xs: Any) -> Tuple[Any, Any]:
  """`(final carry, stacked ys)` of `body(carry, x) -> (carry, y)` over the leading axis of `xs`, as `lax.scan`
  (module docstring); ys is None when `body` returns None for y."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    carry, y = body(init, jax.tree.map(lambda a: a[0], xs))
    return carry, None if y is None else jax.tree.map(lambda a: a[None], y)
  return jax.lax.scan(body, init, xs)
