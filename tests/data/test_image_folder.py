"""image_folder builder (first name nifti_folder) on tiny fake folders: classification from a CSV, segmentation,
2D, splits, NRRD / MetaImage cases, errors."""

import csv
import os
import pickle

import numpy as np
import pytest

from medjax.data import io, splits
from medjax.data.datasets import DATASETS, image_folder, nifti_folder

SPACING = (2.5, 0.9, 0.6)


def write_images(data_dir, names, shape=(5, 7, 9), seed=0, labels=False, suffix=".nii.gz", label_suffix=None):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
  if labels:
    os.makedirs(os.path.join(data_dir, "labels"), exist_ok=True)
  out = {}
  for name in names:
    image = rng.uniform(1.0, 5.0, shape).astype(np.float32)
    io.write_image(os.path.join(data_dir, "images", f"{name}{suffix}"), io.Volume.from_array(image, SPACING))
    label = None
    if labels:
      label = (image > 3.0).astype(np.int16)
      io.write_image(os.path.join(data_dir, "labels", f"{name}{label_suffix or suffix}"),
                     io.Volume.from_array(label, SPACING))
    out[name] = (image, label)
  return out


def write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def classification_rows(n=8):
  return [{"case": f"p{i // 2}_v{i % 2}", "patient_id": f"p{i // 2}", "label": ("benign", "malignant")[(i // 2) % 2],
           "site": ("A", "B")[i % 2], "age": str(40 + i)} for i in range(n)]


def build(tmp_path, **kwargs):
  args = dict(data_dir=str(tmp_path), patch_size=(4, 4, 4), cache_dir=str(tmp_path / "cache"))
  args.update(kwargs)
  return DATASETS.build("nifti_folder", args)


def test_classification_csv_patient_kfold_and_metadata(tmp_path):
  rows = classification_rows()
  images = write_images(tmp_path, [r["case"] for r in rows])
  csv_path = write_csv(tmp_path / "cases.csv", rows)
  ds = build(tmp_path, csv_path=csv_path, num_folds=2, fold=1, target_spacing_mm=(2.5, 1.8, 1.2))
  assert DATASETS.get("nifti_folder") is nifti_folder.nifti_folder is DATASETS.get("image_folder")
  assert DATASETS.get("image_folder") is image_folder.image_folder
  assert ds.info.task == "classification" and ds.info.label_kind == "class"
  assert ds.info.class_names == ("benign", "malignant") and ds.info.image_shape == (4, 4, 4)
  by_case = {r["case"]: r for r in rows}
  patients = {}
  for split in ("train", "val"):
    meta = ds.metadata(split)
    src = ds.source(split)
    assert len(src) == 4 and list(meta) == ["case", "patient_id", "age", "site"]
    for i in range(len(src)):
      ex = src[i]
      row = by_case[meta["case"][i]]
      assert src.case_name(i) == row["case"] and meta["patient_id"][i] == row["patient_id"]
      assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
      assert int(ex["label"]) == ("benign", "malignant").index(row["label"])
      assert meta["age"][i] == float(row["age"]) and meta["site"][i] == row["site"]
      assert ex["image"].shape == (5, 4, 4, 1)  # (5, 7, 9) at 0.9 / 0.6 mm -> 1.8 / 1.2 mm
      np.testing.assert_array_equal(ex["spacing_mm"], np.float32([2.5, 1.8, 1.2]))
    patients[split] = list(meta["patient_id"])
    assert list(src.patient_ids()) == patients[split]
    np.testing.assert_array_equal(src.labels(), [src[i]["label"] for i in range(4)])
    assert sorted({src[i]["label"].item() for i in range(4)}) == [0, 1]  # stratified by class
  splits.check_no_leakage(patients)
  ids = sorted(int(ds.source(s)[i]["id"]) for s in ("train", "val") for i in range(4))
  assert ids == list(range(8))
  # Per-case z-score inside the nonzero voxels (the default), no resampling when no target spacing.
  plain = build(tmp_path, csv_path=csv_path, fold="all")
  ex = plain.source("train")[0]
  raw = images[plain.source("train").case_name(0)][0]
  np.testing.assert_allclose(ex["image"][..., 0], (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
  clone = pickle.loads(pickle.dumps(plain))
  np.testing.assert_array_equal(clone.source("train")[0]["image"], ex["image"])
  assert list(clone.metadata("train")["case"]) == list(plain.metadata("train")["case"])


def test_csv_split_column_and_leakage(tmp_path):
  rows = classification_rows(6)
  for r, s in zip(rows, ("train", "train", "val", "val", "test", "test")):
    r["split"] = s
  write_images(tmp_path, [r["case"] for r in rows])
  ds = build(tmp_path, csv_path=write_csv(tmp_path / "c.csv", rows))
  assert ds.splits == ("train", "val", "test")
  assert list(ds.metadata("test")["case"]) == ["p2_v0", "p2_v1"]
  rows[1]["split"] = "val"  # p0 now in train and val
  with pytest.raises(ValueError, match="patient 'p0' is in splits 'train', 'val'"):
    build(tmp_path, csv_path=write_csv(tmp_path / "c.csv", rows))
  rows[1]["split"] = "holdout"
  with pytest.raises(ValueError, match=r"split column .* \[\('p0_v1', 'holdout'\)\]"):
    build(tmp_path, csv_path=write_csv(tmp_path / "c.csv", rows))


def test_segmentation_and_2d(tmp_path):
  write_images(tmp_path / "seg", [f"s{i}" for i in range(4)], labels=True)
  ds = build(tmp_path, data_dir=str(tmp_path / "seg"), class_names=("background", "bright"), num_folds=1,
             val_fraction=0.25, target_spacing_mm=(5.0, 0.9, 0.6))
  assert ds.info.task == "segmentation" and (len(ds.source("train")), len(ds.source("val"))) == (3, 1)
  ex = ds.source("val")[0]
  assert ex["image"].shape == (2, 7, 9, 1) and ex["label"].shape == (2, 7, 9) and ex["label"].dtype == np.int32
  with pytest.raises(ValueError, match="class_names"):
    build(tmp_path, data_dir=str(tmp_path / "seg"))
  flat = write_images(tmp_path / "flat", [f"f{i}" for i in range(3)], shape=(1, 6, 8), labels=True)
  ds2 = build(tmp_path, data_dir=str(tmp_path / "flat"), spatial_dims=2, patch_size=(4, 4),
              class_names=("background", "bright"), fold="all", normalization="none")
  ex2 = ds2.source("train")[2]
  assert ds2.info.spatial_dims == 2 and ex2["image"].shape == (6, 8, 1) and ex2["label"].shape == (6, 8)
  np.testing.assert_array_equal(ex2["image"][..., 0], flat["f2"][0][0])
  np.testing.assert_array_equal(ex2["label"], flat["f2"][1][0])
  np.testing.assert_allclose(ex2["spacing_mm"], SPACING[1:], rtol=1e-6)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="images"):
    build(tmp_path)
  rows = classification_rows(4)
  write_images(tmp_path, [r["case"] for r in rows])
  with pytest.raises(ValueError, match="no labels/ folder"):
    build(tmp_path)
  rows[2]["label"] = "unknown"
  with pytest.raises(ValueError, match="case p1_v0 has label 'unknown', outside the declared classes"):
    build(tmp_path, csv_path=write_csv(tmp_path / "c.csv", rows), class_names=("benign", "malignant"))
  rows[2]["label"] = "benign"
  rows.append(dict(rows[0], case="ghost"))
  with pytest.raises(FileNotFoundError, match=r"\['ghost'\] have no image"):
    build(tmp_path, csv_path=write_csv(tmp_path / "c.csv", rows))
  write_images(tmp_path / "seg", ["a", "b"], labels=True)
  os.remove(tmp_path / "seg" / "labels" / "b.nii.gz")
  with pytest.raises(FileNotFoundError, match=r"case b: file not found: .*labels/b.nii.gz"):
    build(tmp_path, data_dir=str(tmp_path / "seg"), class_names=("bg", "fg"))
  write_images(tmp_path / "mhd", ["a", "b"], labels=True, suffix=".mhd")
  os.remove(tmp_path / "mhd" / "labels" / "b.zraw")
  with pytest.raises(FileNotFoundError, match=r"case b: .*labels/b\.mhd names the data file .*labels/b\.zraw, which "
                                              r"is not there"):
    build(tmp_path, data_dir=str(tmp_path / "mhd"), class_names=("bg", "fg"))


def _examples(ds):
  return {ds.source(s).case_name(i): ds.source(s)[i] for s in ds.splits for i in range(len(ds.source(s)))}


@pytest.mark.parametrize("suffix,label_suffix", [(".nrrd", None), (".mha", None), (".mhd", None), (".nhdr", ".nii.gz")])
def test_itk_cases_give_the_nifti_examples(tmp_path, suffix, label_suffix):
  names = [f"s{i}" for i in range(4)]
  write_images(tmp_path / "nii", names, labels=True)
  write_images(tmp_path / "itk", names, labels=True, suffix=suffix, label_suffix=label_suffix)
  kwargs = dict(class_names=("background", "bright"), num_folds=2, fold=0, target_spacing_mm=(2.0, 1.2, 0.9),
                crop_nonzero=True)
  nifti = _examples(build(tmp_path, data_dir=str(tmp_path / "nii"), **kwargs))  # through the alias "nifti_folder"
  examples = _examples(DATASETS.build("image_folder", dict(data_dir=str(tmp_path / "itk"), patch_size=(4, 4, 4),
                                                           cache_dir=str(tmp_path / "cache"), **kwargs)))
  assert sorted(examples) == sorted(nifti) == names
  for name in names:
    np.testing.assert_allclose(examples[name]["image"], nifti[name]["image"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(examples[name]["label"], nifti[name]["label"])
    np.testing.assert_array_equal(examples[name]["spacing_mm"], nifti[name]["spacing_mm"])
    assert examples[name]["id"] == nifti[name]["id"]


def test_cache_notices_a_changed_data_file_behind_an_unchanged_header(tmp_path):
  images = write_images(tmp_path, ["a", "b"], labels=True, suffix=".mhd")
  ds = build(tmp_path, class_names=("bg", "fg"), fold="all", normalization="none")
  first = ds.source("train")[0]
  np.testing.assert_array_equal(first["image"][..., 0], images["a"][0])
  # Same dtype, shape and geometry, uncompressed: an identical header; only a.raw changes.
  io.write_itk(tmp_path / "images" / "a.mhd", io.Volume.from_array(images["a"][0], SPACING), compress=False)
  header = (tmp_path / "images" / "a.mhd").read_bytes()
  os.makedirs(tmp_path / "other")
  io.write_itk(tmp_path / "other" / "a.mhd", io.Volume.from_array(images["a"][0] * 2, SPACING), compress=False)
  assert (tmp_path / "other" / "a.mhd").read_bytes() == header
  ds.source("train")[0]  # cached with the uncompressed pair
  stat = os.stat(tmp_path / "images" / "a.mhd")
  os.replace(tmp_path / "other" / "a.raw", tmp_path / "images" / "a.raw")
  assert os.stat(tmp_path / "images" / "a.mhd").st_mtime_ns == stat.st_mtime_ns
  np.testing.assert_array_equal(ds.source("train")[0]["image"][..., 0], images["a"][0] * 2)


def test_two_formats_of_one_case_and_4d_images_are_named_errors(tmp_path):
  write_images(tmp_path / "dup", ["a", "b"], labels=True)
  io.write_image(tmp_path / "dup" / "images" / "a.nrrd", io.Volume.from_array(np.zeros((5, 7, 9), np.float32)))
  with pytest.raises(ValueError, match=r"dataset 'image_folder': .*images holds two image files for case 'a': "
                                       r"a\.nii\.gz and a\.nrrd"):
    build(tmp_path, data_dir=str(tmp_path / "dup"), class_names=("bg", "fg"))
  images = write_images(tmp_path / "four", ["a", "b"], labels=True, suffix=".nrrd")
  four_d = np.stack([images["b"][0]] * 3, axis=-1)
  io.write_image(tmp_path / "four" / "images" / "b.nrrd", io.Volume.from_array(four_d, SPACING))
  ds = build(tmp_path, data_dir=str(tmp_path / "four"), class_names=("bg", "fg"), fold="all")
  ds.source("train")[0]
  with pytest.raises(ValueError, match=r"case b: image .*four/images/b\.nrrd has shape \(5, 7, 9, 3\) "
                                       r"\(z, y, x\[, C\]\): 3 channel\(s\), but dataset 'image_folder' .* declares "
                                       r"num_channels=1 \(a 4D image where 3D single-channel images are expected\)"):
    ds.source("train")[1]
  io.write_image(tmp_path / "four" / "images" / "b.nrrd", io.Volume.from_array(images["b"][0], SPACING))
  io.write_image(tmp_path / "four" / "labels" / "b.nrrd", io.Volume.from_array(np.zeros((5, 7, 9, 2), np.int16),
                                                                               SPACING))
  with pytest.raises(ValueError, match=r"case b: label .*b\.nrrd has shape \(5, 7, 9, 2\) \(z, y, x, C\); a label "
                                       r"map must be 3D"):
    ds.source("train")[1]
