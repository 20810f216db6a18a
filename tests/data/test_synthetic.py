"""Tests for the synthetic phantom datasets and the Dataset contract (medjax/data/datasets)."""

import pickle

import numpy as np
import pytest

from medjax.data.datasets import DATASETS, Dataset, DataSource, DatasetInfo, build_dataset
from medjax.data.datasets import synthetic

SHAPES = [(3, (12, 12, 12)), (2, (16, 20))]  # both ranks, one non-square
IDS = ["3d", "2d"]


def _phantoms(dims, shape, **kw):
  kwargs = dict(spatial_dims=dims, image_size=shape, num_train=24, num_val=4, num_test=4)
  kwargs.update(kw)
  return build_dataset("synthetic_phantoms", kwargs)


def _lesions(dims, shape, **kw):
  kwargs = dict(spatial_dims=dims, image_size=shape, num_train=24, num_val=4, num_test=4)
  kwargs.update(kw)
  return build_dataset("synthetic_lesions", kwargs)


def test_registered_names():
  assert {"synthetic_phantoms", "synthetic_lesions"} <= set(DATASETS.names())


@pytest.mark.parametrize("dims,shape", SHAPES, ids=IDS)
def test_phantom_info_shapes_dtypes(dims, shape):
  ds = _phantoms(dims, shape)
  assert isinstance(ds, Dataset)
  assert ds.info == DatasetInfo(task="segmentation", spatial_dims=dims, image_shape=shape, num_channels=1,
                                num_classes=3, class_names=("background", "organ", "lesion"),
                                label_kind="map")
  assert ds.splits == ("train", "val", "test")
  src = ds.source("train")
  assert isinstance(src, DataSource)
  assert len(src) == 24 and len(ds.source("val")) == 4
  ex = src[0]
  assert set(ex) == {"id", "image", "label", "spacing_mm"}
  assert ex["image"].dtype == np.float32 and ex["image"].shape == shape + (1,)
  assert ex["label"].dtype == np.int32 and ex["label"].shape == shape
  assert ex["spacing_mm"].dtype == np.float32 and ex["spacing_mm"].shape == (dims,)
  assert ex["id"].dtype == np.int64 and ex["id"].shape == ()
  # Per-case z-scoring.
  np.testing.assert_allclose(ex["image"].mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(ex["image"].std(), 1.0, atol=1e-3)


@pytest.mark.parametrize("dims,shape", SHAPES, ids=IDS)
def test_determinism(dims, shape):
  a, b = _phantoms(dims, shape, seed=3), _phantoms(dims, shape, seed=3, cache_size=0)
  c = _phantoms(dims, shape, seed=4)
  # Out of order access must not matter: src[i] depends only on (seed, split, i).
  b.source("train")[5]
  for key in ("image", "label", "spacing_mm", "id"):
    np.testing.assert_array_equal(a.source("train")[2][key], b.source("train")[2][key])
  assert not np.array_equal(a.source("train")[2]["image"], c.source("train")[2]["image"])
  # Different splits and indices give different cases.
  assert not np.array_equal(a.source("train")[2]["image"], a.source("val")[2]["image"])
  assert not np.array_equal(a.source("train")[2]["image"], a.source("train")[3]["image"])
  # Negative indices count from the end.
  np.testing.assert_array_equal(a.source("train")[-1]["image"], a.source("train")[23]["image"])


@pytest.mark.parametrize("dims,shape", SHAPES, ids=IDS)
def test_labels_classes_and_imbalance(dims, shape):
  src = _phantoms(dims, shape).source("train")
  labels = np.stack([src[i]["label"] for i in range(len(src))])
  assert labels.min() >= 0 and labels.max() <= 2
  per_case = np.stack([(labels == c).reshape(len(src), -1).sum(1) for c in (1, 2)], 1)
  assert (per_case[:, 0] > 0).all()  # every case has an organ
  assert (per_case[:, 1] > 0).sum() >= len(src) // 2  # most have a lesion ...
  assert (per_case[:, 1] == 0).any()  # ... some do not
  assert per_case[:, 1].mean() < 0.5 * per_case[:, 0].mean()  # lesions are the rare class


@pytest.mark.parametrize("dims,shape", SHAPES, ids=IDS)
def test_lesions_inside_organs_and_contrast(dims, shape):
  src = _phantoms(dims, shape, noise_std=0.0, bias_field=0.0, dark_lesion_prob=0.0).source("train")
  for i in range(8):
    ex = src[i]
    image, label = ex["image"][..., 0], ex["label"]
    organ_mean = image[label == 1].mean()
    body_rest = image[(label == 0) & (image > image.min() + 0.5)]
    assert organ_mean > body_rest.mean() + 0.3
    if (label == 2).any():  # bright lesions (dark_lesion_prob=0)
      assert image[label == 2].mean() > organ_mean + 0.3


@pytest.mark.parametrize("dims,shape", SHAPES, ids=IDS)
def test_spacing_in_range(dims, shape):
  src = _phantoms(dims, shape, spacing_range_mm=(0.5, 2.0)).source("test")
  spacing = np.stack([src[i]["spacing_mm"] for i in range(len(src))])
  assert ((spacing >= 0.5) & (spacing <= 2.0)).all()
  assert len(np.unique(spacing)) == spacing.size  # random and anisotropic
  per_axis = [(1.0, 1.0), (0.5, 0.6), (2.0, 3.0)][-dims:]
  src = _phantoms(dims, shape, spacing_range_mm=per_axis).source("val")
  spacing = np.stack([src[i]["spacing_mm"] for i in range(len(src))])
  lo, hi = np.asarray(per_axis, np.float32).T
  assert ((spacing >= lo) & (spacing <= hi)).all()


def test_spacing_changes_geometry():
  # Organs are sized in mm, so a coarser spacing gives fewer organ voxels.
  fine = _phantoms(3, 12, spacing_range_mm=(0.8, 0.8)).source("train")
  coarse = _phantoms(3, 12, spacing_range_mm=(1.25, 1.25)).source("train")
  count = lambda src: np.mean([(src[i]["label"] > 0).sum() for i in range(12)])
  assert count(coarse) < 0.6 * count(fine)


def test_ids_unique_across_splits():
  ds = _phantoms(2, (16, 20), num_train=5, num_val=3, num_test=2)
  ids = [int(ds.source(s)[i]["id"]) for s in ds.splits for i in range(len(ds.source(s)))]
  assert len(set(ids)) == 10
  assert ids[:5] == [0, 1, 2, 3, 4] and ids[5] == 10**9 and ids[8] == 2 * 10**9


def test_num_classes_two_merges_lesions():
  src3 = _phantoms(2, (16, 20)).source("train")
  src2 = _phantoms(2, (16, 20), num_classes=2).source("train")
  assert _phantoms(2, (16, 20), num_classes=2).info.class_names == ("background", "organ")
  for i in range(4):
    np.testing.assert_array_equal(src2[i]["label"], np.minimum(src3[i]["label"], 1))
    np.testing.assert_array_equal(src2[i]["image"], src3[i]["image"])


def test_cache_and_read_only():
  src = _phantoms(2, (16, 20), cache_size=4).source("train")
  a = src[1]
  assert src[1]["image"] is a["image"]  # served from the cache
  assert src.cache_info().hits == 1
  with pytest.raises(ValueError):
    a["image"][0, 0, 0] = 1.0
  clone = pickle.loads(pickle.dumps(src))  # e.g. sent to a worker process
  np.testing.assert_array_equal(clone[1]["image"], a["image"])


@pytest.mark.parametrize("dims,shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_lesion_classification(dims, shape, num_classes):
  ds = _lesions(dims, shape, num_classes=num_classes, num_train=60)
  assert ds.info.task == "classification" and ds.info.label_kind == "class"
  assert ds.info.num_classes == num_classes and len(ds.info.class_names) == num_classes
  src = ds.source("train")
  ex = src[0]
  assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
  assert ex["image"].dtype == np.float32 and ex["image"].shape == shape + (1,)
  labels = np.array([int(src[i]["label"]) for i in range(len(src))])
  counts = np.bincount(labels, minlength=num_classes)
  assert counts.min() >= 60 / num_classes / 2  # balanced by default, roughly
  assert set(labels) == set(range(num_classes))


def test_classification_positive_fraction_and_signal():
  src = _lesions(2, (16, 20), num_classes=3, positive_fraction=0.25, num_train=200, noise_std=0.0,
                 bias_field=0.0).source("train")
  labels = np.array([int(src[i]["label"]) for i in range(len(src))])
  assert 0.15 < (labels > 0).mean() < 0.35
  # The brightest pixels betray a bright lesion: its top intensity is above every other class's median.
  top = np.array([src[i]["image"].max() for i in range(len(src))])
  assert np.median(top[labels == 1]) > max(np.median(top[labels == 0]), np.median(top[labels == 2]))
  src = _lesions(2, (16, 20), positive_fraction=0.0).source("val")
  assert all(int(src[i]["label"]) == 0 for i in range(len(src)))


def test_make_phantom_deterministic():
  # The shared generator is public (tests/conftest.py can draw single cases from it).
  params = synthetic.PhantomParams(image_shape=(16, 20), spacing_range_mm=((0.8, 1.25),) * 2)
  a = synthetic.make_phantom(np.random.default_rng(0), params, synthetic.BRIGHT, 1)
  b = synthetic.make_phantom(np.random.default_rng(0), params, synthetic.BRIGHT, 1)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert (a["label"] == 2).any()


def test_errors():
  ds = _phantoms(2, (16, 20))
  with pytest.raises(KeyError, match=r"'validation'.*known splits: train, val, test"):
    ds.source("validation")
  with pytest.raises(IndexError, match=r"Split 'val': index 4 out of range for 4 examples"):
    ds.source("val")[4]
  with pytest.raises(IndexError, match=r"index -5"):
    ds.source("val")[-5]
  with pytest.raises(TypeError, match="integer"):
    ds.source("val")[1.0]
  with pytest.raises(KeyError, match=r"Unknown dataset 'synthetic_phantom'\. Did you mean 'synthetic_phan"):
    build_dataset("synthetic_phantom", {})
  with pytest.raises(ValueError, match=r"config\.data: unknown key 'noise' for dataset 'synthetic_phantoms'\. "
                                       r"Did you mean 'noise_std'.*Accepted keys: .*image_size"):
    build_dataset("synthetic_phantoms", dict(noise=0.1))
  with pytest.raises(ValueError, match=r"'synthetic_lesions': num_classes must be 2 or 3, got 4"):
    build_dataset("synthetic_lesions", dict(num_classes=4))
  with pytest.raises(ValueError, match=r"image_size must be .* 3 such ints"):
    build_dataset("synthetic_phantoms", dict(spatial_dims=3, image_size=(16, 16)))
  with pytest.raises(ValueError, match=r"spatial_dims must be 2 or 3"):
    build_dataset("synthetic_phantoms", dict(spatial_dims=4))
  with pytest.raises(ValueError, match=r"spacing_range_mm"):
    build_dataset("synthetic_phantoms", dict(spacing_range_mm=(2.0, 1.0)))
  with pytest.raises(ValueError, match=r"positive_fraction must be a number in \[0, 1\], got 1.5"):
    build_dataset("synthetic_lesions", dict(positive_fraction=1.5))
  with pytest.raises(ValueError, match=r"class_names .* 2 names but num_classes=3"):
    DatasetInfo(task="segmentation", spatial_dims=2, image_shape=(8, 8), num_channels=1, num_classes=3,
                class_names=("a", "b"), label_kind="map")


def test_dataset_is_frozen():
  ds = _phantoms(2, (16, 20))
  with pytest.raises(AttributeError):
    ds.info = None
  with pytest.raises(TypeError):
    ds.sources["extra"] = None
  clone = pickle.loads(pickle.dumps(ds))
  assert clone.info == ds.info and clone.splits == ds.splits
  np.testing.assert_array_equal(clone.source("val")[1]["label"], ds.source("val")[1]["label"])
