"""The dataset contract's shared checks."""

import numpy as np
import pytest

from medjax.data.datasets.base import DatasetInfo, check_labels


class _ClassSource:
  def __init__(self, labels):
    self._labels = np.asarray(labels)

  def __len__(self):
    return len(self._labels)

  def labels(self):
    return self._labels

  def __getitem__(self, i):
    raise AssertionError("check_labels must not read images when labels() answers")


class _MapSource(list):
  def case_name(self, i):
    return f"case_{i}"


def _info(task, num_classes=3):
  kind = {"segmentation": "map", "classification": "class"}[task]
  return DatasetInfo(task=task, spatial_dims=2, image_shape=(4, 5), num_channels=1, num_classes=num_classes,
                     class_names=tuple(f"c{k}" for k in range(num_classes)), label_kind=kind)


def test_classification_labels_checked_without_reading_images():
  check_labels(_ClassSource([0, 2, 1]), _info("classification"), "val")
  with pytest.raises(ValueError, match=r"split 'test': labels outside the declared classes 0..2 .*example 1: \[3\]; "
                                       r"example 3: \[-1\]"):
    check_labels(_ClassSource([0, 3, 1, -1]), _info("classification"), "test")
  # Multi-label 0/1 vectors: anything but 0 and 1 is outside.
  check_labels(_ClassSource([[0, 1, 1], [1, 0, 0]]), _info("classification"), "val")
  with pytest.raises(ValueError, match=r"example 0: \[2\]"):
    check_labels(_ClassSource([[0, 2, 1]]), _info("classification"), "val")


def test_label_maps_checked_case_by_case():
  good = np.zeros((4, 5), np.int32)
  bad = good.copy()
  bad[1, 2], bad[3, 4] = 5, 4
  check_labels(_MapSource([{"label": good}, {"label": good + 2}]), _info("segmentation"), "val")
  with pytest.raises(ValueError, match=r"split 'val': .*case_1: \[4, 5\]"):
    check_labels(_MapSource([{"label": good}, {"label": bad}, {"image": good}]), _info("segmentation"), "val")
