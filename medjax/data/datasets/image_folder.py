"""Any folder of 3D images: segmentation (with a labels/ folder) or classification (labels from a CSV).

Registered as "image_folder" and, under its first name, "nifti_folder" (the same builder).

Layout:
  <data_dir>/images/<case>.nii.gz     one image per case, 3D (I, J, K) or 4D (I, J, K, C), in any format
                                      `medjax.data.io.read_image` reads: .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd
                                      (cases may mix formats; two files of one case are an error)
  <data_dir>/labels/<case>.nii.gz     optional: label maps with the images' case names (any of those formats)
                                      -> task "segmentation"
  csv_path (optional; required for classification): one row per case, columns
    case        the image's file name without its suffix (.nii.gz, .nrrd, ...)
    patient_id  optional (default: the case): splits keep each patient's cases together
    label       classification target: an int in [0, num_classes) or a class name
    split       optional: "train" / "val" / "test" per case (overrides the k-fold)
    ...         any other column (site, sex, age, scanner) is metadata: `metadata(split)` returns it as
                arrays aligned with the split's examples, for subgroup reports.
  2D data (spatial_dims=2) are one-slice volumes (I, J, 1); the singleton axis is dropped.
  Several named images per case (classification): `modalities=["t1", "t2", ...]` reads
  <data_dir>/images/<modality>/<case><suffix> and, with `tabular`, CSV columns as a clinical record; see
  `multimodal_folder`.

Splits: the CSV's split column when present; otherwise a patient-level k-fold (`fold` of `num_folds`, `fold_seed`,
stratified by class for classification) or, with num_folds=1, a hold-out of `val_fraction`; fold="all" puts
everything in "train". A patient in two splits is an error (`splits.check_no_leakage`). The "test" split
exists only with a split column that names test cases. Examples and preprocessing: see `volumes`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from medjax.data import io, splits as splits_lib
from medjax.data.datasets import multimodal_folder, volumes
from medjax.data.datasets.base import DATASETS, Dataset, DatasetInfo

NAME = "image_folder"
SUFFIXES = io.IMAGE_SUFFIXES
RESERVED = ("case", "patient_id", "label", "split")
LAYOUT = (f"<data_dir>/images/<case><suffix>, optional <data_dir>/labels/<case><suffix> with the same case names "
          f"(suffix: one of {', '.join(SUFFIXES)}), and for classification a CSV with columns case, label[, "
          "patient_id, split, metadata...]")
_WHERE = f"dataset {NAME!r}"


def _list_images(folder: str) -> Dict[str, str]:
  try:
    return io.list_images(folder)
  except ValueError as e:
    raise ValueError(f"{_WHERE}: {e}") from None


def read_csv(path: str) -> List[Dict[str, str]]:
  """Rows of the case CSV as dicts (whitespace stripped); checks the case column and unique cases."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{_WHERE}: csv_path {path} not found.")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
  if "case" not in columns:
    raise ValueError(f"{_WHERE}: {path} has no 'case' column (columns: {columns}); expected "
                     f"{LAYOUT}.")
  seen = set()
  for n, row in enumerate(rows, start=2):
    if not row["case"] or row["case"] in seen:
      raise ValueError(f"{_WHERE}: {path} line {n}: case {row['case']!r} is empty or repeated.")
    seen.add(row["case"])
  return rows


def _column_array(values: List[str]) -> np.ndarray:
  """Numbers as float64 (blank -> NaN) when every non-blank value parses, else the strings."""
  try:
    return np.asarray([float(v) if v != "" else np.nan for v in values], np.float64)
  except ValueError:
    return np.asarray(values, dtype=str)


def _class_labels(rows, class_names, path: str):
  """Maps the CSV label column to ints; returns (labels, class_names)."""
  raw = [r.get("label", "") for r in rows]
  missing = [r["case"] for r, v in zip(rows, raw) if v == ""]
  if missing:
    raise ValueError(f"{_WHERE}: {path}: classification needs a 'label' for every case; "
                     f"missing for {missing[:5]}.")
  if class_names is None:
    if all(v.lstrip("-").isdigit() for v in raw):
      class_names = tuple(f"class_{i}" for i in range(max(int(v) for v in raw) + 1))
    else:
      class_names = tuple(sorted(set(raw)))
  class_names = tuple(str(c) for c in class_names)
  labels = []
  for row, v in zip(rows, raw):
    k = int(v) if v.lstrip("-").isdigit() else (class_names.index(v) if v in class_names else -1)
    if not 0 <= k < len(class_names):
      raise ValueError(f"{_WHERE}: {path}: case {row['case']} has label {v!r}, outside the "
                       f"declared classes {class_names} (0..{len(class_names) - 1}).")
    labels.append(k)
  return np.asarray(labels, np.int64), class_names


