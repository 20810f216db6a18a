"""`sites`: a dataset split into federated sites (medjax/data/datasets/sited.py)."""

import json
import pickle

import numpy as np
import pytest

from medjax.data import datasets
from medjax.data.datasets.base import DATASETS, Dataset, DatasetInfo, ID_STRIDE, SPLIT_CODES, check_index

BASE = dict(name="synthetic_lesions", spatial_dims=2, image_size=8, num_classes=3, num_train=40, num_val=12,
            num_test=12, cache_size=0)
HOSPITALS = ("north", "east", "west")


class _TableSource:
  """Tiny in-memory split whose examples carry a "hospital" key."""

  def __init__(self, split, n):
    self.split, self.n = split, n

  def __len__(self):
    return self.n

  def labels(self):
    return np.arange(self.n, dtype=np.int32) % 2

  def __getitem__(self, index):
    i = check_index(index, self.n, self.split)
    return {"image": np.full((4, 5, 1), i, np.float32), "label": np.asarray(i % 2, np.int32),
            "id": np.asarray(SPLIT_CODES[self.split] * ID_STRIDE + i, np.int64),
            "hospital": np.asarray(HOSPITALS[i % 3])}


@DATASETS.register("_sited_test_table")
def _table(*, num_train: int = 9) -> Dataset:
  info = DatasetInfo(task="classification", spatial_dims=2, image_shape=(4, 5), num_channels=1, num_classes=2,
                     class_names=("a", "b"), label_kind="class")
  return Dataset(info=info, sources={"train": _TableSource("train", num_train), "val": _TableSource("val", 4)})


def build(**kwargs):
  return datasets.build_dataset("sites", dict(dict(base=BASE), **kwargs))


def _ids(source):
  return [int(source[i]["id"]) for i in range(len(source))]


def test_every_example_gets_a_site_and_each_site_split_partitions_the_base_split():
  ds = build(num_sites=3, alpha=0.5, seed=1)
  base = datasets.build_dataset("synthetic_lesions", {k: v for k, v in BASE.items() if k != "name"})
  assert ds.info == base.info and ds.num_sites == 3
  for split in ("train", "val", "test"):
    src = ds.source(split)
    assert _ids(src) == _ids(base.source(split))
    example = src[0]
    assert example["site"].dtype == np.int32 and example["site"].shape == ()
    np.testing.assert_array_equal(ds.site_of(split), [int(src[i]["site"]) for i in range(len(src))])
    per_site = [set(_ids(ds.source(f"site{j}_{split}"))) for j in range(3)]
    assert all(per_site) and sum(len(s) for s in per_site) == len(src)  # non-empty, disjoint, complete
    assert set().union(*per_site) == set(_ids(src))
    for j in range(3):
      assert set(ds.site_of(f"site{j}_{split}").tolist()) == {j}
  again = build(num_sites=3, alpha=0.5, seed=1)
  for split in ds.splits:
    np.testing.assert_array_equal(again.site_of(split), ds.site_of(split))
  assert not np.array_equal(build(num_sites=3, alpha=0.5, seed=2).site_of("train"), ds.site_of("train"))
  summary = ds.summary()
  json.dumps(summary)
  assert summary["splits"]["train"]["counts"] == np.bincount(ds.site_of("train"), minlength=3).tolist()


def test_holdout_site_moves_its_examples_to_the_external_splits():
  ds = build(num_sites=3, split="iid", holdout_site=1)
  full = build(num_sites=3, split="iid")
  for split in ("train", "val", "test"):
    assert 1 not in ds.site_of(split)
    assert set(ds.site_of(f"external_{split}").tolist()) == {1}
    inside, outside = set(_ids(ds.source(split))), set(_ids(ds.source(f"external_{split}")))
    assert not inside & outside and inside | outside == set(_ids(full.source(split)))
    assert outside == set(_ids(ds.source(f"site1_{split}")))


def test_feature_skew_is_deterministic_per_site_and_example_and_absent_at_zero():
  plain = build(num_sites=2, split="iid")
  base = datasets.build_dataset("synthetic_lesions", {k: v for k, v in BASE.items() if k != "name"})
  np.testing.assert_array_equal(plain.source("train")[3]["image"], base.source("train")[3]["image"])
  skewed = build(num_sites=2, split="iid", feature_skew=1.0)
  train = skewed.source("train")
  site = int(train[3]["site"])
  site_split = skewed.source(f"site{site}_train")
  k = _ids(site_split).index(int(train[3]["id"]))
  np.testing.assert_array_equal(site_split[k]["image"], train[3]["image"])  # same (site, id), same image
  np.testing.assert_array_equal(build(num_sites=2, split="iid", feature_skew=1.0).source("train")[3]["image"],
                                train[3]["image"])
  assert not np.allclose(train[3]["image"], base.source("train")[3]["image"], atol=1e-3)


