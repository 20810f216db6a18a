"""Medical Segmentation Decathlon (MSD) tasks from their local folders; no download.

Simpson et al., "A large annotated medical image dataset for the development and evaluation of segmentation
algorithms", arXiv:1902.09063 (2019); Antonelli et al., "The Medical Segmentation Decathlon", Nature
Communications 13, 4128 (2022). Data: http://medicaldecathlon.com (one TaskXX_Name.tar per task).

Layout (as the task archives unpack):
  <data_dir>/<TaskXX_Name>/dataset.json
  <data_dir>/<TaskXX_Name>/imagesTr/*.nii.gz   training images, 3D, or 4D (I, J, K, C) for multi-modal tasks
  <data_dir>/<TaskXX_Name>/labelsTr/*.nii.gz   training label maps, 3D
  <data_dir>/<TaskXX_Name>/imagesTs/*.nii.gz   test images (no public labels)
dataset.json keys used: "name", "modality" ({"0": "CT"} or {"0": "FLAIR", "1": "T1w", ...}: one channel
each), "labels" ({"0": "background", "1": ...}: class values 0..K-1), "numTraining", "training" (list of
{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}), "test" (list of "./imagesTs/y.nii.gz").
The files are read with `io.read_image`, so a task folder converted to .nrrd / .mha (paths in dataset.json
to match) works too; case names are the file names without their suffix.

Splits: "train" / "val" are a patient-level k-fold (`fold` of `num_folds`, `fold_seed`; each training case is one
patient) or, with num_folds=1, a hold-out of `val_fraction`; fold="all" puts every case in "train".
"test" holds imagesTs without a "label" key: MSD keeps its test labels private (evaluation by submission).
Examples and preprocessing: see `volumes` (whole variable-size cases; channel c normalised as "ct" when the
modality is CT, else per-case "zscore", unless `normalization` says otherwise).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from medjax.data import io
from medjax.data.datasets import volumes
from medjax.data.datasets.base import DATASETS, Dataset, DatasetInfo

REQUIRED_KEYS = ("name", "modality", "labels", "numTraining", "training", "test")
LAYOUT = ("<data_dir>/<TaskXX_Name>/dataset.json with imagesTr/, labelsTr/ and imagesTs/ beside it "
          "(a Medical Segmentation Decathlon task folder as unpacked from http://medicaldecathlon.com)")


def _stem(path: str) -> str:
  """The case name: the file name without its image suffix (.nii.gz, or .nrrd etc. in converted task folders)."""
  return io.image_stem(path) or os.path.basename(path)


def task_dir(data_dir: str, task: Optional[str]) -> str:
  """The task folder: `data_dir` itself when task is None, else `data_dir/task` (or the one `TaskXX_*`)."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if task is None:
    return data_dir
  exact = os.path.join(data_dir, task)
  if os.path.isdir(exact):
    return exact
  matches = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{glob.escape(task)}_*")))
  if len(matches) == 1:
    return matches[0]
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(data_dir), "Task*")))
  raise FileNotFoundError(f"dataset 'msd': task {task!r} not found in {data_dir} ({len(matches)} matches; task "
                          f"folders there: {found or 'none'}). Expected layout: {LAYOUT}.")


def read_dataset_json(root: str) -> Dict[str, Any]:
  """Reads and checks `root/dataset.json`; errors name the file, the key and the expected layout."""
  path = os.path.join(root, "dataset.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset 'msd': {path} not found. Expected layout: {LAYOUT}.")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"dataset 'msd': {path} is not valid JSON: {e}") from None
  if not isinstance(meta, dict):
    raise ValueError(f"dataset 'msd': {path} must hold a JSON object, got {type(meta).__name__}.")
  missing = [k for k in REQUIRED_KEYS if k not in meta]
  if missing:
    raise ValueError(f"dataset 'msd': {path} lacks key(s) {missing}; an MSD dataset.json has "
                     f"{list(REQUIRED_KEYS)}.")
  for key in ("modality", "labels"):
    value = meta[key]
    if not isinstance(value, dict) or not value or set(value) != {str(i) for i in range(len(value))}:
      raise ValueError(f"dataset 'msd': {path} key {key!r} must map '0', '1', ... (consecutive, from 0) to "
                       f"names, got {value!r}.")
  if not isinstance(meta["training"], list) or not all(
      isinstance(t, dict) and "image" in t and "label" in t for t in meta["training"]):
    raise ValueError(f"dataset 'msd': {path} key 'training' must be a list of {{'image': ..., 'label': ...}}.")
  if len(meta["training"]) != meta["numTraining"]:
    raise ValueError(f"dataset 'msd': {path} has numTraining={meta['numTraining']} but {len(meta['training'])} "
                     "entries in 'training'.")
  if not isinstance(meta["test"], list):
    raise ValueError(f"dataset 'msd': {path} key 'test' must be a list of image paths.")
  return meta


def _resolve(root: str, relative: str) -> str:
  return os.path.normpath(os.path.join(root, relative))