def _split_indices(rows, class_labels, csv_path, where: str, *, fold, num_folds, fold_seed,
                   val_fraction) -> Dict[str, np.ndarray]:
  """{split: indices into `rows`}: the CSV's split column when any row sets it, else a patient-level k-fold or
  hold-out (`volumes.split_indices`, stratified by `class_labels` unless None); a patient in two splits raises."""
  patients = np.asarray([r.get("patient_id") or r["case"] for r in rows], dtype=str)
  if any(r.get("split", "") for r in rows):
    names = [r.get("split", "") for r in rows]
    bad = [(r["case"], s) for r, s in zip(rows, names) if s not in ("train", "val", "test")]
    if bad:
      raise ValueError(f"{where}: {csv_path} split column must be train, val or test for every case; got "
                       f"{bad[:5]} (case, split).")
    idx = {s: np.flatnonzero(np.asarray(names) == s) for s in ("train", "val", "test") if s in names}
    splits_lib.check_no_leakage(idx, patients)
    return idx
  strata = None if class_labels is None else np.asarray(class_labels)
  return volumes.split_indices(patients, strata, fold=fold, num_folds=num_folds, seed=fold_seed,
                               val_fraction=val_fraction, where=where)


@dataclasses.dataclass(frozen=True)
class ImageFolderDataset(Dataset):
  """A `Dataset` that also answers `metadata(split)`: the CSV's extra columns for the split's examples."""
  table: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict, hash=False)

  def __getstate__(self):
    return dict(super().__getstate__(), table=dict(self.table))

  def __setstate__(self, state):
    super().__setstate__(state)
    object.__setattr__(self, "table", state["table"])

  def metadata(self, split: str) -> Dict[str, np.ndarray]:
    """dict column -> (N,) array in the split's example order: "case", "patient_id" and every non-reserved
    CSV column (float64 when numeric, NaN for blanks; else str)."""
    src = self.source(split)
    table = self.table
    rows = [table[c.name] for c in src.cases]
    columns = ["case", "patient_id"] + sorted({k for r in table.values() for k in r} - set(RESERVED))
    out = {"case": np.asarray([c.name for c in src.cases], dtype=str),
           "patient_id": np.asarray([c.patient_id for c in src.cases], dtype=str)}
    for col in columns[2:]:
      out[col] = _column_array([r.get(col, "") for r in rows])
    return out


NiftiFolderDataset = ImageFolderDataset  # its first name; pickles that name it still load


