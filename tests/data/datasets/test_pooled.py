"""`pooled_images`: several datasets' images as one unlabelled set."""

import numpy as np
import pytest

from medjax.data import datasets
from medjax.data.datasets.pooled import ID_OFFSET

LESIONS = dict(name="synthetic_lesions", spatial_dims=2, image_size=8, num_classes=3, num_train=5, num_val=2,
               num_test=1)
PHANTOMS = dict(name="synthetic_phantoms", spatial_dims=2, image_size=8, num_classes=3, num_train=3, num_val=1,
                num_test=2)


def test_pooled_images_concatenate_the_members_without_labels():
  pooled = datasets.build_dataset("pooled_images", dict(members=(LESIONS, PHANTOMS)))
  assert pooled.info.num_classes == 1 and pooled.info.image_shape == (8, 8)
  assert {s: len(pooled.source(s)) for s in pooled.splits} == {"train": 8, "val": 3, "test": 3}
  lesions = datasets.build_dataset(LESIONS["name"], {k: v for k, v in LESIONS.items() if k != "name"})
  phantoms = datasets.build_dataset(PHANTOMS["name"], {k: v for k, v in PHANTOMS.items() if k != "name"})
  train = pooled.source("train")
  np.testing.assert_array_equal(train[1]["image"], lesions.source("train")[1]["image"])
  np.testing.assert_array_equal(train[6]["image"], phantoms.source("train")[1]["image"])
  assert int(train[6]["id"]) == ID_OFFSET + int(phantoms.source("train")[1]["id"])
  assert all(int(train[i]["label"]) == 0 for i in range(len(train)))
  assert len({int(train[i]["id"]) for i in range(len(train))}) == 8
  with pytest.raises(IndexError, match="out of range for 8"):
    train[8]


def test_members_must_agree_on_the_image_shape():
  with pytest.raises(ValueError, match=r"members\[1\] \(synthetic_phantoms\) has images \(16, 16\)"):
    datasets.build_dataset("pooled_images", dict(members=(LESIONS, dict(PHANTOMS, image_size=16))))
  with pytest.raises(ValueError, match=r"members\[0\] has no 'name'"):
    datasets.build_dataset("pooled_images", dict(members=(dict(spatial_dims=2),)))
