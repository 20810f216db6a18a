"""MedMNIST builder on small fake .npz files of the official layout (never the real files)."""

import os
import pickle

import numpy as np
import pytest

from medjax.data.datasets import DATASETS
from medjax.data.datasets import medmnist as mm


def write_fake(data_dir, subset, size=28, sizes=(6, 3, 4), seed=0, compressed=True, labels=None):
  """Writes `{subset}[_{size}].npz` with uint8 images/labels of the official structure; returns arrays."""
  info = mm.SUBSETS[subset]
  rng = np.random.default_rng(seed)
  shape = (size,) * info.spatial_dims + ((3,) if info.num_channels == 3 else ())
  arrays = {}
  for split, n in zip(mm.SPLITS, sizes):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    if info.task == mm.MULTI_LABEL:
      arrays[f"{split}_labels"] = rng.integers(0, 2, (n, len(info.class_names)), dtype=np.uint8)
    else:
      arrays[f"{split}_labels"] = rng.integers(0, len(info.class_names), (n, 1), dtype=np.uint8)
  if labels is not None:
    arrays.update(labels)
  save = np.savez_compressed if compressed else np.savez
  save(os.path.join(data_dir, mm.file_name(subset, size)), **arrays)
  return arrays


def test_registered_and_tables_consistent():
  assert DATASETS.get("medmnist") is mm.medmnist
  assert len(mm.SUBSETS) == 18
  for name, info in mm.SUBSETS.items():
    assert mm.task_type(name) == mm.TASKS[name] == info.task
    assert info.spatial_dims == (3 if name.endswith("3d") else 2)
    assert all(n > 0 for n in info.split_sizes) and len(set(info.class_names)) == len(info.class_names)
  assert mm.TASKS["chestmnist"] == "multi-label" and mm.TASKS["retinamnist"] == "ordinal-regression"
  assert len(mm.SUBSETS["chestmnist"].class_names) == 14
  assert mm.SUBSETS["breastmnist"].class_names == ("malignant", "normal, benign")
  assert mm.SUBSETS["pneumoniamnist"].class_names == ("normal", "pneumonia")
  assert mm.SUBSETS["adrenalmnist3d"].class_names == ("normal", "hyperplasia")
  assert mm.SUBSETS["organmnist3d"].class_names == mm.SUBSETS["organamnist"].class_names
  assert mm.file_name("pathmnist") == "pathmnist.npz"
  assert mm.file_name("pathmnist", 224) == "pathmnist_224.npz"
  assert mm.file_name("vesselmnist3d", 64) == "vesselmnist3d_64.npz"
  with pytest.raises(ValueError, match="must be one of"):
    mm.file_name("vesselmnist3d", 128)


def test_official_split_sizes_and_label_names(tmp_path):
  sizes = mm.SUBSETS["breastmnist"].split_sizes  # (546, 78, 156): small enough to fake at full size
  fake = write_fake(tmp_path, "breastmnist", sizes=sizes)
  ds = mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=False)
  assert tuple(len(ds.source(s)) for s in ("train", "val", "test")) == (546, 78, 156)
  assert ds.info.task == "classification" and ds.info.label_kind == "class"
  assert ds.info.spatial_dims == 2 and ds.info.image_shape == (28, 28) and ds.info.num_channels == 1
  assert ds.info.num_classes == 2 and ds.info.class_names == ("malignant", "normal, benign")
  ex = ds.source("val")[7]
  assert ex["label"].dtype == np.int32 and ex["label"].shape == () and ex["label"] == fake["val_labels"][7, 0]
  assert ex["id"].dtype == np.int64 and ex["id"] == 1 * 10**9 + 7
  np.testing.assert_array_equal(ex["spacing_mm"], np.ones(2, np.float32))
  np.testing.assert_array_equal(ds.source("test").labels(), fake["test_labels"][:, 0])


