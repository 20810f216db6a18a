"""`pooled_images`: the images of several datasets as one unlabelled set, for self-supervised pretraining.

  config.data = dict(name="pooled_images", members=(
      dict(name="medmnist", subset="pneumoniamnist", data_dir=..., channels=3),
      dict(name="medmnist", subset="breastmnist", data_dir=..., channels=3)))

Each split is the concatenation of the members' splits of that name (members lacking it contribute nothing).
Labels are dropped: every example's "label" is 0 of a single class "image", because the members' labels mean
different things (and pretraining must not read them). Members must agree on the spatial shape and the number
of channels. An example keeps its image and spacing; its id is `member index * ID_OFFSET + the member's id`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from medjax.data.datasets.base import DATASETS, Dataset, DatasetInfo, check_index

ID_OFFSET = 10**12


class PooledSource:
  """The examples of several sources in order, with labels replaced by 0."""

  def __init__(self, sources: Sequence[Any], members: Sequence[int], split: str):
    self.sources, self.members, self.split = list(sources), list(members), split
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    i = check_index(index, len(self), self.split)
    k = int(np.searchsorted(self.offsets, i, side="right")) - 1
    example = self.sources[k][i - int(self.offsets[k])]
    out = {"image": example["image"], "label": np.zeros((), np.int32),
           "id": np.asarray(self.members[k] * ID_OFFSET + int(example.get("id", i - self.offsets[k])), np.int64)}
    if "spacing_mm" in example:
      out["spacing_mm"] = example["spacing_mm"]
    return out


@DATASETS.register("pooled_images")
def pooled_images(*, members: Sequence[Mapping[str, Any]]) -> Dataset:
  """The members' images pooled without labels (module docstring).

  Args:
    members: dataset configs, each a dict with "name" (a registered dataset) and its keyword arguments.
  Raises ValueError naming the member whose shape or channels differ from the first one's, or a member
  without a "name".
  """
  if not members:
    raise ValueError("dataset 'pooled_images': members is empty; give at least one dataset config.")
  built: List[Dataset] = []
  for k, member in enumerate(members):
    member = dict(member)
    name = member.pop("name", None)
    if name is None:
      raise ValueError(f"dataset 'pooled_images': members[{k}] has no 'name' (got keys {sorted(member)}).")
    dataset = DATASETS.build(name, member, where=f"config.data.members[{k}]")
    first = built[0].info if built else dataset.info
    if (dataset.info.image_shape, dataset.info.num_channels) != (first.image_shape, first.num_channels):
      raise ValueError(f"dataset 'pooled_images': members[{k}] ({name}) has images {dataset.info.image_shape} x "
                       f"{dataset.info.num_channels} channels, members[0] has {first.image_shape} x "
                       f"{first.num_channels}; pooled images must agree (set size / image_size / channels).")
    built.append(dataset)
  first = built[0].info
  info = DatasetInfo(task="classification", spatial_dims=first.spatial_dims, image_shape=first.image_shape,
                     num_channels=first.num_channels, num_classes=1, class_names=("image",), label_kind="class")
  splits = list(dict.fromkeys(s for d in built for s in d.splits))
  sources = {}
  for split in splits:
    having = [(k, d.source(split)) for k, d in enumerate(built) if split in d.splits]
    sources[split] = PooledSource([s for _, s in having], [k for k, _ in having], split)
  return Dataset(info=info, sources=sources)
