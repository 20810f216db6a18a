"""Dataset builders, looked up by name in `DATASETS` (see base.py for the `Dataset` contract).

  ds = build_dataset("synthetic_phantoms", dict(spatial_dims=3, image_size=32))
  ds.info.num_classes, len(ds.source("train"))  # 3, 256
  ds.source("train")[0]["image"].shape  # (32, 32, 32, 1)

Importing this package imports every builder module, so the registry is full.
"""

from typing import Any, Mapping, Optional

from medjax.data.datasets.base import DATASETS, Dataset, DataSource, DatasetInfo, GeneratedSource
from medjax.data.datasets import medmnist  # noqa: F401  (registers medmnist)
from medjax.data.datasets import image_folder, msd  # noqa: F401  (registers image_folder / nifti_folder, msd)
from medjax.data.datasets import nifti_folder  # noqa: F401  (image_folder's first name, still importable)
from medjax.data.datasets import synthetic  # noqa: F401  (registers synthetic_phantoms, synthetic_lesions)
from medjax.data.datasets import pooled  # noqa: F401  (registers pooled_images)
from medjax.data.datasets import sited  # noqa: F401
from medjax.data.datasets import multimodal  # noqa: F401  (registers synthetic_multimodal)
from medjax.data.datasets import folds

__all__ = ["DATASETS", "DataSource", "Dataset", "DatasetInfo", "GeneratedSource", "build_dataset"]


def build_dataset(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> Dataset:
  """Builds the dataset registered as `name` with keyword arguments `kwargs`.

  `fold`, `num_folds` (and `fold_seed`) select a cross-validation fold of any dataset (see `folds`).
  Raises KeyError (with did-you-mean and the known names) for an unknown name, and ValueError naming the
  dataset, the key and the valid keys for an unknown argument (or a bad value).
  """
  builder_kwargs, fold = split_fold_keys(name, kwargs or {})
  dataset = DATASETS.build(name, builder_kwargs, where="config.data")
  return folds.cross_validation(dataset, **fold) if fold else dataset


def split_fold_keys(name: str, kwargs: Mapping[str, Any]):
  """(builder kwargs, cross-validation settings or None) for dataset `name`."""
  return folds.split_fold_keys(tuple(DATASETS.accepted_kwargs(name) or ()), kwargs)