@pytest.mark.parametrize("compressed", [True, False])
def test_value_scaling_and_three_channels(tmp_path, compressed):
  fake = write_fake(tmp_path, "pneumoniamnist", compressed=compressed)
  fake["train_images"][0, 0, :3] = (0, 255, 51)  # known pixels: -1, 1, -0.6
  write_fake(tmp_path, "pneumoniamnist", compressed=compressed,
             labels={"train_images": fake["train_images"]})
  ds = mm.medmnist(subset="pneumoniamnist", data_dir=str(tmp_path), verify_md5=False)
  image = ds.source("train")[0]["image"]
  assert image.dtype == np.float32 and image.shape == (28, 28, 1)
  np.testing.assert_allclose(image[0, :3, 0], [-1.0, 1.0, -0.6], atol=1e-6)
  expected = (fake["train_images"].astype(np.float64) / 255 - 0.5) / 0.5
  np.testing.assert_allclose(image[..., 0], expected[0], atol=1e-6)
  ds3 = mm.medmnist(subset="pneumoniamnist", data_dir=str(tmp_path), channels=3, verify_md5=False)
  assert ds3.info.num_channels == 3
  image3 = ds3.source("train")[0]["image"]
  assert image3.shape == (28, 28, 3)
  for c in range(3):
    np.testing.assert_array_equal(image3[..., c], image[..., 0])


def test_rgb_subset_and_larger_size(tmp_path):
  fake = write_fake(tmp_path, "dermamnist", size=64, sizes=(2, 1, 1))
  ds = mm.medmnist(subset="dermamnist", data_dir=str(tmp_path), size=64, verify_md5=False)
  assert ds.info.num_channels == 3 and ds.info.num_classes == 7 and ds.info.image_shape == (64, 64)
  image = ds.source("train")[1]["image"]
  np.testing.assert_allclose(image, fake["train_images"][1] / 127.5 - 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="channels"):
    mm.medmnist(subset="dermamnist", data_dir=str(tmp_path), size=64, channels=1, verify_md5=False)


def test_chest_multi_label(tmp_path):
  fake = write_fake(tmp_path, "chestmnist", sizes=(5, 2, 3))
  ds = mm.medmnist(subset="chestmnist", data_dir=str(tmp_path), verify_md5=False)
  assert mm.task_type("chestmnist") == "multi-label" and ds.info.num_classes == 14
  assert ds.info.class_names[0] == "atelectasis" and ds.info.class_names[-1] == "hernia"
  ex = ds.source("test")[2]
  assert ex["label"].dtype == np.int32 and ex["label"].shape == (14,)
  np.testing.assert_array_equal(ex["label"], fake["test_labels"][2])


@pytest.mark.parametrize("subset,size", [("adrenalmnist3d", 28), ("organmnist3d", 64)])
def test_3d_shapes(tmp_path, subset, size):
  fake = write_fake(tmp_path, subset, size=size, sizes=(3, 1, 2))
  ds = mm.medmnist(subset=subset, data_dir=str(tmp_path), size=size, verify_md5=False)
  assert ds.info.spatial_dims == 3 and ds.info.image_shape == (size,) * 3
  assert ds.info.num_classes == len(mm.SUBSETS[subset].class_names)
  ex = ds.source("test")[-1]
  assert ex["image"].shape == (size, size, size, 1) and ex["spacing_mm"].shape == (3,)
  assert ex["id"] == 2 * 10**9 + 1 and ex["label"] == fake["test_labels"][1, 0]
  np.testing.assert_allclose(ex["image"][..., 0], fake["test_images"][1] / 127.5 - 1.0, atol=1e-6)


def test_lazy_shared_loading_and_pickle(tmp_path):
  write_fake(tmp_path, "bloodmnist", compressed=False)
  ds = mm.medmnist(subset="bloodmnist", data_dir=str(tmp_path), verify_md5=False)
  train, val = ds.source("train"), ds.source("val")
  assert train.arrays is val.arrays and not train.arrays._arrays  # nothing loaded at build time
  train[0]
  assert isinstance(train.arrays.get("train_images"), np.memmap)  # stored member: memory-mapped
  assert "val_images" not in train.arrays._arrays
  clone = pickle.loads(pickle.dumps(ds))
  assert not clone.source("train").arrays._arrays
  np.testing.assert_array_equal(clone.source("train")[3]["image"], train[3]["image"])


