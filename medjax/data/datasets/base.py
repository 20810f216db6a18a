"""Dataset contract shared by every dataset builder: `DatasetInfo`, `Dataset`, `DataSource`.

A builder (registered in `medjax.data.datasets.DATASETS`) takes keyword arguments and returns a `Dataset`:
static metadata (`info`) plus one random-access `DataSource` per split. `src[i]` is a dict of numpy arrays:

  "id"          int64 scalar, a stable example id, unique across the dataset's splits
  "image"       float32 (*spatial, C); for a multimodal dataset (`DatasetInfo.multimodal`) a dict of named image
                modalities, presence flags and tabular arrays (`medjax.data.datasets.multimodal`)
  "label"       int32 (*spatial) for segmentation ("map"), int32 scalar for classification ("class")
  "spacing_mm"  float32 (spatial_dims,), voxel size in mm in the spatial order (z, y, x) / (y, x)

and depends only on (seed, split, i). This module imports numpy only (no jax): data code runs on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from medjax.registry import Registry

# Builders register here (re-exported as medjax.data.datasets.DATASETS); defined in this leaf module so the
# builder modules can import it without a cycle through the package __init__.
DATASETS = Registry("dataset")

TASKS = ("segmentation", "classification")
LABEL_KINDS = {"segmentation": "map", "classification": "class"}
# Split codes enter both the per-example seed and the example id, so ids never collide across splits.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
ID_STRIDE = 10**9  # id = split_code * ID_STRIDE + index


@dataclasses.dataclass(frozen=True)
class MultimodalInfo:
  """What a multimodal case holds, for models and validation.

  modalities: image modality names, in the order models see them; shapes / channels: each one's spatial shape
  and channel count; numeric / categorical: tabular column names; categorical_sizes: vocabulary size + 1 (index
  0 = missing/unknown) per categorical column; may_be_missing: modalities a case may lack (others are required).
  """
  modalities: Tuple[str, ...]
  shapes: Tuple[Tuple[int, ...], ...]
  channels: Tuple[int, ...]
  numeric: Tuple[str, ...] = ()
  categorical: Tuple[str, ...] = ()
  categorical_sizes: Tuple[int, ...] = ()
  may_be_missing: Tuple[str, ...] = ()


def check_present(present: Mapping[str, float], info: MultimodalInfo, case: str) -> None:
  """Raises ValueError naming `case` and the modality when a modality outside `info.may_be_missing` is absent,
  or when a case holds no image modality at all."""
  for name in info.modalities:
    if not present.get(name) and name not in info.may_be_missing:
      raise ValueError(f"case {case}: modality {name!r} is missing, and the dataset declares it required (add it "
                       f"to the modalities that may be missing to accept such cases).")
  if info.modalities and not any(present.get(name) for name in info.modalities):
    raise ValueError(f"case {case}: none of the image modalities {info.modalities} is present.")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset, known before any example is generated or read.

  Attributes:
    task: "segmentation" or "classification".
    spatial_dims: 2 or 3.
    image_shape: spatial shape (z, y, x) or (y, x) of every image, in voxels.
    num_channels: C of the image (*spatial, C).
    num_classes: number of label classes (background included for segmentation).
    class_names: one name per class; index 0 is "background" for segmentation.
    label_kind: "map" (segmentation, int32 (*spatial)) or "class" (classification, int32 scalar).
    multimodal: None for one image per example; else what each example's "image" dict holds
      (`MultimodalInfo`: named image modalities, a presence flag each, preprocessed tabular columns), and then
      image_shape / num_channels are those of the first modality.
  """
  task: str
  spatial_dims: int
  image_shape: Tuple[int, ...]
  num_channels: int
  num_classes: int
  class_names: Tuple[str, ...]
  label_kind: str
  multimodal: Optional[MultimodalInfo] = None

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"DatasetInfo.task must be one of {TASKS}, got {self.task!r}.")
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"DatasetInfo.spatial_dims must be 2 or 3, got {self.spatial_dims!r}.")
    object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
    object.__setattr__(self, "class_names", tuple(self.class_names))
    if len(self.image_shape) != self.spatial_dims:
      raise ValueError(f"DatasetInfo.image_shape {self.image_shape} has {len(self.image_shape)} axes but "
                       f"spatial_dims={self.spatial_dims}.")
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"DatasetInfo.class_names {self.class_names} has {len(self.class_names)} names but "
                       f"num_classes={self.num_classes}.")
    if self.label_kind != LABEL_KINDS[self.task]:
      raise ValueError(f"DatasetInfo.label_kind for task {self.task!r} must be {LABEL_KINDS[self.task]!r}, "
                       f"got {self.label_kind!r}.")


