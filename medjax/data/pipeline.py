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
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from medjax import sharding
from medjax.data import preprocess, sampling
from medjax.registry import merge_options
from medjax.typing import HostBatch

# Keys that travel to the devices; everything else (ids, metadata) stays on the host.
DEVICE_KEYS = ("image", "label", "mask", "weight", "spacing_mm", "distance_map", "class_label",
               "example_valid",  # DP-SGD's Poisson batches: 0 marks padding (medjax.privacy.clipping)
               "site",  # the site / scanner of an example (the "sites" dataset), a domain label for DANN
               # a whole case's sliding-window plan (`inference.cases.place_case`)
               "window_origins", "window_valid", "window_steps")


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of examples in `epoch`: a permutation of range(num_examples) seeded by (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_examples)


def collate(examples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Stacks a list of example dicts into a dict of arrays with a leading batch axis. A value that is itself a
  dict (a multimodal example's "image": modalities, presence flags, tabular arrays) is stacked leaf by leaf."""
  def stack(values: Sequence[Any], where: str) -> Any:
    if isinstance(values[0], Mapping):
      keys = values[0].keys()
      for i, value in enumerate(values):
        if not isinstance(value, Mapping) or value.keys() != keys:
          got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
          raise ValueError(f"collate: example {i} has {where}keys {got}, expected {sorted(keys)}.")
      return {key: stack([v[key] for v in values], f"{where}{key!r} ") for key in keys}
    return np.stack([np.asarray(v) for v in values])
  return stack(list(examples), "")


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
    sampler: "shuffle" (every example once per epoch), "balanced" (class-balanced draws with replacement,
      classification only; see `sampling`) or "poisson" (DP-SGD: each example with probability
      `poisson_rate`, padded to a multiple of `poisson_bucket` slots up to `global_batch_size`, so batch
      shapes vary by step; "example_valid" marks the sampled ones).
    balance_power: exponent of the inverse class frequency for "balanced" (1 = equal class shares).
    poisson_rate: the sample rate of "poisson".
    poisson_bucket: "poisson" pads each batch to a multiple of this (a multiple of the process count and
      the data-parallel width); 0: every batch has `global_batch_size` slots.

  A source with a `sample(index, rng)` method (e.g. `sampling.PatchSampler`) is asked for a random draw of
  each example, with a generator seeded by (seed, stream position), instead of `source[index]`.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int, process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 2, prefetch: int = 2,
               sampler: str = "shuffle", balance_power: float = 1.0, poisson_rate: Optional[float] = None,
               poisson_bucket: int = 0):
    self.source = source
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError("TrainBatches: the training split is empty.")
    if sampler not in sampling.SAMPLERS:
      raise ValueError(f"TrainBatches: sampler must be one of {sampling.SAMPLERS}, got {sampler!r}.")
    self.sampler = sampler
    if (sampler == "poisson") != (poisson_rate is not None):
      raise ValueError("TrainBatches: sampler='poisson' needs poisson_rate (and only it takes one).")
    self.poisson_rate = poisson_rate
    self.poisson_bucket = int(poisson_bucket)
    self._probabilities = (sampling.balanced_probabilities(sampling.class_counts_of(source), balance_power)
                           if sampler == "balanced" else None)
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    for what, size in (("Global batch size", global_batch_size), ("Poisson batch bucket", self.poisson_bucket)):
      if size % self.process_count:
        raise ValueError(f"{what} {size} is not divisible by the {self.process_count} processes.")
    self.num_threads = num_threads
    self.prefetch = prefetch

  def global_indices(self, step: int) -> np.ndarray:
    """Indices into the source of the global batch at `step`, shape (global_batch_size,) (under "poisson", the
    step's padded size)."""
    if self.poisson_rate is not None:
      return self.poisson(step)[0]
    positions = step * self.global_batch_size + np.arange(self.global_batch_size)
    epochs, offsets = np.divmod(positions, self.num_examples)
    result = np.empty_like(positions)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      result[chosen] = self.epoch_order(int(epoch))[offsets[chosen]]
    return result

  def poisson(self, step: int):
    """`sampling.poisson_batch` of `step`: (indices, valid, number drawn) of the global batch."""
    return sampling.poisson_batch(self.seed, step, self.num_examples, self.poisson_rate, self.global_batch_size,
                                  self.poisson_bucket)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The examples of `epoch` in order, (num_examples,)."""
    if self._probabilities is not None:
      return sampling.balanced_epoch(self.seed, epoch, self._probabilities)
    return epoch_permutation(self.seed, epoch, self.num_examples)

  def local_draws(self, step: int):
    """(source index, stream position) of each example of this process's slice of the batch at `step`."""
    indices = self.global_indices(step)
    mine = _process_slice(len(indices), self.process_index, self.process_count)
    positions = step * self.global_batch_size + np.arange(len(indices))
    return list(zip(indices[mine].tolist(), positions[mine].tolist()))

  def example(self, index: int, position: int):
    """Example `index` as drawn at stream `position` (a random patch for sources that sample)."""
    if hasattr(self.source, "sample"):
      return self.source.sample(index, sampling.position_rng(self.seed, position))
    return self.source[index]

  def host_batch(self, step: int) -> Dict[str, np.ndarray]:
    """This process's slice of the batch at `step` (with "example_valid" (B,) under Poisson sampling)."""
    batch = collate([self.example(i, p) for i, p in self.local_draws(step)])
    if self.poisson_rate is not None:
      valid = self.poisson(step)[1]
      batch["example_valid"] = valid[_process_slice(len(valid), self.process_index, self.process_count)]
    return batch

  def grain_iterate(self, start_step: int, num_workers: int) -> Iterator[Dict[str, np.ndarray]]:
    """As `iterate`, with the host batches built by `num_workers` Grain worker processes.

    Grain maps step -> host batch one to one, so the stream is the same whatever the worker count, and a
    resumed run starts at `start_step` with no iterator state to restore.
    """
    import grain  # worker processes are optional
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; outside an absl app take their defaults
      flags.FLAGS.mark_as_parsed()
    steps = grain.MapDataset.range(start_step, start_step + 2**40).map(_HostBatchAt(self))
    stream = steps.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(stream)

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


class _HostBatchAt:
  """Picklable step -> host batch function for Grain workers."""

  def __init__(self, batches: TrainBatches):
    self.batches = batches

  def __call__(self, step: int) -> Dict[str, np.ndarray]:
    return self.batches.host_batch(int(step))


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


def device_batches(host_batches: Iterator[HostBatch], mesh, prefetch: int = 2, *,
                   replicate: bool = False) -> Iterator[Dict[str, jax.Array]]:
  """Moves host batches onto the mesh as global arrays, `prefetch` batches ahead of the consumer.

  Only `DEVICE_KEYS` travel; `jax.make_array_from_process_local_data` starts the copies asynchronously,
  so keeping a short queue overlaps the transfer of the next batch with the current step. Batches are split
  over the data axis (each process holds its slice), or with `replicate` copied whole to every device (each
  process holds the whole batch: `case_batches`).
  """
  place = sharding.host_to_replicated if replicate else sharding.host_to_global
  queue: collections.deque = collections.deque()
  for host_batch in host_batches:
    queue.append(place({k: v for k, v in host_batch.items() if k in DEVICE_KEYS}, mesh))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def case_batches(source, place: Optional[Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]] = None
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """Every example of `source` once, in order, each as a batch of one with "weight" (1,): whole cases of
  different shapes, which cannot be stacked. `place` transforms each example first (e.g. puts it on its
  sliding-window canvas). Every process reads every case (`device_batches(replicate=True)` puts each on all
  devices, and the sliding window splits its windows over them)."""
  for index in range(len(source)):
    example = source[index]
    batch = collate([place(example) if place is not None else example])
    batch["weight"] = np.ones((1,), np.float32)
    yield batch


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Number of steps that see each training example once on average (ceil)."""
  return max(1, -(-num_examples // global_batch_size))



class DeviceCrops:
  """Training patches cut on the devices from a copy of every training case kept in accelerator memory.

  For datasets that fit on the device (a few hundred small volumes), only the case index and start corner
  of each patch travel per step, and `lax.dynamic_slice` cuts the patch on device: no host crop, no
  host-to-device copy of the patch. Cases are padded as `PatchSampler.crop` pads them, then at the far end
  to a common shape, and replicated over the mesh. The patches equal the host path's patches exactly
  (same `PatchSampler.location` draws), so switching paths changes speed, not results.

  Args:
    batches: the `TrainBatches` whose order and positions are followed; its source is a `PatchSampler`.
    mesh: the device mesh.
    max_bytes: refuse to cache more than this many bytes (a clear error suggests the host path instead).
  """

  def __init__(self, batches: TrainBatches, mesh, *, max_bytes: Optional[float] = None):
    sampler = batches.source
    if not isinstance(sampler, sampling.PatchSampler):
      raise TypeError("DeviceCrops needs TrainBatches over a sampling.PatchSampler (set input.patch_size).")
    self.batches, self.sampler, self.mesh = batches, sampler, mesh
    cases = [sampler.source[i] for i in range(len(sampler))]
    self._host_cases = cases
    padded = [sampling.pad_to_patch(np.asarray(c["image"]), np.asarray(c["label"]), sampler.patch_size,
                                    sampler.pad_value) for c in cases]
    common = np.max([label.shape for _, label in padded], axis=0)
    num_classes_bound = max(int(label.max()) for _, label in padded) + 1
    label_dtype = np.uint8 if num_classes_bound <= 255 else np.int32
    channels = padded[0][0].shape[-1]
    nbytes = len(cases) * int(np.prod(common)) * (channels * 4 + np.dtype(label_dtype).itemsize)
    if max_bytes is not None and nbytes > max_bytes:
      raise ValueError(f"DeviceCrops: caching {len(cases)} training cases padded to {tuple(common)} needs "
                       f"{nbytes / 2**30:.2f} GiB, more than input.device_cache_max_gib allows "
                       f"({max_bytes / 2**30:.2f} GiB). Set input.device_crop=False to crop on the host.")
    images = np.zeros((len(cases), *common, channels), np.float32)
    labels = np.zeros((len(cases), *common), label_dtype)
    for i, (image, label) in enumerate(padded):
      window = tuple(slice(0, s) for s in label.shape)
      images[(i,) + window] = image
      labels[(i,) + window] = label
    replicated = sharding.replicated(mesh)
    self.images = jax.device_put(images, replicated)
    self.labels = jax.device_put(labels, replicated)
    patch = sampler.patch_size

    def cut(images, labels, case, start):
      def one(c, s):
        image = jax.lax.dynamic_slice(images[c], (*s, 0), (*patch, channels))
        label = jax.lax.dynamic_slice(labels[c], tuple(s), patch)
        return image, label.astype(np.int32)
      return jax.vmap(one)(case, start)

    batch_spec = sharding.batch_sharding(mesh)
    self._cut = jax.jit(cut, in_shardings=(replicated, replicated, batch_spec, batch_spec),
                        out_shardings=(batch_spec, batch_spec))

  def host_locations(self, step: int) -> Dict[str, np.ndarray]:
    """This process's case indices (b,) int32, start corners (b, d) int32 and small per-example keys."""
    cases, starts, extra = [], [], []
    for index, position in self.batches.local_draws(step):
      example = self._host_cases[index]
      start = self.sampler.location(index, sampling.position_rng(self.batches.seed, position), example)
      cases.append(index)
      starts.append(start)
      extra.append({k: v for k, v in example.items() if k in ("spacing_mm", "mask", "weight", "id")})
    batch = collate(extra) if extra and extra[0] else {}
    batch["case"] = np.asarray(cases, np.int32)
    batch["start"] = np.asarray(starts, np.int32)
    return batch

  def iterate(self, start_step: int) -> Iterator[Dict[str, jax.Array]]:
    """Device batches ("image", "label", plus "spacing_mm"/"mask" when the cases have them) from `start_step`."""
    step = start_step
    while True:
      host = self.host_locations(step)
      device = sharding.host_to_global({k: v for k, v in host.items() if k in DEVICE_KEYS + ("case", "start")},
                                       self.mesh)
      image, label = self._cut(self.images, self.labels, device.pop("case"), device.pop("start"))
      yield {"image": image, "label": label, **device}
      step += 1


# config.input keys and their defaults (batch_size and eval_batch_size are resolved by `medjax.build.settings`).
INPUT_OPTIONS = dict(
    batch_size=None, eval_batch_size=None,
    patch_size=None,            # spatial patch (voxels) cut from whole cases; None = examples are used whole
    foreground_fraction=0.33,   # share of training patches centred on foreground (nnU-Net's 1/3)
    pad_value=0.0,              # image value padding cases smaller than the patch
    sampler="shuffle",          # or "balanced" (classification)
    balance_power=1.0,          # inverse class frequency exponent of the balanced sampler
    loader="threads",           # or "grain": host batches built in Grain worker processes
    num_workers=2,              # threads or Grain processes preparing host batches
    device_crop=False,          # cut patches on device from cases cached in accelerator memory
    device_cache_max_gib=None,  # refuse a device cache larger than this
    distance_maps=False,        # add "distance_map" (signed distances in mm per class) for the boundary loss
)


def input_options(input_config: Mapping[str, Any]) -> Dict[str, Any]:
  """`config.input` merged over `INPUT_OPTIONS`; an unknown key raises ValueError with a did-you-mean."""
  options = merge_options(input_config, INPUT_OPTIONS, "config.input")
  if options["loader"] not in ("threads", "grain"):
    raise ValueError(f"config.input.loader must be 'threads' or 'grain', got {options['loader']!r}.")
  if options["sampler"] == "poisson":
    raise ValueError("config.input.sampler='poisson' is set by DP training itself: set config.privacy (Poisson "
                     "sampling is its default, config.privacy.sampling) and keep input.sampler 'shuffle'.")
  if options["sampler"] not in sampling.SAMPLERS:
    raise ValueError(f"config.input.sampler must be one of {sampling.SAMPLERS}, got {options['sampler']!r}.")
  if options["device_crop"] and options["patch_size"] is None:
    raise ValueError("config.input.device_crop=True needs config.input.patch_size.")
  return options


class WithDistanceMaps:
  """Adds "distance_map" (*spatial, K) float32, the signed distance in mm to each class's boundary
  (`preprocess.signed_distance_maps`), to every example (and every patch draw) of a segmentation source.
  Computed after cropping, so a patch's map measures distances within the patch."""

  def __init__(self, source, num_classes: int):
    self.source, self.num_classes = source, int(num_classes)

  def __len__(self) -> int:
    return len(self.source)

  def _add(self, example):
    example = dict(example)
    spacing = example.get("spacing_mm", np.ones(np.asarray(example["label"]).ndim, np.float32))
    example["distance_map"] = preprocess.signed_distance_maps(example["label"], self.num_classes, spacing)
    return example

  def __getitem__(self, index: int):
    return self._add(self.source[index])

  def __getattr__(self, name):
    if name == "sample" and hasattr(self.source, "sample"):
      return lambda index, rng: self._add(self.source.sample(index, rng))
    if name == "source":  # not yet set while unpickling
      raise AttributeError(name)
    return getattr(self.source, name)


def prepare_source(source, input_config: Mapping[str, Any], *, seed: int, num_classes: int,
                   for_training: bool = False):
  """`source` as config.input asks for it: cut into patches (`PatchSampler`) when `patch_size` is set, and,
  for training, with distance maps added when `distance_maps` is set (only the loss reads them)."""
  options = input_options(input_config)
  if options["patch_size"] is not None:
    source = sampling.PatchSampler(source, options["patch_size"],
                                   foreground_fraction=options["foreground_fraction"], seed=seed,
                                   pad_value=options["pad_value"])
  if options["distance_maps"] and for_training:
    source = WithDistanceMaps(source, num_classes)
  return source


def train_stream(source, input_config: Mapping[str, Any], *, seed: int, start_step: int,
                 mesh, poisson: Optional[Tuple[float, int]] = None) -> Iterator[Dict[str, jax.Array]]:
  """Global device batches for steps start_step, start_step + 1, ... as config.input describes them.

  `source` is the training split (already wrapped by `patch_source` when patches are used). `poisson`:
  (sample rate, largest padded batch, bucket) for DP-SGD's Poisson sampling (`medjax.privacy.options`), which
  then replaces config.input's sampler and batch size.
  """
  options = input_options(input_config)
  batch_size, sampler, rate, bucket = int(options["batch_size"]), options["sampler"], None, 0
  if poisson is not None:
    rate, batch_size, bucket = float(poisson[0]), int(poisson[1]), int(poisson[2])
    sampler = "poisson"
  batches = TrainBatches(source, global_batch_size=batch_size, seed=seed,
                         num_threads=max(1, int(options["num_workers"])), sampler=sampler,
                         balance_power=float(options["balance_power"]), poisson_rate=rate,
                         poisson_bucket=bucket)
  if options["device_crop"]:
    max_gib = options["device_cache_max_gib"]
    return DeviceCrops(batches, mesh, max_bytes=None if max_gib is None else float(max_gib) * 2**30
                       ).iterate(start_step)
  if options["loader"] == "grain" and int(options["num_workers"]) > 0:
    return device_batches(batches.grain_iterate(start_step, int(options["num_workers"])), mesh)
  return device_batches(batches.iterate(start_step), mesh)
