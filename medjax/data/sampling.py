"""Which examples and which patches a training step sees: class-balanced sampling and patch sampling.

Both are pure functions of (seed, position in the stream), like the shuffled order in `pipeline`, so a
resumed run draws exactly what the uninterrupted run drew.

- Class-balanced sampling (classification): each epoch draws N examples with replacement, example i with
  probability proportional to count(class(i)) ** -power. power=1 gives every class the same expected share
  (PyTorch's WeightedRandomSampler with inverse-frequency weights); power=0.5 is a milder square-root
  rebalancing; power=0 is plain sampling with replacement.
- Patch sampling (segmentation of cases larger than the network's input): `PatchSampler` wraps a source of
  whole cases and returns fixed-size patches. A `foreground_fraction` of training patches is centred on a
  voxel of a foreground class chosen uniformly among the classes present in the case (nnU-Net forces 1/3
  of its patches this way: Isensee et al., Nature Methods 18, 2021); the rest are placed uniformly. Cases
  smaller than the patch are padded (image `pad_value`, label 0) with a warning naming the case, not an
  error. Evaluation patches (`source[i]`) are deterministic per case and centred on foreground when the
  case has any.
- The crop is split into `location` (case -> start corner, on the host) and `crop` (numpy) so that the
  same locations can be cut out on device from a cached copy of the volumes (`pipeline.DeviceCrops`).
"""

from __future__ import annotations

import threading
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

SAMPLERS = ("shuffle", "balanced", "poisson")
_PATCH_STREAM = 0x9A7C4  # keeps patch draws independent of the shuffle stream with the same seed


def class_counts_of(source) -> np.ndarray:
  """Integer class label of every example of a classification source, (N,) int64.

  Uses `source.labels()` when the source has it (no image is loaded), else reads every example.
  """
  if hasattr(source, "labels"):
    labels = np.asarray(source.labels())
  else:
    labels = np.asarray([np.asarray(source[i]["label"]) for i in range(len(source))])
  if labels.ndim != 1:
    raise ValueError(f"Class-balanced sampling needs one integer class per example; the labels have shape "
                     f"{labels.shape} (multi-label or segmentation). Use input.sampler='shuffle'.")
  return labels.astype(np.int64)


def balanced_probabilities(labels: np.ndarray, power: float = 1.0) -> np.ndarray:
  """Sampling probability of each example, (N,) float64 summing to 1: count(class) ** -power, normalised."""
  labels = np.asarray(labels)
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  weights = counts[inverse].astype(np.float64) ** -float(power)
  return weights / weights.sum()


def balanced_epoch(seed: int, epoch: int, probabilities: np.ndarray) -> np.ndarray:
  """The N indices drawn with replacement for `epoch`, seeded by (seed, epoch)."""
  rng = np.random.default_rng([seed, epoch, 0xBA1A])
  return rng.choice(len(probabilities), size=len(probabilities), replace=True, p=probabilities)