def test_missing_file_message(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    mm.medmnist(subset="octmnist", data_dir=str(tmp_path), size=128)
  message = str(err.value)
  assert str(tmp_path / "octmnist_128.npz") in message and "zenodo" in message


def test_md5_mismatch_and_cache(tmp_path):
  write_fake(tmp_path, "breastmnist")
  path = str(tmp_path / "breastmnist.npz")
  with pytest.raises(ValueError) as err:
    mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=True)
  actual = mm.file_md5(path)
  for part in (path, "750601b1f35ba3300ea97c75c52ff8f6", actual):
    assert part in str(err.value)
  assert mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=False)
  # Unknown official MD5 (no entry): verify_md5=True builds without checking.
  write_fake(tmp_path, "retinamnist")
  assert mm.medmnist(subset="retinamnist", data_dir=str(tmp_path)).info.num_classes == 5
  # Cached per path + mtime: a rewritten file is hashed again.
  key_count = len(mm._MD5_CACHE)
  assert mm.file_md5(path) == actual and len(mm._MD5_CACHE) == key_count
  write_fake(tmp_path, "breastmnist", seed=1)
  os.utime(path, ns=(1, 1))
  assert mm.file_md5(path) != actual


def test_unknown_subset_and_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="Did you mean 'breastmnist'"):
    mm.medmnist(subset="breastmnst", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="size"):
    mm.medmnist(subset="nodulemnist3d", data_dir=str(tmp_path), size=224)


def test_bad_file_contents(tmp_path):
  write_fake(tmp_path, "breastmnist", size=64, labels={"val_labels": np.full((3, 1), 7, np.uint8)})
  ds = mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), size=64, verify_md5=False)
  with pytest.raises(ValueError, match=r"val_labels\[0\] = 7 is outside \[0, 2\)"):
    ds.source("val")[0]
  write_fake(tmp_path, "breastmnist", size=28, labels={"test_images": np.zeros((4, 32, 32), np.uint8)})
  with pytest.raises(ValueError, match="test_images"):
    mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=False)
  np.savez(tmp_path / "vesselmnist3d.npz", train_images=np.zeros((1, 28, 28, 28), np.uint8))
  with pytest.raises(ValueError, match="no array 'train_labels'"):
    mm.medmnist(subset="vesselmnist3d", data_dir=str(tmp_path))
  (tmp_path / "synapsemnist3d.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="synapsemnist3d.npz"):
    mm.medmnist(subset="synapsemnist3d", data_dir=str(tmp_path))


def test_tfds_array_record_without_tensorflow(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  fake = write_fake(tmp_path, "chestmnist", sizes=(5, 2, 3))
  ds = mm.tfds_sources(subset="chestmnist", data_dir=str(tmp_path), tfds_dir=str(tmp_path / "tfds"),
                       verify_md5=False)
  direct = mm.medmnist(subset="chestmnist", data_dir=str(tmp_path), verify_md5=False)
  assert ds.info == direct.info
  for split, n in zip(mm.SPLITS, (5, 2, 3)):
    src = ds.source(split)
    assert len(src) == n
    by_id = {int(src[i]["id"]): src[i] for i in range(n)}
    assert sorted(by_id) == [mm.SPLIT_CODES[split] * 10**9 + i for i in range(n)]
    for i in range(n):
      want = direct.source(split)[i]
      got = by_id[int(want["id"])]
      for key in ("image", "label", "spacing_mm"):
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype
  np.testing.assert_array_equal(direct.source("train")[0]["label"], fake["train_labels"][0])


def test_permute_train_labels_permutes_the_train_split_only(tmp_path):
  arrays = write_fake(tmp_path, "breastmnist", sizes=(40, 6, 6))
  plain = mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=False)
  permuted = mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=False, permute_train_labels=3)
  train, shuffled = plain.sources["train"].labels(), permuted.sources["train"].labels()
  assert np.array_equal(np.sort(train), np.sort(shuffled)) and not np.array_equal(train, shuffled)
  order = np.random.default_rng(3).permutation(40)
  assert np.array_equal(shuffled, arrays["train_labels"].reshape(-1)[order])
  assert int(permuted.sources["train"][5]["label"]) == shuffled[5]
  assert np.array_equal(permuted.sources["train"][5]["image"], plain.sources["train"][5]["image"])
  for split in ("val", "test"):
    assert np.array_equal(plain.sources[split].labels(), permuted.sources[split].labels())
  with pytest.raises(ValueError, match="permute_train_labels must be None or an integer seed"):
    mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), verify_md5=False, permute_train_labels=True)


