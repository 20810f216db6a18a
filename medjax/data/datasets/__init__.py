"""Dataset builders, looked up by name in `DATASETS` (see base.py for the `Dataset` contract).

  ds = build_dataset("synthetic_phantoms", dict(spatial_dims=3, image_size=32))
  ds.info.num_classes, len(ds.source("train"))  # 3, 256
  ds.source("train")[0]["image"].shape  # (32, 32, 32, 1)

Importing this package imports every builder module, so the registry is full.
"""

from typing import Any, Mapping, Optional

from medjax.data.datasets.base import DATASETS, Dataset, DataSource, DatasetInfo, GeneratedSource
from medjax.data.datasets import medmnist  # noqa: F401  (registers medmnist)
from medjax.data.datasets import synthetic  # noqa: F401  (registers synthetic_phantoms, synthetic_lesions)

__all__ = ["DATASETS", "Dataset", "DataSource", "DatasetInfo", "GeneratedSource", "build_dataset"]


def build_dataset(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> Dataset:
  """Builds the dataset registered as `name` with keyword arguments `kwargs`.

  Raises KeyError (with did-you-mean and the known names) for an unknown name, and ValueError naming the
  dataset, the key and the valid keys for an unknown argument (or a bad value).
  """
  return DATASETS.build(name, kwargs, where="config.data")