@runtime_checkable
class DataSource(Protocol):
  """Random access to one split: `len(src)` examples, `src[i]` -> dict of np.ndarray (see module doc)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A built dataset: `info` plus one `DataSource` per split name ("train", "val", "test", ...)."""
  info: DatasetInfo
  sources: Mapping[str, DataSource] = dataclasses.field(hash=False)

  def __post_init__(self):
    # A read-only view, so the frozen dataclass cannot be changed through its mapping either.
    object.__setattr__(self, "sources", types.MappingProxyType(dict(self.sources)))

  # mappingproxy does not pickle; ship a plain dict and re-wrap it.
  def __getstate__(self):
    return {"info": self.info, "sources": dict(self.sources)}

  def __setstate__(self, state):
    object.__setattr__(self, "info", state["info"])
    object.__setattr__(self, "sources", types.MappingProxyType(state["sources"]))

  @property
  def splits(self) -> Tuple[str, ...]:
    return tuple(self.sources)

  def source(self, split: str) -> DataSource:
    """Returns the `DataSource` of `split`; an unknown split raises KeyError naming the known ones."""
    try:
      return self.sources[split]
    except (KeyError, TypeError):
      raise KeyError(f"Unknown split {split!r}; known splits: {', '.join(self.sources)}.") from None


def check_index(index: Any, length: int, split: str) -> int:
  """Normalises `index` (Python or numpy integer, negative counts from the end) into [0, length)."""
  if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
    raise TypeError(f"Split {split!r}: example index must be an integer, got {index!r}.")
  i = int(index)
  if i < 0:
    i += length
  if not 0 <= i < length:
    raise IndexError(f"Split {split!r}: index {int(index)} out of range for {length} examples.")
  return i


def _read_only(example: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  # Cached arrays are shared between calls: an in-place edit downstream must fail loudly rather than
  # silently change what the next epoch sees.
  for value in example.values():
    value.setflags(write=False)
  return example


class GeneratedSource:
  """A `DataSource` whose examples are generated on demand by `generate(rng, split, index)`.

  Example i of `split` is generated from `np.random.default_rng([seed, split_code, i])`, so it depends only
  on (seed, split, i), whatever order or process asks for it. The returned dict gains "id" =
  split_code * 10**9 + i (int64). The last `cache_size` examples are kept in an LRU cache (0 disables it);
  returned arrays are read-only because cached ones are shared.
  """

  def __init__(self, split: str, length: int, seed: int,
               generate: Callable[[np.random.Generator, int], Dict[str, np.ndarray]], cache_size: int = 0):
    if split not in SPLIT_CODES:
      raise KeyError(f"Unknown split {split!r}; known splits: {', '.join(SPLIT_CODES)}.")
    if length < 0 or length >= ID_STRIDE:
      raise ValueError(f"Split {split!r}: length must be in [0, {ID_STRIDE}), got {length}.")
    self.split = split
    self.split_code = SPLIT_CODES[split]
    self.length = int(length)
    self.seed = int(seed)
    self.cache_size = int(cache_size)
    self._generate_fn = generate
    self._make_cache()

  def _make_cache(self):
    self._get = functools.lru_cache(maxsize=self.cache_size)(self._generate) if self.cache_size > 0 \
        else self._generate

  def _generate(self, i: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.split_code, i])
    example = dict(self._generate_fn(rng, i))
    example["id"] = np.asarray(self.split_code * ID_STRIDE + i, dtype=np.int64)
    return _read_only(example)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    return dict(self._get(check_index(index, self.length, self.split)))

  def __iter__(self):
    for i in range(self.length):
      yield self[i]

  def cache_info(self):
    return self._get.cache_info() if self.cache_size > 0 else None

  # The lru_cache wrapper is not picklable; drop it when a worker process receives the source.
  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_get"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._make_cache()

  def __repr__(self) -> str:
    return f"GeneratedSource(split={self.split!r}, length={self.length}, seed={self.seed})"


def check_labels(source: Any, info: DatasetInfo, split: str) -> None:
  """Raises ValueError naming the split and its first bad cases when a label lies outside the declared
  classes [0, info.num_classes) (multi-label 0/1 vectors: outside {0, 1}).

  Runs when a run starts, so a bad validation or test case stops it before the first training step rather
  than at the first evaluation. Classification sources with `labels()` answer without reading images; other
  sources read every example (volume datasets cache their preprocessed cases, so the evaluations then read
  them from the cache).
  """
  bad = []
  if info.label_kind == "class" and hasattr(source, "labels"):
    labels = np.asarray(source.labels())
    checked = [(i, labels[i]) for i in range(len(labels))]
  else:
    checked = ((i, source[i].get("label")) for i in range(len(source)))
  for i, label in checked:
    if label is None:
      continue
    label = np.asarray(label)
    high = 2 if info.label_kind == "class" and label.ndim == 1 else info.num_classes
    outside = np.unique(label[(label < 0) | (label >= high)])
    if outside.size:
      name = source.case_name(i) if hasattr(source, "case_name") else f"example {i}"
      bad.append(f"{name}: {outside[:5].tolist()}")
      if len(bad) == 5:
        break
  if bad:
    raise ValueError(f"split {split!r}: labels outside the declared classes 0..{info.num_classes - 1} "
                     f"{info.class_names}: {'; '.join(bad)}.")