# ------------------------------------------------------------------ two resolutions as image modalities (issue 24)


def _write_pair(data_dir, subset="adrenalmnist3d", split_sizes=(5, 2, 3), labels_64=None, seed=0):
  """The fake 28 px file and a 64 px file of the same cases (same labels, own images); `labels_64` overrides."""
  small = write_fake(data_dir, subset, 28, split_sizes, seed=seed)
  same = {key: value for key, value in small.items() if key.endswith("_labels")}
  large = write_fake(data_dir, subset, 64, split_sizes, seed=seed + 1, labels={**same, **(labels_64 or {})})
  return small, large


def test_two_sizes_give_a_multimodal_example(tmp_path):
  small, large = _write_pair(tmp_path)
  ds = mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(28, 64), verify_md5=False)
  info = ds.info
  assert info.multimodal.modalities == ("px28", "px64") == (mm.modality_name(28), mm.modality_name(64))
  assert info.multimodal.shapes == ((28,) * 3, (64,) * 3) and info.multimodal.channels == (1, 1)
  assert info.multimodal.numeric == info.multimodal.categorical == info.multimodal.may_be_missing == ()
  assert info.image_shape == (28, 28, 28) and info.num_channels == 1 and info.num_classes == 2
  assert tuple(len(ds.source(s)) for s in mm.SPLITS) == (5, 2, 3)
  ex = ds.source("test")[2]
  assert set(ex) == {"image", "label", "id", "spacing_mm"} and set(ex["image"]) == {"images", "present"}
  images = ex["image"]["images"]
  assert list(images) == ["px28", "px64"]
  assert images["px28"].shape == (28, 28, 28, 1) and images["px64"].shape == (64, 64, 64, 1)
  np.testing.assert_allclose(images["px28"][..., 0], small["test_images"][2] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_allclose(images["px64"][..., 0], large["test_images"][2] / 127.5 - 1.0, atol=1e-6)
  for name in ("px28", "px64"):
    assert images[name].dtype == np.float32
    assert ex["image"]["present"][name].dtype == np.float32 and ex["image"]["present"][name].shape == ()
    assert ex["image"]["present"][name] == 1.0
  assert ex["label"].dtype == np.int32 and ex["label"] == small["test_labels"][2, 0]
  assert ex["id"] == 2 * 10**9 + 2 and ex["spacing_mm"].shape == (3,)
  np.testing.assert_array_equal(ds.source("val").labels(), small["val_labels"][:, 0])
  # The single-image builder is unchanged by the option's existence.
  single = mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), size=64, verify_md5=False)
  assert single.info.multimodal is None
  np.testing.assert_array_equal(single.source("test")[2]["image"], images["px64"])


def test_two_sizes_of_a_2d_subset_with_three_channels_and_the_collated_batch(tmp_path):
  from medjax.data import pipeline
  write_fake(tmp_path, "pneumoniamnist", 28, (4, 2, 2))
  labels = {k: v for k, v in np.load(tmp_path / "pneumoniamnist.npz").items() if k.endswith("_labels")}
  write_fake(tmp_path, "pneumoniamnist", 64, (4, 2, 2), seed=5, labels=labels)
  ds = mm.medmnist(subset="pneumoniamnist", data_dir=str(tmp_path), sizes=[64, 28], channels=3, verify_md5=False)
  assert ds.info.multimodal.modalities == ("px64", "px28") and ds.info.multimodal.channels == (3, 3)
  assert ds.info.image_shape == (64, 64) and ds.info.num_channels == 3
  ex = ds.source("train")[1]
  assert ex["image"]["images"]["px64"].shape == (64, 64, 3) and ex["image"]["images"]["px28"].shape == (28, 28, 3)
  np.testing.assert_array_equal(ex["image"]["images"]["px28"][..., 2], ex["image"]["images"]["px28"][..., 0])
  batch = pipeline.collate([ds.source("train")[i] for i in range(3)])
  assert batch["image"]["images"]["px64"].shape == (3, 64, 64, 3)
  assert batch["image"]["present"]["px28"].shape == (3,) and batch["label"].shape == (3,)