@DATASETS.register("msd")
def msd(*, data_dir: str, task: Optional[str] = None, patch_size: Optional[Sequence[int]] = None,
        target_spacing_mm: Optional[Sequence[float]] = None, plan_path: Optional[str] = None,
        normalization: Union[str, Sequence[str], None] = None, intensity_stats=None,
        crop_nonzero: bool = False, image_order: int = 3, fold: Union[int, str] = 0, num_folds: int = 5,
        val_fraction: float = 0.2, fold_seed: int = 0, cache_dir: Optional[str] = None) -> Dataset:
  """An MSD task (module doc) with "train", "val" (labelled) and "test" (unlabelled) sources.

  Args:
    data_dir: folder holding the task folder(s), or the task folder itself when task is None.
    task: "Task02_Heart" or its prefix "Task02".
    patch_size: training patch (z, y, x), voxels; DatasetInfo.image_shape. Default: the plan's.
    target_spacing_mm: resample every case to this spacing (z, y, x); None keeps each case's own, unless
      the plan gives one.
    plan_path: a plan.json (`python -m medjax.tools.plan`) giving patch_size / target_spacing_mm defaults.
    normalization: None (by modality), one scheme for every channel, or one per channel (`volumes`).
    intensity_stats: CT statistics: a fingerprint.json path or per-channel dicts; None computes them from
      the "train" split (once; cached).
    crop_nonzero: crop each case to its nonzero bounding box before resampling (nnU-Net does, for MRI).
    image_order: spline order for resampling images (3 cubic, 1 linear); labels use nearest.
    fold / num_folds / val_fraction / fold_seed: the train/val split (module doc).
    cache_dir: folder for preprocessed cases; default `<task folder>/medjax_cache`.

  Raises FileNotFoundError for a missing folder, dataset.json or file (naming it and the layout) and
  ValueError for a malformed dataset.json or argument. Bad file contents (shape or affine mismatch, NaN,
  labels outside "labels", wrong dimensionality) raise ValueError naming the case when it is preprocessed.
  """
  root = task_dir(data_dir, task)
  meta = read_dataset_json(root)
  where = f"dataset 'msd' ({os.path.join(root, 'dataset.json')})"
  modalities = [str(meta["modality"][str(i)]) for i in range(len(meta["modality"]))]
  class_names = tuple(str(meta["labels"][str(i)]) for i in range(len(meta["labels"])))
  if len(class_names) < 2:
    raise ValueError(f"{where}: 'labels' must name background and at least one class, got {class_names}.")
  patch, target = volumes.resolve_geometry(patch_size, target_spacing_mm, plan_path, 3, where)
  default = ["ct" if m.strip().upper() == "CT" else "zscore" for m in modalities]
  schemes = volumes.resolve_schemes(normalization, default, len(modalities), where)
  if image_order not in range(6):
    raise ValueError(f"{where}: image_order must be 0..5, got {image_order!r}.")
  settings = volumes.Settings(where=where, spatial_dims=3, num_channels=len(modalities),
                              num_classes=len(class_names), segmentation=True, target_spacing_mm=target,
                              crop_nonzero=bool(crop_nonzero), image_order=int(image_order), schemes=schemes)

  training = sorted(meta["training"], key=lambda t: _stem(str(t["image"])))
  cases = [volumes.Case(name=_stem(str(t["image"])), image_path=_resolve(root, str(t["image"])),
                        label_path=_resolve(root, str(t["label"])), patient_id=_stem(str(t["image"])))
           for t in training]
  test_cases = [volumes.Case(name=_stem(str(p)), image_path=_resolve(root, str(p)))
                for p in sorted(meta["test"], key=lambda p: _stem(str(p)))]
  names = [c.name for c in cases]
  if len(set(names)) != len(names):
    raise ValueError(f"{where}: duplicate training image names {sorted({n for n in names if names.count(n) > 1})}.")
  if not cases:
    raise ValueError(f"{where}: 'training' is empty.")
  volumes.check_files(cases + test_cases, where, LAYOUT)

  idx = volumes.split_indices([c.patient_id for c in cases], None, fold=fold, num_folds=num_folds,
                              seed=fold_seed, val_fraction=val_fraction, where=where)
  cache_dir = os.path.join(root, "medjax_cache") if cache_dir is None else os.path.expanduser(os.fspath(cache_dir))
  train_cases = [cases[i] for i in idx["train"]]
  stats = None
  if "ct" in schemes:
    stats = (volumes.read_intensity_stats(intensity_stats, len(modalities), where) if intensity_stats is not None
             else volumes.compute_intensity_stats(train_cases, settings, cache_dir))
  sources = {split: volumes.VolumeSource(split, [cases[i] for i in idx[split]], idx[split], settings, stats,
                                         cache_dir) for split in ("train", "val")}
  sources["test"] = volumes.VolumeSource("test", test_cases, volumes.TEST_ID_OFFSET + np.arange(len(test_cases)),
                                         settings, stats, cache_dir)
  info = DatasetInfo(task="segmentation", spatial_dims=3, image_shape=patch, num_channels=len(modalities),
                     num_classes=len(class_names), class_names=class_names, label_kind="map")
  return Dataset(info=info, sources=sources)

