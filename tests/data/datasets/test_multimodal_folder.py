"""Multimodal image_folder cases (multimodal_folder): named modalities with their own spacing and preprocessing,
a clinical record from the CSV fitted on the training rows only, and the refusals that name case and modality or
column, all at build time."""

import csv
import os
import pickle
import warnings

import ml_collections as mlc
import nibabel as nib
import numpy as np
import pytest

from medjax.data import datasets, preprocess, tabular
from medjax.data.datasets import DATASETS, multimodal_folder
from medjax.data.datasets.base import check_labels
from medjax.data.pipeline import collate

# (z, y, x) array shape and spacing (mm) per modality: not co-registered, each its own grid.
GRIDS = {"t1": ((6, 7, 5), (1.0, 1.0, 1.0)), "t2": ((6, 7, 5), (2.0, 1.0, 1.5)), "flair": ((3, 4, 5), (2.0, 2.0, 1.0))}
SPLITS = ("train",) * 4 + ("val",) * 2 + ("test",) * 2
PATCH = {"t1": (6, 7, 5), "t2": (6, 9, 5), "flair": (6, 8, 5)}


def write_nifti(path, array, spacing):
  # nibabel's voxel order is (x, y, z): the transpose of medjax's (z, y, x); an axis-aligned RAS affine.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
  nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), path)