def test_one_size_in_sizes_is_a_one_modality_set_reading_one_file(tmp_path):
  write_fake(tmp_path, "adrenalmnist3d", 64, (3, 1, 2))  # no 28 px file: it must not be opened
  ds = mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(64,), verify_md5=False)
  assert ds.info.multimodal.modalities == ("px64",) and ds.info.image_shape == (64,) * 3
  assert list(ds.source("val")[0]["image"]["images"]) == ["px64"]


def test_two_sizes_refuse_files_of_different_cases(tmp_path):
  small = write_fake(tmp_path, "adrenalmnist3d", 28, (5, 2, 3), labels={"val_labels": np.array([[0], [0]], np.uint8)})
  write_fake(tmp_path, "adrenalmnist3d", 64, (5, 2, 3), seed=1, labels={
      "train_labels": small["train_labels"], "test_labels": small["test_labels"],
      "val_labels": np.array([[0], [1]], np.uint8)})
  with pytest.raises(ValueError) as err:
    mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(28, 64), verify_md5=False)
  message = str(err.value)
  for part in (str(tmp_path / "adrenalmnist3d.npz"), str(tmp_path / "adrenalmnist3d_64.npz"),
               "first mismatching val index 1",
               "val_labels[1] is [0] in adrenalmnist3d.npz and [1] in adrenalmnist3d_64.npz",
               "same cases in the same order"):
    assert part in message, message
  # Different split lengths: the index is the first case only one file holds.
  write_fake(tmp_path, "adrenalmnist3d", 28, (5, 2, 3))
  small = np.load(tmp_path / "adrenalmnist3d.npz")
  write_fake(tmp_path, "adrenalmnist3d", 64, (5, 2, 4), labels={
      "train_labels": small["train_labels"], "val_labels": small["val_labels"],
      "test_labels": np.concatenate([small["test_labels"], small["test_labels"][:1]])})
  with pytest.raises(ValueError, match=r"first mismatching test index 3: test has 3 cases in "
                     r"adrenalmnist3d\.npz and 4 in adrenalmnist3d_64\.npz"):
    mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(28, 64), verify_md5=False)


def test_two_sizes_bad_arguments_and_md5(tmp_path):
  _write_pair(tmp_path)
  build = dict(subset="adrenalmnist3d", data_dir=str(tmp_path), verify_md5=False)
  for bad in ((28, 28), (), "28,64", 64):
    with pytest.raises(ValueError, match="sizes must be None or a non-empty sequence of distinct sizes"):
      mm.medmnist(sizes=bad, **build)
  with pytest.raises(ValueError, match=r"sizes for 'adrenalmnist3d' must be one of \(28, 64\), got 128"):
    mm.medmnist(sizes=(28, 128), **build)
  with pytest.raises(ValueError, match="size=64 and sizes=\\(28, 64\\) disagree"):
    mm.medmnist(size=64, sizes=(28, 64), **build)
  assert mm.medmnist(size=64, sizes=(64, 28), **build).info.image_shape == (64,) * 3
  write_fake(tmp_path, "breastmnist", 28)  # its 64 px file is missing
  with pytest.raises(FileNotFoundError, match="breastmnist_64.npz"):
    mm.medmnist(subset="breastmnist", data_dir=str(tmp_path), sizes=(28, 64), verify_md5=False)
  # Every file's MD5 is checked (both fakes differ from the official adrenalmnist3d files).
  with pytest.raises(ValueError, match=r"adrenalmnist3d\.npz has MD5"):
    mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(28, 64))
  with pytest.raises(ValueError, match=r"adrenalmnist3d_64\.npz has MD5"):
    mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(64, 28))