def test_zscore_harmonisation_is_fit_on_train_and_applied_to_every_split():
  ds = build(num_sites=2, split="iid", feature_skew=1.0, harmonise="zscore", holdout_site=1)
  for split in ("train", "external_train"):
    src = ds.source(split)
    images = np.stack([src[i]["image"] for i in range(len(src))])
    np.testing.assert_allclose(images.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(images.std(), 1, atol=1e-4)
  test, unharmonised = ds.source("test"), build(num_sites=2, split="iid", feature_skew=1.0).source("test")
  k = _ids(unharmonised).index(int(test[0]["id"]))
  np.testing.assert_array_equal(test[0]["image"],
                                ds.harmoniser.transform(unharmonised[k]["image"], int(test[0]["site"])))
  assert ds.summary()["harmonisation"]["kind"] == "zscore"


def test_histogram_harmonisation_leaves_the_reference_site_and_maps_the_others_onto_it():
  skewed = build(num_sites=2, split="iid", feature_skew=2.0)
  ds = build(num_sites=2, split="iid", feature_skew=2.0, harmonise="histogram", reference_site=0)
  src, raw = ds.source("train"), skewed.source("train")

  def pooled(source, site):
    return np.concatenate([source[i]["image"].ravel() for i in range(len(source)) if int(source[i]["site"]) == site])

  np.testing.assert_allclose(pooled(src, 0), pooled(raw, 0), atol=1e-4)
  p = [0.1, 0.5, 0.9]
  before = np.abs(np.quantile(pooled(raw, 1), p) - np.quantile(pooled(raw, 0), p)).max()
  after = np.abs(np.quantile(pooled(src, 1), p) - np.quantile(pooled(src, 0), p)).max()
  assert after < before / 3


def test_column_split_reads_the_site_key():
  ds = datasets.build_dataset("sites", dict(base=dict(name="_sited_test_table"), split="column",
                                            site_key="hospital"))
  assert ds.site_names == ("east", "north", "west") and ds.num_sites == 3
  np.testing.assert_array_equal(ds.site_of("train"), [1, 0, 2] * 3)
  assert [str(ds.source("site2_val")[i]["hospital"]) for i in range(len(ds.source("site2_val")))] == ["west"]
  train = ds.source("site0_train")  # labels() follows the subset where the base has it, and only there
  np.testing.assert_array_equal(train.labels(), [int(train[i]["label"]) for i in range(len(train))])
  assert not hasattr(build(num_sites=2).source("train"), "labels")
  by_label = datasets.build_dataset("sites", dict(base=dict(name="_sited_test_table"), num_sites=2, alpha=0.1))
  assert by_label.site_of("train").shape == (9,) and set(by_label.site_of("train").tolist()) == {0, 1}
  restored = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(restored.site_of("val"), ds.site_of("val"))
  assert restored.site_names == ds.site_names


def test_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.data.num_sites = 20 is more than the 12 examples of split 'val'"):
    build(num_sites=20)
  with pytest.raises(ValueError, match=r"config.data.split must be one of .* got 'random'"):
    build(split="random")
  with pytest.raises(ValueError, match=r"config.data.holdout_site must be None or a site in \[0, 3\), got 3"):
    build(num_sites=3, holdout_site=3)
  with pytest.raises(ValueError, match=r"config.data.site_key must name the example key"):
    build(split="column")
  with pytest.raises(ValueError, match=r"config.data.site_key = 'scanner' is not a key of the examples of split "
                                       r"'train' \(keys: \['hospital', 'id', 'image', 'label'\]\)"):
    datasets.build_dataset("sites", dict(base=dict(name="_sited_test_table"), split="column", site_key="scanner"))
  with pytest.raises(ValueError, match=r"config.data.num_sites = 2 but column 'hospital' holds 3 sites"):
    datasets.build_dataset("sites", dict(base=dict(name="_sited_test_table"), split="column", site_key="hospital",
                                         num_sites=2))
  with pytest.raises(ValueError, match=r"config.data.reference_site = 1 is the held-out site"):
    build(num_sites=2, split="iid", holdout_site=1, harmonise="zscore", reference_site=1)
  with pytest.raises(ValueError, match=r"config.data.harmonise must be None or one of"):
    build(harmonise="combat")
  with pytest.raises(ValueError, match=r"unknown key 'alpah'"):
    build(alpah=0.1)
