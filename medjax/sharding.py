"""Device mesh, sharding presets and host-to-global batch assembly.

Parallelism is carried by shardings only: the train step is the same function on 1 CPU or 256 GPUs.
The mesh comes from `config.mesh`, axis names and sizes such as `(("data", 4), ("model", 2))` (-1 takes
what the other axes leave; the default, `medjax.build.DEFAULT_MESH`, is one "data" axis over all devices).
Batches are split along the mesh's "data" axis; a preset decides how the state is laid out:

- `data_parallel`: every parameter (and optimizer/EMA leaf) replicated on every device.
- `fsdp`: every leaf with at least `min_shard_size` elements is split along the data axis on its largest
  dimension divisible by the data-axis size (replicated when none divides); small leaves stay replicated.
  Because the rule depends only on a leaf's shape, Adam's moments and the EMA follow their parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax.registry import Registry
from medjax.typing import PyTree

DATA_AXIS = "data"
SHARDING_PRESETS = Registry("sharding preset")
MeshSpec = Sequence[Tuple[str, int]]


def check_mesh_spec(spec: Any) -> None:
  """Validates the structure of a mesh spec without touching devices (used by config validation)."""
  if not isinstance(spec, (tuple, list)) or not spec:
    raise ValueError(f"config.mesh must be a non-empty tuple of (axis_name, size) pairs, got {spec!r}.")
  names = []
  for entry in spec:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
        or not isinstance(entry[1], int) or isinstance(entry[1], bool) or (entry[1] < 1 and entry[1] != -1)):
      raise ValueError(f"config.mesh entry {entry!r} must be (axis_name: str, size: int >= 1 or -1).")
    names.append(entry[0])
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh repeats an axis name: {names}.")
  if DATA_AXIS not in names:
    raise ValueError(f"config.mesh must have a {DATA_AXIS!r} axis to split the batch, got axes {names}.")
  if sum(size == -1 for _, size in spec) > 1:
    raise ValueError(f"config.mesh may use -1 for at most one axis, got {spec!r}.")


def make_mesh(spec: MeshSpec, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a `Mesh` from `(("data", -1), ...)` over `devices` (default: all global devices).

  With a -1 axis the mesh spans all devices; with only fixed sizes it takes the first prod(sizes)
  devices, so `(("data", 1),)` runs on one device of many.
  """
  check_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in spec)
  fixed = math.prod(size for _, size in spec if size != -1)
  if len(devices) % fixed or len(devices) < fixed:
    raise ValueError(f"config.mesh {tuple(map(tuple, spec))} needs a multiple of {fixed} devices, "
                     f"but {len(devices)} are available.")
  if all(size != -1 for _, size in spec):
    devices = devices[:fixed]  # a fully sized mesh may use a prefix of the devices (e.g. 1 of 8)
  shape = tuple(len(devices) // fixed if size == -1 else size for _, size in spec)
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh {tuple(map(tuple, spec))} has {math.prod(shape)} devices in all, "
                     f"but {len(devices)} are available.")
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), names)


def data_axis_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


@SHARDING_PRESETS.register("data_parallel")
def data_parallel_spec(shape: Tuple[int, ...], mesh: Mesh) -> P:
  """Every leaf replicated."""
  del shape, mesh
  return P()


@SHARDING_PRESETS.register("fsdp")
def fsdp_spec(shape: Tuple[int, ...], mesh: Mesh, min_shard_size: int = 2**10) -> P:
  """Shards a leaf along the data axis on its largest divisible dimension; small leaves replicated."""
  n = data_axis_size(mesh)
  if n == 1 or math.prod(shape) < min_shard_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: PyTree, mesh: Mesh, preset: str) -> PyTree:
  """NamedShardings for every leaf of a (possibly abstract) state under the named preset.

  Leaves may be arrays or `jax.ShapeDtypeStruct`s; scalars and PRNG keys (rank <= 1 and tiny) end up
  replicated under every preset by the size threshold.
  """
  rule: Callable[..., P] = SHARDING_PRESETS.get(preset)
  return jax.tree.map(lambda leaf: NamedSharding(mesh, rule(tuple(leaf.shape), mesh)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading (example) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "config.input.batch_size") -> None:
  """Raises a clear error when the global batch cannot be split evenly over the data axis."""
  n = data_axis_size(mesh)
  if global_batch_size % n:
    raise ValueError(f"{what}={global_batch_size} is not divisible by the mesh's {DATA_AXIS!r} axis "
                     f"(size {n} over {mesh.devices.size} devices); use a multiple of {n}.")
  processes = jax.process_count()
  if global_batch_size % processes:
    raise ValueError(f"{what}={global_batch_size} is not divisible by the {processes} processes.")


def host_to_global(host_batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Assembles this process's slice of a batch into global arrays sharded along the data axis.

  Args:
    host_batch: arrays of shape (global_batch // process_count, ...), this process's examples; a value may be a
      nested dict of such arrays (a multimodal "image").
    mesh: the global mesh.
  Returns:
    the same structure of `jax.Array` of shape (global_batch, ...), leading axis split over the data axis.
  """
  sharding = batch_sharding(mesh)

  def place(path, value):
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(),) + tuple(value.shape[1:])
    check_batch_size(global_shape[0], mesh, what=f"batch{jax.tree_util.keystr(path)} leading size")
    return jax.make_array_from_process_local_data(sharding, value, global_shape)
  return jax.tree_util.tree_map_with_path(place, dict(host_batch))


def host_to_replicated(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Copies a batch that every process holds whole (the same arrays everywhere) onto every device of `mesh`.

  For batches too small to split over the data axis, such as one whole case whose sliding-window windows are
  split over the devices instead (`inference.sliding_window_inference(mesh=...)`).
  """
  target = replicated(mesh)
  return jax.tree_util.tree_map(
      lambda value: jax.make_array_from_process_local_data(target, np.asarray(value), np.shape(value)),
      dict(host_batch))
