"""Cross-validation folds of any dataset through config.data.fold / num_folds."""

import pytest

from medjax import build, config_lib
from medjax.data import datasets

KW = dict(spatial_dims=2, image_size=16, num_train=20, num_val=5, num_test=4)


def test_folds_partition_train_and_val_and_keep_test():
  ids = []
  for fold in range(5):
    ds = datasets.build_dataset("synthetic_lesions", dict(KW, fold=fold, num_folds=5))
    train, val = ds.source("train"), ds.source("val")
    assert len(train) + len(val) == 25 and len(val) == 5
    train_ids = {int(train[i]["id"]) for i in range(len(train))}
    val_ids = {int(val[i]["id"]) for i in range(len(val))}
    assert not train_ids & val_ids
    ids.append(val_ids)
    assert len(ds.source("test")) == 4
  assert len(set().union(*ids)) == 25  # every example is validated exactly once


def test_folds_are_stratified_by_class():
  ds = datasets.build_dataset("synthetic_lesions", dict(KW, fold=1, num_folds=5))
  val = ds.source("val")
  labels = [int(val[i]["label"]) for i in range(len(val))]
  assert 2 <= sum(labels) <= 3  # balanced classes: 12-13 positives over 25 -> 2 or 3 per fold of 5


def test_fold_keys_are_validated():
  with pytest.raises(ValueError, match="both 'fold' and 'num_folds'"):
    datasets.build_dataset("synthetic_lesions", dict(KW, fold=1))
  with pytest.raises(ValueError, match="0 <= fold < num_folds"):
    datasets.build_dataset("synthetic_lesions", dict(KW, fold=5, num_folds=5))
  config = config_lib.load_config("experiments/synthetic_resnet.py:quick=true")
  config.data.fold, config.data.num_folds = 0, 3
  build.validate(config)
  config.data.fold = 3
  with pytest.raises(config_lib.ConfigError, match="fold < num_folds"):
    build.validate(config)