def bucketed_size(drawn, bucket: int, largest: int):
  """Slots of a Poisson batch that drew `drawn` examples (int or array): the next multiple of `bucket` at or
  above it (one bucket for an empty draw), at most `largest`, the run's padded batch size."""
  return np.minimum(-(-np.maximum(drawn, 1) // bucket) * bucket, largest)


def poisson_batch(seed: int, step: int, num_examples: int, rate: float, size: int, bucket: int = 0):
  """The Poisson-sampled batch of `step`: every example independently with probability `rate`, as DP-SGD's
  accounting assumes, padded to a multiple of `bucket` slots (0: always to `size`), at most `size` (beyond it
  truncated, which the caller makes rare).

  The sample is drawn as k ~ Binomial(N, rate) followed by k distinct indices uniformly at random, which is
  the same distribution (jax-privacy's CyclicPoissonSampling draws it the same way); seeded by (seed, step) so
  a resumed run draws the same batches. The padding does not change the draw.

  Returns:
    (indices (slots,) int64, valid (slots,) float32 with 1 for sampled slots and 0 for padding, k the number of
    examples Poisson sampling drew, which exceeds `size` only when the batch was truncated).
  """
  rng = np.random.default_rng([seed, step, 0x9015])
  drawn = int(rng.binomial(num_examples, rate))
  kept = min(drawn, size)
  chosen = rng.choice(num_examples, size=kept, replace=False, shuffle=True) if kept else np.zeros(0, np.int64)
  slots = int(bucketed_size(kept, bucket, size)) if bucket else size
  indices = np.zeros(slots, np.int64)
  indices[:kept] = chosen
  if kept and kept < slots:
    indices[kept:] = chosen[0]  # padding repeats a sampled example; its weight is 0
  valid = np.zeros(slots, np.float32)
  valid[:kept] = 1.0
  return indices, valid, drawn


def position_rng(seed: int, position: int) -> np.random.Generator:
  """The generator of the patch draw at stream position `position` (step * global_batch + j)."""
  return np.random.default_rng([seed, position, _PATCH_STREAM])


class PatchSampler:
  """A `DataSource` of fixed-size patches cut from a source of whole cases (see the module doc).

  Args:
    source: random access to whole cases: "image" (*spatial, C), "label" (*spatial) int, other keys kept.
    patch_size: spatial patch shape (z, y, x) / (y, x) in voxels.
    foreground_fraction: share of training patches centred on a foreground voxel (0 to 1).
    seed: seed of the deterministic evaluation patches (`source[i]`).
    pad_value: image value of padding for cases smaller than the patch (the label pads with 0).
    max_locations: foreground voxels remembered per class and case (a random subset of at most this many),
      so large organs cost bounded memory.

  `sample(i, rng)` is a training draw; `source[i]` the fixed evaluation patch of case i. Both return the
  source's example with "image" (*patch_size, C) and "label" (*patch_size) replaced.
  """

  def __init__(self, source, patch_size: Sequence[int], *, foreground_fraction: float = 0.33, seed: int = 0,
               pad_value: float = 0.0, max_locations: int = 10_000):
    self.source = source
    self.patch_size = tuple(int(p) for p in patch_size)
    if not self.patch_size or min(self.patch_size) < 1:
      raise ValueError(f"PatchSampler: patch_size must be positive integers, got {patch_size!r}.")
    if not 0.0 <= foreground_fraction <= 1.0:
      raise ValueError(f"PatchSampler: foreground_fraction must be in [0, 1], got {foreground_fraction!r}.")
    self.foreground_fraction = float(foreground_fraction)
    self.seed = int(seed)
    self.pad_value = float(pad_value)
    self.max_locations = int(max_locations)
    self._locations: Dict[int, Dict[int, np.ndarray]] = {}
    self._warned = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.source)

  # Worker processes get the source, not the caches (rebuilt lazily there).
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_locations"], state["_warned"], state["_lock"] = {}, set(), None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _check_case(self, index: int, example) -> Tuple[int, ...]:
    label = np.asarray(example["label"])
    image = np.asarray(example["image"])
    spatial = len(self.patch_size)
    if label.ndim != spatial or image.shape[:spatial] != label.shape:
      raise ValueError(f"PatchSampler: case {index} (id {_case_id(example, index)}) has image {image.shape} and "
                       f"label {label.shape}; expected (*spatial, C) and (*spatial) with {spatial} spatial axes "
                       f"to match patch_size {self.patch_size}.")
    shape = label.shape
    if any(s < p for s, p in zip(shape, self.patch_size)):
      key = _case_id(example, index)
      with self._lock:
        first = key not in self._warned
        self._warned.add(key)
      if first:
        warnings.warn(f"Case {key}: shape {shape} is smaller than the patch {self.patch_size} along some axis; "
                      "it is padded (image with pad_value, label with background 0).", stacklevel=3)
    return shape

  def class_locations(self, index: int, label: np.ndarray) -> Dict[int, np.ndarray]:
    """Foreground voxel coordinates per class present in case `index`: {class: (M, d) int64}, M <= max."""
    with self._lock:
      cached = self._locations.get(index)
    if cached is not None:
      return cached
    rng = np.random.default_rng([self.seed, index, 0x10C])
    found = {}
    for cls in np.unique(label):
      if cls <= 0:
        continue
      where = np.argwhere(label == cls)
      if len(where) > self.max_locations:
        where = where[np.sort(rng.choice(len(where), self.max_locations, replace=False))]
      found[int(cls)] = where
    with self._lock:
      self._locations[index] = found
    return found

  def location(self, index: int, rng: np.random.Generator, example=None, *,
               force_foreground: Optional[bool] = None) -> np.ndarray:
    """Start corner (d,) int64 of a patch of case `index` in the padded case's coordinates.

    With `force_foreground` None, the patch is foreground-centred with probability `foreground_fraction`.
    A case without foreground gets a uniformly placed patch either way.
    """
    example = self.source[index] if example is None else example
    shape = self._check_case(index, example)
    padded = np.maximum(np.asarray(shape), self.patch_size)
    offset = (padded - np.asarray(shape)) // 2  # where the case sits inside its padding
    highest = padded - np.asarray(self.patch_size)  # inclusive upper bound of the start corner
    if force_foreground is None:
      force_foreground = rng.random() < self.foreground_fraction
    locations = self.class_locations(index, np.asarray(example["label"])) if force_foreground else {}
    if locations:
      classes = sorted(locations)
      voxels = locations[classes[rng.integers(len(classes))]]
      centre = voxels[rng.integers(len(voxels))] + offset
      start = centre - np.asarray(self.patch_size) // 2
    else:
      start = np.array([rng.integers(h + 1) for h in highest])
    return np.clip(start, 0, highest).astype(np.int64)

  def crop(self, example, start: np.ndarray) -> Dict[str, np.ndarray]:
    """The patch of `example` at `start` (padded-case coordinates); other keys are passed through."""
    image, label = np.asarray(example["image"]), np.asarray(example["label"])
    image, label = pad_to_patch(image, label, self.patch_size, self.pad_value)
    window = tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch_size))
    out = dict(example)
    out["image"] = np.ascontiguousarray(image[window])
    out["label"] = np.ascontiguousarray(label[window])
    return out

  def sample(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A training patch of case `index` drawn with `rng`."""
    example = self.source[index]
    return self.crop(example, self.location(index, rng, example))

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    """The evaluation patch of case `index`: fixed per (seed, index), on foreground when there is some."""
    example = self.source[index]
    rng = np.random.default_rng([self.seed, int(index), 0xE7A1])
    return self.crop(example, self.location(int(index), rng, example, force_foreground=True))


def pad_to_patch(image: np.ndarray, label: np.ndarray, patch_size: Sequence[int], pad_value: float = 0.0):
  """Pads a case symmetrically (extra voxel after) up to at least `patch_size`; a no-op when it is large."""
  shape = np.asarray(label.shape)
  padded = np.maximum(shape, patch_size)
  if np.all(padded == shape):
    return image, label
  before = (padded - shape) // 2
  after = padded - shape - before
  spatial = [(int(b), int(a)) for b, a in zip(before, after)]
  image = np.pad(image, spatial + [(0, 0)] * (image.ndim - len(spatial)), constant_values=pad_value)
  label = np.pad(label, spatial, constant_values=0)
  return image, label


def _case_id(example, index: int):
  return int(example["id"]) if "id" in example else index