def test_two_sizes_load_images_lazily_pickle_and_permute_labels(tmp_path):
  _write_pair(tmp_path, split_sizes=(12, 2, 2))
  build = dict(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(28, 64), verify_md5=False)
  ds = mm.medmnist(**build)
  train = ds.source("train")
  loaded = [set(s.arrays._arrays) for s in train.sources.values()]
  assert all(not any(k.endswith("_images") for k in keys) for keys in loaded)  # labels only (the order check)
  clone = pickle.loads(pickle.dumps(ds))
  assert all(not s.arrays._arrays for s in clone.source("train").sources.values())
  for name in ("px28", "px64"):
    np.testing.assert_array_equal(clone.source("train")[4]["image"]["images"][name],
                                  train[4]["image"]["images"][name])
  permuted = mm.medmnist(permute_train_labels=7, **build)
  order = np.random.default_rng(7).permutation(12)
  np.testing.assert_array_equal(permuted.source("train").labels(), train.labels()[order])
  ex, plain = permuted.source("train")[3], train[3]
  assert ex["label"] == train.labels()[order][3]
  for name in ("px28", "px64"):
    np.testing.assert_array_equal(ex["image"]["images"][name], plain["image"]["images"][name])


def test_two_sizes_with_absent_view_and_run_start_checks(tmp_path):
  from medjax.build import validation
  from medjax.data.datasets import base, multimodal
  _write_pair(tmp_path)
  ds = mm.medmnist(subset="adrenalmnist3d", data_dir=str(tmp_path), sizes=(28, 64), verify_md5=False)
  base.check_labels(ds.source("val"), ds.info, "val")
  view = multimodal.WithAbsent(ds.source("test"), ["px64"])
  ex = view[1]
  assert ex["image"]["present"]["px64"] == 0 and not ex["image"]["images"]["px64"].any()
  np.testing.assert_array_equal(ex["image"]["images"]["px28"], ds.source("test")[1]["image"]["images"]["px28"])
  config = _experiment_config(f"data_dir={tmp_path}")
  validation.check_model_inputs(config, ds.info)  # the experiment's model reads this set


def _experiment_config(arg):
  from medjax import config_lib
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "medmnist_fusion.py")
  return config_lib.load_config(f"{path}:{arg}")


def test_fusion_experiment_config():
  from medjax import config_lib
  c = _experiment_config("")
  assert c.data.sizes == (28, 64) and c.model.modalities == ("px28", "px64") and c.model_name == "fusion"
  assert c.input.batch_size == 32 and c.total_steps == 10 * 38 and c.eval_every_steps == 38
  assert c.model.encoder_kwargs.small_input and c.model.encoder_kwargs.norm == "group"
  assert "augment" not in c and (c.best_metric, c.test_split) == ("val/auc", "test")
  baseline = _experiment_config("sources=px64,stem=large")
  assert baseline.data.sizes == (64,) and baseline.model.modalities == ("px64",)
  assert not baseline.model.encoder_kwargs.small_input
  dropped = _experiment_config("dropout=0.5")
  assert dropped.augment.modality_dropout.to_dict() == dict(p=0.5, sources=("px28", "px64"))
  two_d = _experiment_config("subset=breastmnist,sources=px64+px28")
  assert two_d.data.sizes == (64, 28) and two_d.model.spatial_dims == 2 and two_d.input.batch_size == 128
  for arg, message in (("fusion=early", "needs equal shapes"), ("fusion=film", "clinical record"),
                       ("fusion=concatt", "Did you mean"), ("sources=px32", "'px32' is not 'px<size>'"),
                       ("sources=px28+px28", "distinct"), ("sources=px28,dropout=0.3", "needs two sources"),
                       ("subset=adrenalmnist3d,sources=px128", "3D subset"), ("subset=chestmnist", "multi-label"),
                       ("stem=tiny", "stem must be one of")):
    with pytest.raises(config_lib.ConfigError, match=message):
      _experiment_config(arg)
  # The experiment's subset table agrees with the builder's.
  import importlib.util
  spec = importlib.util.spec_from_file_location("medmnist_fusion_experiment", os.path.join(
      os.path.dirname(__file__), "..", "..", "experiments", "medmnist_fusion.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert set(module.SUBSETS) == set(mm.SUBSETS) - {"chestmnist"}
  for name, (dims, classes, train) in module.SUBSETS.items():
    info = mm.SUBSETS[name]
    assert (dims, classes, train) == (info.spatial_dims, len(info.class_names), info.split_sizes[0])
    assert module.SIZES[dims] == info.sizes
