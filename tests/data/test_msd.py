"""MSD builder (and the shared volume preprocessing) on tiny fake task folders written with nibabel."""

import json
import os

import numpy as np
import pytest

from medjax.data import io, plan, preprocess, splits
from medjax.data.datasets import DATASETS, msd, volumes

SPACING = (3.0, 0.8, 0.7)  # (z, y, x) mm, anisotropic
SHAPE = (6, 10, 12)


def oblique_affine(spacing, degrees=30.0):
  """RAS affine rotated about world z by `degrees`, columns scaled by spacing (z, y, x)."""
  t = np.deg2rad(degrees)
  rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag(spacing[::-1])
  affine[:3, 3] = (-5.0, 2.0, 7.0)
  return affine


def make_case(rng, shape=SHAPE, channels=0):
  label = np.zeros(shape, np.uint8)
  label[1:4, 2:7, 3:9] = 1
  label[2, 4:6, 5:7] = 2
  image = rng.normal(-500.0, 80.0, shape + ((channels,) if channels else ())).astype(np.float32)
  image[label > 0] += 600.0
  return image, label


def write_task(data_dir, n=5, modality=("CT",), affines=None, name="Task09_Spleen", num_test=1, seed=0):
  """Writes an MSD task folder with n training cases; returns (root, {case: (image, label, affine)})."""
  root = os.path.join(data_dir, name)
  for sub in ("imagesTr", "labelsTr", "imagesTs"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  rng = np.random.default_rng(seed)
  cases, training = {}, []
  for i in range(n):
    image, label = make_case(rng, channels=len(modality) if len(modality) > 1 else 0)
    affine = affines[i] if affines and i < len(affines) else io.affine_from_spacing(SPACING, (i, 0, 0))
    io.write_nifti(os.path.join(root, "imagesTr", f"c_{i}.nii.gz"), io.Volume.from_array(image, affine=affine))
    io.write_nifti(os.path.join(root, "labelsTr", f"c_{i}.nii.gz"), io.Volume.from_array(label, affine=affine))
    training.append({"image": f"./imagesTr/c_{i}.nii.gz", "label": f"./labelsTr/c_{i}.nii.gz"})
    cases[f"c_{i}"] = (image, label, affine)
  test = []
  for j in range(num_test):
    image, _ = make_case(rng, channels=len(modality) if len(modality) > 1 else 0)
    io.write_nifti(os.path.join(root, "imagesTs", f"t_{j}.nii.gz"), io.Volume.from_array(image, SPACING))
    test.append(f"./imagesTs/t_{j}.nii.gz")
  meta = {"name": "Spleen", "modality": {str(i): m for i, m in enumerate(modality)},
          "labels": {"0": "background", "1": "organ", "2": "lesion"}, "numTraining": n,
          "training": training, "test": test}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f)
  return root, cases


def build(tmp_path, **kwargs):
  args = dict(data_dir=str(tmp_path), task="Task09", patch_size=(4, 8, 8), cache_dir=str(tmp_path / "cache"))
  args.update(kwargs)
  return DATASETS.build("msd", args)


def test_registered_shapes_spacing_ids_and_splits(tmp_path):
  root, cases = write_task(tmp_path, affines=[oblique_affine(SPACING)])
  ds = build(tmp_path, target_spacing_mm=(1.5, 1.0, 1.0), num_folds=5, fold=2)
  assert DATASETS.get("msd") is msd.msd
  assert ds.info.image_shape == (4, 8, 8) and ds.info.num_classes == 3 and ds.info.label_kind == "map"
  assert ds.info.class_names == ("background", "organ", "lesion") and ds.splits == ("train", "val", "test")
  assert (len(ds.source("train")), len(ds.source("val")), len(ds.source("test"))) == (4, 1, 1)
  expected_shape = preprocess.resampled_shape(SHAPE, SPACING, (1.5, 1.0, 1.0))  # (12, 8, 8)
  for split in ("train", "val"):
    src = ds.source(split)
    for i in range(len(src)):
      ex = src[i]
      name = src.case_name(i)
      assert ex["id"].dtype == np.int64 and int(ex["id"]) == int(name[2:])  # index in the sorted case list
      assert ex["image"].shape == expected_shape + (1,) and ex["image"].dtype == np.float32
      assert ex["label"].shape == expected_shape and ex["label"].dtype == np.int32
      np.testing.assert_array_equal(ex["spacing_mm"], np.float32([1.5, 1.0, 1.0]))
      assert set(np.unique(ex["label"])) <= set(np.unique(cases[name][1]))  # nearest: no new label values
  test = ds.source("test")[0]
  assert "label" not in test and int(test["id"]) == 2 * 10**9 and test["image"].shape == expected_shape + (1,)
  # Every case is validated in exactly one fold, patients never straddle train/val, ids are fold-independent.
  val_ids = []
  for fold in range(5):
    f = build(tmp_path, target_spacing_mm=(1.5, 1.0, 1.0), fold=fold)
    tr = [f.source("train").case_name(i) for i in range(4)]
    va = [f.source("val").case_name(0)]
    splits.check_no_leakage({"train": tr, "val": va})
    val_ids.append(int(f.source("val")[0]["id"]))
  assert sorted(val_ids) == [0, 1, 2, 3, 4]
  hold = build(tmp_path, num_folds=1, val_fraction=0.4)
  assert (len(hold.source("train")), len(hold.source("val"))) == (3, 2)
  assert len(build(tmp_path, fold="all").source("train")) == 5