def write_cases(root, names, absent=(), seed=0):
  """images/<m>/<case>.nii.gz for every (case, m) not in `absent`; returns {(case, m): array (z, y, x)}."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name in names:
    for m, (shape, spacing) in GRIDS.items():
      array = rng.uniform(1.0, 5.0, shape).astype(np.float32)
      arrays[(name, m)] = array
      if (name, m) not in absent:
        write_nifti(os.path.join(root, "images", m, f"{name}.nii.gz"), array, spacing)
  return arrays


def rows(n=8):
  return [{"case": f"c{i}", "patient_id": f"p{i}", "label": str(i % 2), "split": SPLITS[i], "age": str(30 + 5 * i),
           "lab": f"{100 + 3 * i * i}", "sex": "FM"[i % 2]} for i in range(n)]


def write_csv(path, table):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  return str(path)


def options(tmp_path, **kwargs):
  out = dict(data_dir=str(tmp_path), csv_path=str(tmp_path / "cases.csv"), cache_dir=str(tmp_path / "cache"),
             modalities=["t1", "t2", "flair"], optional_modalities=["flair"], patch_size=PATCH,
             tabular={"numeric": ["age", "lab"], "categorical": ["sex"]})
  out.update(kwargs)
  return out


def build(tmp_path, **kwargs):
  return datasets.build_dataset("nifti_folder", options(tmp_path, **kwargs))


@pytest.fixture
def folder(tmp_path):
  table = rows()
  arrays = write_cases(tmp_path, [r["case"] for r in table], absent={("c1", "flair"), ("c6", "flair")})
  write_csv(tmp_path / "cases.csv", table)
  return tmp_path, table, arrays


def test_examples_follow_the_model_input_contract(folder):
  root, table, _ = folder
  ds = build(root)
  info = ds.info
  assert (info.task, info.label_kind, info.spatial_dims, info.num_classes) == ("classification", "class", 3, 2)
  assert info.image_shape == PATCH["t1"] and info.num_channels == 1
  mm = info.multimodal
  assert mm.modalities == ("t1", "t2", "flair") and mm.shapes == (PATCH["t1"], PATCH["t2"], PATCH["flair"])
  assert mm.channels == (1, 1, 1) and mm.may_be_missing == ("flair",)
  assert (mm.numeric, mm.categorical, mm.categorical_sizes) == (("age", "lab"), ("sex",), (3,))
  assert ds.splits == ("train", "val", "test")
  train = ds.source("train")
  assert [train.case_name(i) for i in range(4)] == ["c0", "c1", "c2", "c3"]
  np.testing.assert_array_equal(train.labels(), [0, 1, 0, 1])
  assert list(ds.metadata("test")["case"]) == ["c6", "c7"] and list(ds.metadata("test")["sex"]) == ["F", "M"]
  batch = collate([train[i] for i in range(4)])
  x = batch["image"]
  assert {m: v.shape for m, v in x["images"].items()} == {m: (4,) + PATCH[m] + (1,) for m in PATCH}
  assert all(v.dtype == np.float32 for v in x["images"].values())
  assert {m: v.tolist() for m, v in x["present"].items()} == {"t1": [1] * 4, "t2": [1] * 4, "flair": [1, 0, 1, 1]}
  assert x["tabular"]["numeric"].shape == (4, 2) and x["tabular"]["numeric"].dtype == np.float32
  assert x["tabular"]["missing"].shape == (4, 2) and x["tabular"]["categorical"].dtype == np.int32
  np.testing.assert_array_equal(x["tabular"]["categorical"][:, 0], [1, 2, 1, 2])  # F=1, M=2 (sorted vocabulary)
  assert batch["label"].dtype == np.int32 and batch["id"].tolist() == [0, 1, 2, 3]
  assert not np.any(x["images"]["flair"][1])  # absent: zeros, present 0
  assert [int(ds.source("test")[i]["id"]) for i in range(2)] == [6, 7]
  check_labels(ds.source("val"), info, "val")
  clone = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(clone.source("val")[1]["image"]["images"]["t2"],
                                ds.source("val")[1]["image"]["images"]["t2"])


def test_each_modality_has_its_own_spacing_and_normalisation(folder):
  root, _, arrays = folder
  stats = [{"p005": 1.5, "p995": 4.5, "mean": 3.0, "std": 0.5}]
  ds = build(root, normalization={"t1": "zscore", "t2": "none", "flair": "ct"},
             target_spacing_mm={"t1": None, "t2": None, "flair": (1.0, 1.0, 1.0)},
             intensity_stats={"t1": None, "t2": None, "flair": stats}, tabular=None,
             patch_size=dict(PATCH, t2=(4, 9, 5)))
  with pytest.warns(UserWarning, match=r"modality 't2': split 'train', case c0: preprocessed shape \(6, 7, 5\) is "
                                       r"centre-cropped to patch_size \(4, 9, 5\)"):
    example = ds.source("train")[0]
  assert "tabular" not in example["image"] and ds.info.multimodal.numeric == ()
  images = example["image"]["images"]
  t1, t2, flair = (arrays[("c0", m)] for m in ("t1", "t2", "flair"))
  np.testing.assert_allclose(images["t1"][..., 0], (t1 - t1.mean()) / t1.std(), rtol=1e-4, atol=1e-5)
  # "none": raw values; z 6 -> 4 centre crop (rows 1..4), y 7 -> 9 zero pad (one row each side).
  np.testing.assert_array_equal(images["t2"][..., 0], np.pad(t2[1:5], ((0, 0), (1, 1), (0, 0))))
  # flair resampled from (2, 2, 1) mm to 1 mm: (3, 4, 5) -> (6, 8, 5), then CT-normalised with the given stats.
  resampled = preprocess.resample(flair[..., None], (2.0, 2.0, 1.0), (1.0, 1.0, 1.0), order=3)
  assert resampled.shape == (6, 8, 5, 1)
  np.testing.assert_allclose(images["flair"], preprocess.ct_normalize(resampled, 1.5, 4.5, 3.0, 0.5),
                             rtol=1e-5, atol=1e-5)


def test_ct_statistics_come_from_the_training_images_of_that_modality(folder):
  root, _, arrays = folder
  ds = build(root, normalization={"t1": "ct", "t2": "zscore", "flair": "zscore"}, tabular=None)
  (stats,) = ds.source("val").modalities[0].stats
  train = np.concatenate([arrays[(f"c{i}", "t1")].ravel() for i in range(4)])
  assert stats["mean"] == pytest.approx(train.mean(), rel=1e-5)
  assert ds.source("train").modalities[0].stats == ds.source("test").modalities[0].stats


def test_refusals_name_the_case_and_the_modality(folder):
  root, table, _ = folder
  os.remove(root / "images" / "t2" / "c3.nii.gz")
  with pytest.raises(ValueError, match=r"case c3: modality 't2' is missing, and the dataset declares it required"):
    build(root)
  for m in ("t1", "flair"):
    if (root / "images" / m / "c3.nii.gz").exists():
      os.remove(root / "images" / m / "c3.nii.gz")
  with pytest.raises(ValueError, match=r"case c3: none of the image modalities \('t1', 't2', 'flair'\) is present"):
    build(root, optional_modalities=["t1", "t2", "flair"])
  write_cases(root, ["c3"])
  write_nifti(str(root / "images" / "t2" / "ghost.nii.gz"), np.ones((6, 7, 5), np.float32), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match=r"case 'ghost' \(modality 't2', .*ghost\.nii\.gz\) has no row in"):
    build(root)
  os.remove(root / "images" / "t2" / "ghost.nii.gz")
  with pytest.raises(ValueError, match=r"optional_modalities names unknown modality\(ies\) \['pet'\]"):
    build(root, optional_modalities=["pet"])
  with pytest.raises(ValueError, match=r"patch_size names unknown modality\(ies\) \['pet'\]"):
    build(root, patch_size=dict(PATCH, pet=(4, 4, 4)))
  with pytest.raises(ValueError, match=r"normalization gives no value for modality\(ies\) \['flair'\]"):
    build(root, normalization={"t1": "zscore", "t2": "none"})
  with pytest.raises(ValueError, match=r"modality 't1': set patch_size"):
    build(root, patch_size=None)
  with pytest.raises(FileNotFoundError, match=r"modality 'pet': folder .*images/pet not found"):
    build(root, modalities=["t1", "pet"], optional_modalities=[], patch_size=(4, 4, 4))
  os.makedirs(root / "labels")
  with pytest.raises(ValueError, match="classification only; for segmentation, stack the co-registered modalities "
                                       "into one multi-channel 4D image"):
    build(root)
  os.rmdir(root / "labels")
  with pytest.raises(ValueError, match="tabular needs modalities"):
    build(root, modalities=None, optional_modalities=(), patch_size=(4, 4, 4))
  with pytest.raises(ValueError, match="patch_size is a dict"):
    build(root, modalities=None, optional_modalities=(), tabular=None)


def test_refusals_name_the_case_and_the_column(folder):
  root, table, _ = folder
  bad = [dict(r) for r in table]
  bad[7]["lab"] = "high"  # a TEST row: refused at build time, before any training
  write_csv(root / "cases.csv", bad)
  with pytest.raises(ValueError, match=r"Case 'c7': numeric column 'lab' has the value 'high', which is not a finite"):
    build(root)
  with pytest.raises(ValueError, match=r"cases\.csv has no column 'bmi' \(declared in config\.data\.tabular\)"):
    build(root, tabular={"numeric": ["bmi"]})
  with pytest.raises(ValueError, match=r"tabular column 'label' is one of the CSV's reserved columns .* leaks it"):
    build(root, tabular={"numeric": ["label"]})


def test_unseen_category_warns_at_build_and_maps_to_unknown(folder):
  root, table, _ = folder
  table[6]["sex"] = "X"
  table[5]["lab"] = "NA"
  write_csv(root / "cases.csv", table)
  with pytest.warns(tabular.UnseenCategoryWarning, match=r"Case 'c6': categorical column 'sex' has the value 'X', "
                                                         r"unseen in the training split"):
    ds = build(root)
  with warnings.catch_warnings():
    warnings.simplefilter("error", tabular.UnseenCategoryWarning)  # told once, at build; reads stay quiet
    record = ds.source("test")[0]["image"]["tabular"]
  assert record["categorical"].tolist() == [0]
  missing = ds.source("val")[1]["image"]["tabular"]
  assert missing["missing"].tolist() == [0.0, 1.0] and missing["numeric"][1] == 0.0


def test_tabular_statistics_come_from_the_training_rows_only(folder):
  root, table, _ = folder
  ds = build(root)
  train = ds.source("train")
  ages = np.array([30.0, 35.0, 40.0, 45.0])
  pre = train.preprocessor
  assert pre.mean[0] == pytest.approx(ages.mean()) and pre.scale[0] == pytest.approx(ages.std())
  assert pre == tabular.fit(table[:4], pre.spec, ["c0", "c1", "c2", "c3"])
  assert all(ds.source(s).preprocessor is pre for s in ds.splits)
  before = {s: [ds.source(s)[i]["image"]["tabular"] for i in range(len(ds.source(s)))] for s in ("train", "val")}
  leaked = [dict(r) for r in table]
  leaked[7]["lab"], leaked[5]["age"] = "1000000", "999"  # extreme test and validation values
  write_csv(root / "cases.csv", leaked)
  again = build(root)
  assert again.source("train").preprocessor == pre
  for i, record in enumerate(before["train"]):
    after = again.source("train")[i]["image"]["tabular"]
    for key in record:
      np.testing.assert_array_equal(after[key], record[key])
  np.testing.assert_array_equal(again.source("val")[0]["image"]["tabular"]["numeric"], before["val"][0]["numeric"])
  lab = again.source("test")[1]["image"]["tabular"]["numeric"][1]
  assert lab == pytest.approx((1e6 - pre.mean[1]) / pre.scale[1], rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*centre-cropped to patch_size:UserWarning")
def test_end_to_end_from_a_config_with_patient_folds_and_2d(tmp_path):
  table = [dict(r, patient_id=f"p{i // 2}", split="") for i, r in enumerate(rows())]
  write_cases(tmp_path, [r["case"] for r in table])
  write_csv(tmp_path / "cases.csv", table)
  config = mlc.ConfigDict(dict(name="nifti_folder", **options(tmp_path, optional_modalities=[], num_folds=2, fold=1,
                                                              patch_size={"t1": (4, 4, 4), "t2": (4, 4, 4),
                                                                          "flair": (2, 4, 4)})))
  kwargs = dict(config.items())
  ds = datasets.build_dataset(kwargs.pop("name"), kwargs)  # nested ConfigDicts, as a run passes them
  assert DATASETS.get("nifti_folder") is DATASETS.get("image_folder")
  assert ds.splits == ("train", "val") and len(ds.source("train")) == len(ds.source("val")) == 4
  patients = {s: set(ds.source(s).patient_ids()) for s in ds.splits}
  assert not patients["train"] & patients["val"]  # patient-level folds: p0's two cases stay together
  x = collate([ds.source("val")[i] for i in range(2)])["image"]
  assert x["images"]["flair"].shape == (2, 2, 4, 4, 1) and ds.info.multimodal.may_be_missing == ()
  # 2D: one-slice volumes per modality, each to its own (y, x) patch.
  flat = tmp_path / "flat"
  for i, r in enumerate(table):
    for m, shape in (("t1", (1, 6, 7)), ("t2", (1, 5, 4))):
      write_nifti(str(flat / "images" / m / f"{r['case']}.nii.gz"), np.full(shape, i + 1.0, np.float32), (3.0, 1, 1))
  write_csv(flat / "cases.csv", table)
  ds2 = datasets.build_dataset("image_folder", dict(
      data_dir=str(flat), csv_path=str(flat / "cases.csv"), cache_dir=str(tmp_path / "cache"), spatial_dims=2,
      modalities=["t1", "t2"], patch_size={"t1": (6, 7), "t2": (4, 4)}, normalization="none", fold="all"))
  ex = ds2.source("train")[3]
  assert ds2.info.spatial_dims == 2 and ds2.info.image_shape == (6, 7)
  assert ex["image"]["images"]["t1"].shape == (6, 7, 1) and ex["image"]["images"]["t2"].shape == (4, 4, 1)
  np.testing.assert_array_equal(ex["image"]["images"]["t1"], np.full((6, 7, 1), 4.0, np.float32))
  assert "tabular" not in ex["image"]


def test_fit_to_shape_crops_the_centre_and_pads_symmetrically():
  image = np.arange(5 * 2, dtype=np.float32).reshape(5, 2, 1)
  out, cropped = multimodal_folder.fit_to_shape(image, (3, 4))
  assert cropped and out.shape == (3, 4, 1)
  np.testing.assert_array_equal(out[..., 0], [[0, 2, 3, 0], [0, 4, 5, 0], [0, 6, 7, 0]])
  same, cropped = multimodal_folder.fit_to_shape(image, (5, 2))
  assert not cropped
  np.testing.assert_array_equal(same, image)


def test_tfds_array_record_round_trip_of_multimodal_cases(folder):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  from medjax.data.datasets import volumes_tfds
  root = folder[0]
  kwargs = options(root)
  direct = datasets.build_dataset("nifti_folder", kwargs)
  ds = volumes_tfds.tfds_sources("nifti_folder", tfds_dir=str(root / "tfds"), **kwargs)
  assert ds.info == direct.info and ds.splits == direct.splits
  flat = lambda ex: {"/".join(path): leaf for path, leaf in _leaves(ex)}
  for split in direct.splits:
    want = {int(e["id"]): flat(e) for e in (direct.source(split)[i] for i in range(len(direct.source(split))))}
    got = {int(e["id"]): flat(e) for e in (ds.source(split)[i] for i in range(len(ds.source(split))))}
    assert sorted(got) == sorted(want)
    for key, ex in want.items():
      assert got[key].keys() == ex.keys()
      for name, value in ex.items():
        np.testing.assert_array_equal(got[key][name], value)
        assert np.asarray(got[key][name]).dtype == np.asarray(value).dtype, name
  # The optional flair of case c1 (train) stays absent: zeros with present 0.
  absent = [flat(e) for e in (ds.source("train")[i] for i in range(len(ds.source("train")))) if not
            e["image"]["present"]["flair"]]
  assert len(absent) == 1 and not np.any(absent[0]["image/images/flair"])


def _leaves(tree, prefix=()):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _leaves(value, prefix + (key,))
  else:
    yield prefix, tree
