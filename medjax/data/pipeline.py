"""From a random-access data source to global, sharded batches on the devices.

Training order is a pure function of (seed, step): the example at position p = step * B + j of the stream
is `permutation(seed, epoch)[p % N]` with epoch = p // N. A resumed run therefore sees exactly the batches
the uninterrupted run would have seen, with no iterator state to checkpoint. Each process loads only its
own contiguous slice of every global batch; `sharding.host_to_global` joins the slices into one array
split over the mesh's data axis. Host work runs in a thread pool ahead of the step, and the next batch is
put on the devices while the current step runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from medjax import sharding
from medjax.typing import HostBatch

# Keys that travel to the devices; everything else (ids, metadata) stays on the host.
DEVICE_KEYS = ("image", "label", "mask", "weight", "spacing_mm")


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of examples in `epoch`: a permutation of range(num_examples) seeded by (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_examples)


def collate(examples: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """Stacks a list of example dicts into a dict of arrays with a leading batch axis."""
  keys = examples[0].keys()
  for i, example in enumerate(examples):
    if example.keys() != keys:
      raise ValueError(f"collate: example {i} has keys {sorted(example)}, expected {sorted(keys)}.")
  return {key: np.stack([np.asarray(e[key]) for e in examples]) for key in keys}


def _process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  per_process = global_batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


class TrainBatches:
  """Endless, deterministic, shuffled training batches for this process.

  Args:
    source: random-access source (`len(source)`, `source[i] -> dict of arrays`).
    global_batch_size: examples per step over all processes.
    seed: shuffling seed.
    process_index, process_count: this process's place (defaults from jax).
    num_threads: host threads loading examples ahead of the step.
    prefetch: host batches prepared ahead.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int, process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 2, prefetch: int = 2):
    self.source = source
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError("TrainBatches: the training split is empty.")
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                       f"{self.process_count} processes.")
    self.num_threads = num_threads
    self.prefetch = prefetch

  def global_indices(self, step: int) -> np.ndarray:
    """Indices into the source of the global batch at `step`, shape (global_batch_size,)."""
    positions = step * self.global_batch_size + np.arange(self.global_batch_size)
    epochs, offsets = np.divmod(positions, self.num_examples)
    result = np.empty_like(positions)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      result[chosen] = epoch_permutation(self.seed, int(epoch), self.num_examples)[offsets[chosen]]
    return result

  def host_batch(self, step: int) -> Dict[str, np.ndarray]:
    """This process's slice of the batch at `step`."""
    indices = self.global_indices(step)[_process_slice(self.global_batch_size, self.process_index,
                                                       self.process_count)]
    return collate([self.source[int(i)] for i in indices])

  def iterate(self, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
    """Host batches for steps start_step, start_step + 1, ... prepared ahead in a thread pool."""
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      queue: collections.deque = collections.deque()
      step = start_step
      while True:
        while len(queue) < self.prefetch:
          queue.append(pool.submit(self.host_batch, step))
          step += 1
        yield queue.popleft().result()


def eval_batches(source, *, global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Every example of `source` once, in order, as this process's slices of global batches.

  The last batch is padded by repeating example 0 with "weight" 0, so batch shapes stay static (one
  compilation) and padded examples can be dropped from metrics. Every batch carries "weight" (B,) float32.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_examples = len(source)
  mine = _process_slice(global_batch_size, process_index, process_count)
  for start in range(0, num_examples, global_batch_size):
    positions = np.arange(start, start + global_batch_size)[mine]
    valid = positions < num_examples
    examples = [source[int(p) if ok else 0] for p, ok in zip(positions, valid)]
    batch = collate(examples)
    batch["weight"] = valid.astype(np.float32)
    yield batch


def device_batches(host_batches: Iterator[HostBatch], mesh, prefetch: int = 2) -> Iterator[Dict[str, jax.Array]]:
  """Moves host batches onto the mesh as global arrays, `prefetch` batches ahead of the consumer.

  Only `DEVICE_KEYS` travel; `jax.make_array_from_process_local_data` starts the copies asynchronously,
  so keeping a short queue overlaps the transfer of the next batch with the current step.
  """
  queue: collections.deque = collections.deque()
  for host_batch in host_batches:
    queue.append(sharding.host_to_global({k: v for k, v in host_batch.items() if k in DEVICE_KEYS}, mesh))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Number of steps that see each training example once on average (ceil)."""
  return max(1, -(-num_examples // global_batch_size))

