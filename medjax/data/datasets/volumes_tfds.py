"""TFDS array_record builders of the volume datasets ("msd", "image_folder"): preprocessed cases, stored once.

    ds = tfds_sources("msd", tfds_dir="/data/tfds", data_dir="/data/msd", task="Task02", patch_size=(80,) * 3)
    ds.source("train")[0]  # the same example as build_dataset("msd", ...) gives, read from array_record

The builder (`builder_class("msd")`, imported lazily: no tensorflow_datasets import until used) builds the
medjax dataset from its keyword arguments and writes every split's examples, normalised, with variable-shape
features (zlib-compressed): "image" float32 (*spatial, C), "label" int32 (*spatial) (an empty (0, ..., 0)
array for unlabelled cases, e.g. the MSD test split) or int64 scalar (classification), "spacing_mm" float32
and "id" int64. A multimodal "image_folder" (`modalities`) stores its examples' nested "image" as they are:
"images" {m: float32 (*patch_m, C_m)}, "present" {m: float32}, "tabular" {"numeric", "missing", "categorical"}
(the record preprocessed with the training split's statistics, fitted when the builder builds the dataset), and no
"spacing_mm". Records are stored in key-hash order, so "id" is the link to the case. The builder config
is named by a hash of the keyword arguments: other arguments (another fold) write another dataset.
Building and reading need tensorflow_datasets and array_record, not TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np

from medjax.data import preprocess
from medjax.data.datasets.base import DATASETS, Dataset, check_index

_CLASSES: Dict[str, Any] = {}


def builder_class(dataset_name: str):
  """The TFDS builder class for volume dataset `dataset_name`: "msd", "image_folder" (or its alias "nifti_folder")."""
  if dataset_name not in ("msd", "image_folder", "nifti_folder"):
    raise ValueError(f"volumes_tfds: no TFDS builder for dataset {dataset_name!r}; known: msd, image_folder "
                     "(alias nifti_folder).")
  if dataset_name not in _CLASSES:
    _CLASSES[dataset_name] = _make_builder_class(dataset_name)
  return _CLASSES[dataset_name]


def _make_builder_class(dataset_name: str):
  import tensorflow_datasets as tfds

  class VolumeBuilder(tfds.core.GeneratorBasedBuilder):
    """Writes the preprocessed cases of a medjax volume dataset (module doc) as array_record.

    VolumeBuilder(dataset_kwargs={...}, data_dir=tfds_dir, file_format="array_record"), then
    `download_and_prepare()` and `as_data_source()`.
    """
    name = f"medjax_{dataset_name}"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Preprocessed whole cases with variable shapes."}

    def __init__(self, *, dataset_kwargs, **kwargs):
      self.dataset_kwargs = dict(dataset_kwargs)
      self.dataset = DATASETS.build(dataset_name, self.dataset_kwargs, where=f"{self.name} dataset_kwargs")
      digest = preprocess.preprocess_config_hash(self.dataset_kwargs)[:16]
      config = tfds.core.BuilderConfig(name=f"h{digest}", description=repr(self.dataset_kwargs))
      super().__init__(config=config, **kwargs)

    def _info(self):
      info = self.dataset.info
      nd = info.spatial_dims
      zlib = tfds.features.Encoding.ZLIB
      label = (tfds.features.Tensor(shape=(None,) * nd, dtype=np.int32, encoding=zlib)
               if info.label_kind == "map" else tfds.features.Scalar(dtype=np.int64))
      if info.multimodal is None:
        image = tfds.features.Tensor(shape=(None,) * nd + (info.num_channels,), dtype=np.float32, encoding=zlib)
        geometry = {"spacing_mm": tfds.features.Tensor(shape=(nd,), dtype=np.float32)}
      else:
        image, geometry = _multimodal_features(tfds, info.multimodal, zlib), {}
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"medjax {dataset_name!r} preprocessed cases ({info.task}).",
          features=tfds.features.FeaturesDict({
              "image": image,
              "label": label,
              **geometry,
              "id": tfds.features.Scalar(dtype=np.int64),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(src) for split, src in self.dataset.sources.items() if len(src)}

    def _generate_examples(self, src):
      info = self.dataset.info
      for i in range(len(src)):
        ex = src[i]
        if "label" in ex:
          label = ex["label"] if info.label_kind == "map" else np.int64(ex["label"])
        else:
          label = np.zeros((0,) * info.spatial_dims, np.int32)
        geometry = {"spacing_mm": ex["spacing_mm"]} if info.multimodal is None else {}
        yield int(ex["id"]), {"image": ex["image"], "label": label, **geometry, "id": np.int64(ex["id"])}

  VolumeBuilder.__name__ = VolumeBuilder.__qualname__ = f"{dataset_name.title().replace('_', '')}Builder"
  return VolumeBuilder


def _multimodal_features(tfds, multimodal, encoding):
  """The FeaturesDict of a multimodal example's "image" (module doc)."""
  images = {m: tfds.features.Tensor(shape=tuple(shape) + (channels,), dtype=np.float32, encoding=encoding)
            for m, shape, channels in zip(multimodal.modalities, multimodal.shapes, multimodal.channels)}
  present = {m: tfds.features.Scalar(dtype=np.float32) for m in multimodal.modalities}
  numeric, categorical = len(multimodal.numeric), len(multimodal.categorical)
  tabular = {"numeric": tfds.features.Tensor(shape=(numeric,), dtype=np.float32),
             "missing": tfds.features.Tensor(shape=(numeric,), dtype=np.float32),
             "categorical": tfds.features.Tensor(shape=(categorical,), dtype=np.int32)}
  features = {"images": tfds.features.FeaturesDict(images), "present": tfds.features.FeaturesDict(present)}
  if numeric or categorical:
    features["tabular"] = tfds.features.FeaturesDict(tabular)
  return tfds.features.FeaturesDict(features)


def _as_example_image(value):
  """A record's "image" as the medjax example holds it: an array, or nested dicts of arrays (multimodal)."""
  if isinstance(value, dict):
    return {key: _as_example_image(v) for key, v in value.items()}
  array = np.asarray(value)
  return array.astype(np.float32) if array.dtype.kind == "f" else array


class TfdsVolumeSource:
  """A TFDS array_record source of `VolumeBuilder` records as medjax examples (i: TFDS storage order)."""

  def __init__(self, source, label_kind: str):
    self.source, self.label_kind = source, label_kind

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    record = self.source[check_index(index, len(self), "tfds")]
    example = {"image": _as_example_image(record["image"]), "id": np.asarray(record["id"], np.int64)}
    if "spacing_mm" in record:
      example["spacing_mm"] = np.asarray(record["spacing_mm"], np.float32)
    label = np.asarray(record["label"])
    if label.size or self.label_kind == "class":
      example["label"] = label.astype(np.int32)
    return example


def tfds_sources(dataset_name: str, *, tfds_dir: str, **dataset_kwargs) -> Dataset:
  """Builds (once) the array_record TFDS dataset of `dataset_name(**dataset_kwargs)` in `tfds_dir` and returns
  it as a `Dataset` (same info; splits without examples are left out)."""
  builder = builder_class(dataset_name)(dataset_kwargs=dataset_kwargs, data_dir=os.fspath(tfds_dir),
                                        file_format="array_record")
  builder.download_and_prepare()
  sources = builder.as_data_source()
  info = builder.dataset.info
  return Dataset(info=info, sources={split: TfdsVolumeSource(sources[split], info.label_kind)
                                     for split in builder.dataset.sources if split in sources})
