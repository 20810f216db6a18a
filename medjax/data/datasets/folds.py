"""k-fold cross-validation for any dataset: `config.data.fold` / `num_folds` / `fold_seed`.

A builder that takes `fold` itself (e.g. one whose cases carry patient ids on disk) gets the keys as they
are. For every other dataset, the train and val splits are pooled and re-split with a patient-level,
label-stratified k-fold (`splits.patient_kfold`): fold f is the validation split, the other folds the
training split, and the test split is left untouched (an external test set stays apart). Patient ids come
from `source.patient_ids()` when the source has it, else every example is its own patient; labels for
stratification come from `source.labels()` (classification) or are not used (segmentation).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from medjax.data import splits
from medjax.data.datasets.base import Dataset

FOLD_KEYS = ("fold", "num_folds", "fold_seed")


def split_fold_keys(accepted: Tuple[str, ...], kwargs: Mapping[str, Any]) -> Tuple[Dict, Optional[Dict]]:
  """(builder kwargs, fold settings or None). Fold keys stay with a builder that accepts `fold`."""
  kwargs = dict(kwargs)
  if "fold" in accepted or not any(k in kwargs for k in FOLD_KEYS):
    return kwargs, None
  fold = {k: kwargs.pop(k) for k in FOLD_KEYS if k in kwargs}
  if "fold" not in fold or "num_folds" not in fold:
    raise ValueError(f"config.data: cross-validation needs both 'fold' and 'num_folds', got {sorted(fold)}.")
  k, f = fold["num_folds"], fold["fold"]
  if not isinstance(k, int) or k < 2 or not isinstance(f, int) or not 0 <= f < k:
    raise ValueError(f"config.data: need integers num_folds >= 2 and 0 <= fold < num_folds, got fold={f!r}, "
                     f"num_folds={k!r}.")
  fold.setdefault("fold_seed", 0)
  return kwargs, fold


class SubsetSource:
  """The examples `indices` of one or more sources laid end to end (a view; nothing is copied)."""

  def __init__(self, parts, indices: np.ndarray):
    self.parts = list(parts)
    self.indices = np.asarray(indices, np.int64)
    offsets = np.cumsum([0] + [len(p) for p in self.parts])
    self._part = np.searchsorted(offsets, self.indices, side="right") - 1
    self._local = self.indices - offsets[self._part]

  def __len__(self) -> int:
    return len(self._local)

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    i = int(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"Fold split: index {index} out of range for {len(self)} examples.")
    return self.parts[int(self._part[i])][int(self._local[i])]

  def labels(self) -> np.ndarray:
    return np.concatenate([np.asarray(p.labels()) for p in self.parts])[self.indices]


def _pooled(parts, method: str):
  if all(hasattr(p, method) for p in parts):
    return np.concatenate([np.asarray(getattr(p, method)()) for p in parts])
  return None


def cross_validation(dataset: Dataset, fold: int, num_folds: int, fold_seed: int = 0) -> Dataset:
  """`dataset` with train/val replaced by fold `fold` of a patient-level k-fold over train + val."""
  parts = [dataset.source(s) for s in ("train", "val") if s in dataset.sources]
  total = sum(len(p) for p in parts)
  patients = _pooled(parts, "patient_ids")
  if patients is None:
    patients = np.arange(total)
  labels = _pooled(parts, "labels") if dataset.info.task == "classification" else None
  if labels is not None and labels.ndim != 1:
    labels = None  # multi-label: stratify by patient only
  train_idx, val_idx = splits.patient_kfold(patients, labels, k=num_folds, seed=fold_seed)[fold]
  sources = dict(dataset.sources)
  sources["train"], sources["val"] = SubsetSource(parts, train_idx), SubsetSource(parts, val_idx)
  return Dataset(info=dataset.info, sources=sources)