@DATASETS.register(NAME)
def image_folder(*, data_dir: str, csv_path: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                 spatial_dims: int = 3, num_channels: int = 1, patch_size: Optional[Sequence[int]] = None,
                 target_spacing_mm: Optional[Sequence[float]] = None, plan_path: Optional[str] = None,
                 normalization: Union[str, Sequence[str]] = "zscore", intensity_stats=None,
                 crop_nonzero: bool = False, image_order: int = 3, fold: Union[int, str] = 0,
                 num_folds: int = 5, val_fraction: float = 0.2, fold_seed: int = 0,
                 cache_dir: Optional[str] = None, modalities: Optional[Sequence[str]] = None,
                 optional_modalities: Sequence[str] = (), tabular: Optional[Mapping[str, Sequence[str]]] = None
                 ) -> Dataset:
  """A folder of image cases (module doc) with "train", "val" (and, from a CSV split column, "test").

  Args:
    data_dir: the folder holding images/ (and labels/).
    csv_path: the per-case CSV (module doc); required for classification.
    class_names: segmentation: all classes, background first (required: labels are checked against it);
      classification: optional names (default: class_i for int labels, sorted names for str labels).
    spatial_dims: 3, or 2 for one-slice volumes.
    num_channels: C of every image (4D NIfTI or vector / 4D ITK files for C > 1); an image with another
      number of channels (a 4D image where 3D ones are expected) is an error naming the file and its shape.
    patch_size / target_spacing_mm / plan_path / intensity_stats / crop_nonzero / image_order /
    fold / num_folds / val_fraction / fold_seed: as for "msd".
    normalization: "zscore" (default), "ct", "none", a CT window name, or one per channel (`volumes`).
    cache_dir: folder for preprocessed cases; default `<data_dir>/medjax_cache`.
    modalities / optional_modalities / tabular: several named images per case (images/<modality>/<case><suffix>)
      and CSV columns as a clinical record, for classification (`multimodal_folder`); then num_channels,
      patch_size (required), target_spacing_mm, plan_path, normalization and intensity_stats may each be a
      dict modality -> value. None (default): one image per case.
  """
  root = os.path.expanduser(os.fspath(data_dir))
  where = f"{_WHERE} ({root})"
  image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
  cache_dir = os.path.join(root, "medjax_cache") if cache_dir is None else os.path.expanduser(os.fspath(cache_dir))
  per_modality = dict(num_channels=num_channels, patch_size=patch_size, target_spacing_mm=target_spacing_mm,
                      plan_path=plan_path, normalization=normalization, intensity_stats=intensity_stats)
  if modalities is None:
    multimodal_folder.check_single_image(where, optional_modalities=optional_modalities, tabular=tabular,
                                         **per_modality)
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"{where}: folder {image_dir} not found. Expected layout: {LAYOUT}.")
  if modalities is not None:  # several named images per case and a record: files and sources in multimodal_folder
    multimodal_folder.check_request(root, csv_path, where)
    table = {r["case"]: r for r in read_csv(os.fspath(csv_path))}
    rows = [table[name] for name in sorted(table)]
    class_labels, class_names = _class_labels(rows, class_names, os.fspath(csv_path))
    idx = _split_indices(rows, class_labels, csv_path, where, fold=fold, num_folds=num_folds, fold_seed=fold_seed,
                         val_fraction=val_fraction)
    info, sources = multimodal_folder.build(
        root=root, where=where, csv_path=os.fspath(csv_path), rows=rows, class_labels=class_labels,
        class_names=class_names, splits=idx, modalities=modalities, optional_modalities=optional_modalities,
        tabular=tabular, spatial_dims=spatial_dims, crop_nonzero=crop_nonzero, image_order=image_order,
        cache_dir=cache_dir, **per_modality)
    return ImageFolderDataset(info=info, sources=sources, table=table)
  images = _list_images(image_dir)
  if not images:
    raise ValueError(f"{where}: no image files ({', '.join(SUFFIXES)}) in {image_dir}. Expected layout: {LAYOUT}.")
  segmentation = os.path.isdir(label_dir)
  rows = read_csv(os.fspath(csv_path)) if csv_path is not None else None
  if not segmentation and rows is None:
    raise ValueError(f"{where}: no labels/ folder (segmentation) and no csv_path (classification). "
                     f"Expected layout: {LAYOUT}.")
  if rows is None:
    rows = [{"case": name} for name in images]
  table = {r["case"]: r for r in rows}
  unknown = sorted(set(table) - set(images))
  if unknown:
    raise FileNotFoundError(f"{where}: CSV case(s) {unknown[:5]} have no image {image_dir}/<case><suffix> "
                            f"(suffix: one of {', '.join(SUFFIXES)}).")
  no_row = sorted(set(images) - set(table))
  if no_row:
    raise ValueError(f"{where}: image(s) {no_row[:5]} have no row in {csv_path}; add them or remove the files.")
  rows = [table[name] for name in sorted(table)]

  if segmentation:
    if class_names is None or len(class_names) < 2:
      raise ValueError(f"{where}: segmentation (labels/ present) needs class_names=(background, ...), at "
                       f"least two, to check the label maps against; got {class_names!r}.")
    class_names = tuple(str(c) for c in class_names)
    labels_found = _list_images(label_dir)
    class_labels = [None] * len(rows)
  else:
    class_labels, class_names = _class_labels(rows, class_names, os.fspath(csv_path))
  cases = []
  for row, class_label in zip(rows, class_labels):
    name = row["case"]
    label_path = None
    if segmentation:
      # A missing label is reported under the image's suffix, the likeliest name.
      label_path = labels_found.get(name, os.path.join(label_dir, name + io.image_suffix(images[name])))
    cases.append(volumes.Case(name=name, image_path=images[name], label_path=label_path,
                              class_label=None if class_label is None else int(class_label),
                              patient_id=row.get("patient_id") or name))
  volumes.check_files(cases, where, LAYOUT)

  patch, target = volumes.resolve_geometry(patch_size, target_spacing_mm, plan_path, spatial_dims, where)
  schemes = volumes.resolve_schemes(normalization, None, num_channels, where)
  if image_order not in range(6):
    raise ValueError(f"{where}: image_order must be 0..5, got {image_order!r}.")
  settings = volumes.Settings(where=where, spatial_dims=int(spatial_dims), num_channels=int(num_channels),
                              num_classes=len(class_names), segmentation=segmentation, target_spacing_mm=target,
                              crop_nonzero=bool(crop_nonzero), image_order=int(image_order), schemes=schemes)

  idx = _split_indices(rows, None if segmentation else class_labels, csv_path, where, fold=fold, num_folds=num_folds,
                       fold_seed=fold_seed, val_fraction=val_fraction)
  stats = None
  if "ct" in schemes:
    stats = (volumes.read_intensity_stats(intensity_stats, num_channels, where) if intensity_stats is not None
             else volumes.compute_intensity_stats([cases[i] for i in idx.get("train", [])], settings, cache_dir))
  sources = {split: volumes.VolumeSource(split, [cases[i] for i in ids], ids, settings, stats, cache_dir)
             for split, ids in idx.items()}
  info = DatasetInfo(task="segmentation" if segmentation else "classification", spatial_dims=int(spatial_dims),
                     image_shape=patch, num_channels=int(num_channels), num_classes=len(class_names),
                     class_names=class_names, label_kind="map" if segmentation else "class")
  return ImageFolderDataset(info=info, sources=sources, table=table)


# The builder's first name, kept so configs and imports that use it keep working.
nifti_folder = image_folder
DATASETS.add("nifti_folder", nifti_folder)