def test_canonical_orientation_no_resampling(tmp_path):
  flipped = io.affine_from_spacing(SPACING)
  flipped[0, 0] = -SPACING[2]  # x runs right -> left (LAS): canonical flips array axis 2
  root, cases = write_task(tmp_path, n=2, affines=[flipped, oblique_affine(SPACING)])
  ds = build(tmp_path, normalization="none", fold="all")
  src = ds.source("train")
  image, label, _ = cases["c_0"]
  ex = src[0]
  np.testing.assert_array_equal(ex["image"][..., 0], image[:, :, ::-1])
  np.testing.assert_array_equal(ex["label"], label[:, :, ::-1])
  np.testing.assert_allclose(ex["spacing_mm"], SPACING, rtol=1e-6)
  geometry = src.geometry(0)
  assert io.orientation_codes(geometry["canonical_affine"]) == ("R", "A", "S")
  # The oblique case (30 degrees about z) is nearest to RAS already: voxels unchanged, spacing kept.
  np.testing.assert_array_equal(src[1]["image"][..., 0], cases["c_1"][0])
  np.testing.assert_allclose(src[1]["spacing_mm"], SPACING, rtol=1e-5)


def test_ct_normalisation_from_training_foreground_and_from_fingerprint(tmp_path):
  root, cases = write_task(tmp_path, n=4)
  ds = build(tmp_path, num_folds=2, fold=0)
  train = ds.source("train")
  names = [train.case_name(i) for i in range(len(train))]
  fg = np.concatenate([cases[n][0][cases[n][1] > 0] for n in names]).astype(np.float64)
  p005, p995 = np.percentile(fg, [0.5, 99.5])
  mean, std = fg.mean(), fg.std()
  raw = cases[ds.source("val").case_name(0)][0]
  want = (np.clip(raw.astype(np.float64), p005, p995) - mean) / std
  np.testing.assert_allclose(ds.source("val")[0]["image"][..., 0], want, rtol=1e-5, atol=1e-5)
  # Stats from a fingerprint.json instead.
  fp_path = str(tmp_path / "fingerprint.json")
  stats = {"p005": -600.0, "p995": 200.0, "mean": -100.0, "std": 50.0}
  plan.write_fingerprint(fp_path, {"intensity": [stats]})
  ds2 = build(tmp_path, intensity_stats=fp_path, fold="all")
  raw0 = cases["c_0"][0].astype(np.float64)
  np.testing.assert_allclose(ds2.source("train")[0]["image"][..., 0], (np.clip(raw0, -600, 200) + 100) / 50,
                             rtol=1e-5, atol=1e-5)
  # A named window preset maps HU to [0, 1].
  ds3 = build(tmp_path, normalization="abdomen", fold="all")
  np.testing.assert_allclose(ds3.source("train")[0]["image"][..., 0], np.clip((raw0 + 160) / 400, 0, 1),
                             atol=1e-6)


def test_cache_hit_no_recompute_and_invalidation(tmp_path, monkeypatch):
  write_task(tmp_path, n=3)
  first = [build(tmp_path, fold="all").source("train")[i] for i in range(3)]
  cache = tmp_path / "cache"
  files = sorted(os.listdir(cache))
  assert len([f for f in files if f.endswith(".npz")]) == 3 and not [f for f in files if ".tmp" in f]
  mtimes = {f: os.stat(cache / f).st_mtime_ns for f in files}
  calls = []
  real = volumes.preprocess_case
  monkeypatch.setattr(volumes, "preprocess_case", lambda *a: calls.append(a) or real(*a))
  again = build(tmp_path, fold="all").source("train")
  for i in range(3):
    for key in first[i]:
      np.testing.assert_array_equal(again[i][key], first[i][key])
  assert calls == [] and {f: os.stat(cache / f).st_mtime_ns for f in files} == mtimes
  # Another preprocessing config, or an edited file, is recomputed.
  build(tmp_path, fold="all", target_spacing_mm=(3.0, 1.0, 1.0)).source("train")[0]
  assert len(calls) == 3  # CT statistics of the new config read all three training cases once
  image, label = make_case(np.random.default_rng(9))
  io.write_nifti(tmp_path / "Task09_Spleen" / "imagesTr" / "c_0.nii.gz", io.Volume.from_array(image, SPACING))
  os.utime(tmp_path / "Task09_Spleen" / "imagesTr" / "c_0.nii.gz", ns=(1, 1))
  calls.clear()
  build(tmp_path, fold="all", normalization="zscore").source("train")[0]
  assert len(calls) == 1


