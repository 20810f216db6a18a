"""Type aliases and the axis convention shared by every module.

Arrays are channels-last: images are `(batch, *spatial, channels)` with spatial order `(z, y, x)` in 3D
and `(y, x)` in 2D; label maps are `(batch, *spatial)` integer class indices; `spacing_mm` follows the
spatial order. `spatial_dims` (2 or 3) is the only place where dimensionality enters.
"""

from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

Array = Any  # jax.Array or np.ndarray; kept loose so annotations cost no imports.
PyTree = Any
Shape = Tuple[int, ...]
Batch = Dict[str, Array]  # "image", "label", "id", optional "mask", "spacing_mm", "weight"
HostBatch = Mapping[str, np.ndarray]
Metrics = Dict[str, float]
LossFn = Callable[..., Array]