def test_multimodal_channels_last(tmp_path):
  write_task(tmp_path, n=2, modality=("T2", "ADC"))
  ds = build(tmp_path, fold="all")
  assert ds.info.num_channels == 2
  ex = ds.source("train")[0]
  assert ex["image"].shape == SHAPE + (2,)
  for c in range(2):  # per-case z-score inside the nonzero voxels of each channel
    assert abs(ex["image"][..., c].mean()) < 1e-5 and abs(ex["image"][..., c].std() - 1) < 1e-4


def _rewrite(root, case, kind, array, affine):
  path = os.path.join(root, kind, f"{case}.nii.gz")
  io.write_nifti(path, io.Volume.from_array(array, affine=affine))
  return path


def test_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="Task09"):
    build(tmp_path)
  root, _ = write_task(tmp_path, n=3)
  os.remove(os.path.join(root, "dataset.json"))
  with pytest.raises(FileNotFoundError) as err:
    build(tmp_path)
  assert os.path.join(root, "dataset.json") in str(err.value) and "imagesTr" in str(err.value)
  root, _ = write_task(tmp_path, n=3)
  meta = json.load(open(os.path.join(root, "dataset.json")))
  del meta["labels"]
  json.dump(meta, open(os.path.join(root, "dataset.json"), "w"))
  with pytest.raises(ValueError, match=r"dataset.json lacks key\(s\) \['labels'\]"):
    build(tmp_path)
  root, _ = write_task(tmp_path, n=3)
  os.remove(os.path.join(root, "imagesTr", "c_1.nii.gz"))
  with pytest.raises(FileNotFoundError, match=r"case c_1: file not found: .*imagesTr/c_1.nii.gz"):
    build(tmp_path)
  with pytest.raises(ValueError, match="patch_size"):
    build(tmp_path, patch_size=None)


@pytest.mark.parametrize("problem,message", [
    ("shape", r"case c_1: image spatial shape \(6, 10, 12\).*differs from label shape \(6, 10, 11\)"),
    ("affine", "case c_1: image and label affines differ"),
    ("nan", r"case c_1: image .*c_1.nii.gz: 1 NaN"),
    ("label_range", r"case c_1: label .* holds values \[5, 7\] outside the declared classes 0..2"),
    ("four_d", r"case c_1: image .*c_1.nii.gz has shape \(6, 10, 12, 2\) \(z, y, x\[, C\]\): 2 channel\(s\), but "
               r"dataset 'msd' .* declares num_channels=1 \(a 4D image where 3D single-channel images are expected\)"),
    ("empty", r"case c_1: NIfTI file .*c_1.nii.gz is empty"),
    ("garbage", r"case c_1: cannot read NIfTI file .*c_1.nii.gz"),
])
def test_bad_case_contents_name_the_case(tmp_path, problem, message):
  root, cases = write_task(tmp_path, n=3)
  image, label, affine = cases["c_1"]
  if problem == "shape":
    _rewrite(root, "c_1", "labelsTr", label[:, :, :11], affine)
  elif problem == "affine":
    _rewrite(root, "c_1", "labelsTr", label, oblique_affine(SPACING, 5.0))
  elif problem == "nan":
    image = image.copy()
    image[0, 0, 0] = np.nan
    _rewrite(root, "c_1", "imagesTr", image, affine)
  elif problem == "label_range":
    label = label.copy()
    label[0, 0, :2] = (5, 7)
    _rewrite(root, "c_1", "labelsTr", label, affine)
  elif problem == "four_d":
    _rewrite(root, "c_1", "imagesTr", np.stack([image, image], -1), affine)
  else:
    with open(os.path.join(root, "imagesTr", "c_1.nii.gz"), "wb") as f:
      f.write(b"" if problem == "empty" else b"not a nifti file at all")
  ds = build(tmp_path, fold="all", normalization="zscore")
  src = ds.source("train")
  assert src[0]["image"].shape == SHAPE + (1,)  # other cases are fine
  with pytest.raises(ValueError, match=message):
    src[1]
  # Nothing half-written: the failed case left no cache entry and no temporary file.
  assert [f for f in os.listdir(tmp_path / "cache") if f.startswith("c_1") or ".tmp" in f] == []


def test_tfds_array_record_round_trip(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  from medjax.data.datasets import volumes_tfds
  write_task(tmp_path, n=3)
  kwargs = dict(data_dir=str(tmp_path), task="Task09_Spleen", patch_size=(4, 8, 8), num_folds=3,
                target_spacing_mm=(2.0, 1.0, 1.0), cache_dir=str(tmp_path / "cache"))
  direct = msd.msd(**kwargs)
  ds = volumes_tfds.tfds_sources("msd", tfds_dir=str(tmp_path / "tfds"), **kwargs)
  assert ds.info == direct.info and ds.splits == direct.splits
  for split in direct.splits:
    want = {int(direct.source(split)[i]["id"]): direct.source(split)[i] for i in range(len(direct.source(split)))}
    got = {int(ds.source(split)[i]["id"]): ds.source(split)[i] for i in range(len(ds.source(split)))}
    assert sorted(got) == sorted(want)
    for key, ex in want.items():
      assert got[key].keys() == ex.keys()
      for name in ex:
        np.testing.assert_array_equal(got[key][name], ex[name])
        assert got[key][name].dtype == ex[name].dtype
