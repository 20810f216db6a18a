"""Patient-level splits: stratified k-fold, hold-out, an external test set, a leakage check, JSON files.

Medical datasets often hold several examples per patient (slices, visits, lesions, both eyes). Examples of
one patient are correlated, so a split that puts one patient on both sides of the train/val line measures
memorisation, not generalisation. Every function here therefore works on patients and hands back
example indices (int64, sorted, into the arrays the caller passed).

Stratification uses one label per patient (`patient_labels`):
  rule="majority" (default): the label most of the patient's examples carry; a tie goes to the highest
    label, read as the most severe (grade 0 < 1 < 2 ...).
  rule="max": the highest (most severe) label among the patient's examples, e.g. a patient with any
    malignant lesion counts as malignant.
Labels are ordered as numpy sorts them (numbers by value, strings alphabetically), which only matters for
ties and for rule="max".

Guarantees (tested): in `patient_kfold` each fold's count of patients of every class is floor or ceil of
(patients of that class) / k, and its total patient count is floor or ceil of (patients) / k; in
`holdout_split` the same holds with fraction * count. Example counts per fold follow from the patients'
example counts and are not balanced separately. Results depend only on (patient ids, labels, seed), not on
the order of the examples: patients are taken in sorted order before shuffling.

This module imports numpy only (no jax).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from medjax import atomic

SPLIT_NAMES = ("train", "val", "test")
JSON_FORMAT = "medjax.splits"
JSON_VERSION = 1
DEFAULT_JSON_NAME = "splits.json"  # used when `splits_to_json` is given a directory

Folds = List[Tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------- patients --


def _as_ids(patient_ids, name: str = "patient_ids") -> np.ndarray:
  ids = np.asarray(patient_ids)
  if ids.ndim != 1:
    raise ValueError(f"{name} must be one id per example (1-D), got shape {ids.shape}.")
  if ids.size == 0:
    raise ValueError(f"{name} is empty: there are no examples to split.")
  if ids.dtype.kind == "f" and not np.all(np.isfinite(ids)):
    bad = np.flatnonzero(~np.isfinite(ids))[:5].tolist()
    raise ValueError(f"{name} holds NaN/inf at example(s) {bad}; every example needs a patient id.")
  if ids.dtype.kind == "O" and any(i is None for i in ids):
    bad = [j for j, i in enumerate(ids) if i is None][:5]
    raise ValueError(f"{name} holds None at example(s) {bad}; every example needs a patient id.")
  return ids


def _unique(values: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray]:
  try:
    return np.unique(values, return_inverse=True)
  except TypeError as e:  # e.g. a mix of str and int ids, which cannot be sorted
    raise ValueError(f"{name} mixes types that cannot be compared ({e}); use one type (all str or all int)."
                     ) from e


def patient_labels(patient_ids, labels, *, rule: str = "majority") -> Tuple[np.ndarray, np.ndarray]:
  """One label per patient, for stratification.

  Args:
    patient_ids: (N,) patient id of each example (str or int).
    labels: (N,) class label of each example (int or str).
    rule: "majority" (most common label; ties go to the highest label) or "max" (highest label).

  Returns:
    (patients, labels_per_patient): (P,) sorted unique patient ids and (P,) their labels.
  """
  ids = _as_ids(patient_ids)
  patients, inverse = _unique(ids, "patient_ids")
  classes, strata = _patient_strata(ids, inverse, len(patients), labels, rule)
  return patients, classes[strata]


def _patient_strata(ids: np.ndarray, inverse: np.ndarray, num_patients: int, labels,
                    rule: str) -> Tuple[np.ndarray, np.ndarray]:
  """(classes, stratum of each patient as an index into classes); one stratum when labels is None."""
  if labels is None:
    return np.zeros((1,), np.int64), np.zeros((num_patients,), np.int64)
  if rule not in ("majority", "max"):
    raise ValueError(f"patient label rule must be 'majority' or 'max', got {rule!r}.")
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be one class per example (1-D), got shape {labels.shape}; for multi-label "
                     "data stratify on one derived label (e.g. labels.any(axis=1) or a chosen column).")
  if len(labels) != len(ids):
    raise ValueError(f"labels has {len(labels)} entries but patient_ids has {len(ids)}; they must be one per "
                     "example.")
  classes, label_index = _unique(labels, "labels")
  if rule == "max":
    strata = np.full((num_patients,), -1, np.int64)
    np.maximum.at(strata, inverse, label_index)
    return classes, strata
  counts = np.zeros((num_patients, len(classes)), np.int64)
  np.add.at(counts, (inverse, label_index), 1)
  # argmax returns the first maximum; searching the reversed columns makes ties go to the highest label.
  strata = len(classes) - 1 - np.argmax(counts[:, ::-1], axis=1)
  return classes, strata.astype(np.int64)


def _prepare(patient_ids, labels, rule):
  ids = _as_ids(patient_ids)
  patients, inverse = _unique(ids, "patient_ids")
  classes, strata = _patient_strata(ids, inverse, len(patients), labels, rule)
  return patients, inverse, classes, strata


# ------------------------------------------------------------------------------------------ k-fold --


def assign_folds(patient_ids, labels=None, *, k: int, seed: int, rule: str = "majority") -> np.ndarray:
  """The fold (0..k-1) of every example; all examples of a patient share one fold.

  Patients of each class are shuffled, the classes laid end to end, and the sequence dealt to the folds in
  turn (fold names shuffled too). A class's patients form one contiguous run of the deal, so every fold
  gets floor or ceil of its size / k, and so does the total.

  Args:
    patient_ids: (N,) patient id of each example.
    labels: (N,) class label of each example, or None for an unstratified patient-level k-fold.
    k: number of folds, 2 <= k <= number of patients.
    seed: integer seed; the same inputs and seed give the same folds.
    rule: how a patient's label is chosen from its examples' labels (see `patient_labels`).

  Returns:
    (N,) int64 fold of each example.
  """
  patients, inverse, classes, strata = _prepare(patient_ids, labels, rule)
  num_patients = len(patients)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"k must be an integer >= 2, got {k!r}.")
  if k > num_patients:
    raise ValueError(f"k={k} folds but only {num_patients} patient(s) ({len(inverse)} examples): every fold "
                     "needs at least one patient. Use a smaller k.")
  if labels is not None:
    sizes = np.bincount(strata, minlength=len(classes))
    small = [(classes[c].item(), int(n)) for c, n in enumerate(sizes) if 0 < n < k]
    if small:
      warnings.warn(f"assign_folds: class(es) {small} (label, patients) have fewer patients than k={k}; "
                    "some validation folds will hold none of them.", stacklevel=2)
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(np.flatnonzero(strata == c)) for c in range(len(classes))])
  fold_of_patient = np.empty((num_patients,), np.int64)
  fold_of_patient[order] = rng.permutation(k)[np.arange(num_patients) % k]
  return fold_of_patient[inverse]


def patient_kfold(patient_ids, labels=None, *, k: int, seed: int, rule: str = "majority") -> Folds:
  """Patient-level, label-stratified k-fold cross-validation.

  Args: as `assign_folds`.

  Returns:
    k pairs (train_idx, val_idx) of sorted int64 example indices; each example is in exactly one val_idx
    and no patient is on both sides of any pair.
  """
  folds = assign_folds(patient_ids, labels, k=k, seed=seed, rule=rule)
  return [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(k)]


# ---------------------------------------------------------------------------------------- hold-out --


def _parse_fractions(fractions) -> Tuple[Tuple[str, ...], np.ndarray]:
  if isinstance(fractions, Mapping):
    names, values = tuple(str(n) for n in fractions), list(fractions.values())
  else:
    values = list(fractions)
    if len(values) != 3:
      raise ValueError(f"fractions must be (train, val, test) or a dict name -> fraction, got {fractions!r}.")
    names = SPLIT_NAMES
  f = np.asarray(values, np.float64)
  if f.size == 0 or not np.all(np.isfinite(f)) or np.any(f < 0) or abs(f.sum() - 1.0) > 1e-6:
    raise ValueError(f"fractions must be >= 0 and sum to 1, got {dict(zip(names, values))}.")
  return names, f


def _round_table(sizes: np.ndarray, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Integer table A[c, s] ~ sizes[c] * fractions[s] with every entry, row sum and column sum rounded.

  Row sums are kept exact (every patient goes somewhere), each entry is floor or ceil of its ideal, and each
  column sum is floor or ceil of fractions[s] * sizes.sum(). Such a rounding always exists (controlled
  rounding of a matrix, Bacharach 1966); a depth-first search over which splits get each class's leftover
  patients finds one, trying the choices in a seeded random order so ties do not always favour one split.
  """
  eps = 1e-9
  ideal = sizes[:, None] * fractions[None, :]
  base = np.floor(ideal + eps).astype(np.int64)
  can_round_up = (ideal - base) > eps
  leftover = sizes - base.sum(axis=1)  # patients of each class still to place, one per split at most
  total = fractions * sizes.sum()
  lo = np.floor(total + eps).astype(np.int64) - base.sum(axis=0)
  hi = np.ceil(total - eps).astype(np.int64) - base.sum(axis=0)
  num_classes, num_splits = ideal.shape
  # How many extra patients each split can still receive from classes c.. (for pruning).
  room = np.concatenate([np.cumsum(can_round_up[::-1], axis=0)[::-1], np.zeros((1, num_splits), np.int64)])

  def options(c):
    choices = list(itertools.combinations(np.flatnonzero(can_round_up[c]).tolist(), int(leftover[c])))
    return iter([choices[i] for i in rng.permutation(len(choices))])

  # Iterative depth-first search (the number of classes can exceed Python's recursion limit). `failed`
  # remembers (class, extras so far) states with no completion, which keeps the search polynomial.
  extra = np.zeros((num_splits,), np.int64)
  chosen: List[Tuple[int, ...]] = []
  pending = [options(0)]
  failed = set()
  while len(chosen) < num_classes:
    c = len(chosen)
    for choice in pending[-1]:
      new = extra.copy()
      new[list(choice)] += 1
      if np.any(new > hi) or np.any(new + room[c + 1] < lo) or (c + 1, new.tobytes()) in failed:
        continue
      extra = new
      chosen.append(choice)
      if c + 1 < num_classes:
        pending.append(options(c + 1))
      break
    else:  # no choice for class c works from here: back up one class
      failed.add((c, extra.tobytes()))
      pending.pop()
      if not chosen:
        raise AssertionError("holdout_split: no rounding found; please report this as a bug.")
      extra[list(chosen.pop())] -= 1
  table = base.copy()
  for c, choice in enumerate(chosen):
    table[c, list(choice)] += 1
  return table


def holdout_split(patient_ids, labels=None, fractions=(0.7, 0.15, 0.15), *, seed: int,
                  rule: str = "majority") -> Dict[str, np.ndarray]:
  """Patient-level, label-stratified train/val/test split.

  Args:
    patient_ids: (N,) patient id of each example.
    labels: (N,) class label of each example, or None for an unstratified split.
    fractions: (train, val, test) fractions of patients, >= 0, summing to 1; or a dict name -> fraction
      for other split names.
    seed: integer seed.
    rule: how a patient's label is chosen (see `patient_labels`).

  Returns:
    dict split name -> sorted int64 example indices. Each split's number of patients is floor or ceil of
    fraction * patients, and the same holds for the patients of every class.
  """
  names, f = _parse_fractions(fractions)
  patients, inverse, classes, strata = _prepare(patient_ids, labels, rule)
  rng = np.random.default_rng(seed)
  sizes = np.bincount(strata, minlength=len(classes))
  table = _round_table(sizes, f, rng)
  split_of_patient = np.empty((len(patients),), np.int64)
  for c in range(len(classes)):
    members = rng.permutation(np.flatnonzero(strata == c))
    split_of_patient[members] = np.repeat(np.arange(len(names)), table[c])
  split_of_example = split_of_patient[inverse]
  return {name: np.flatnonzero(split_of_example == s) for s, name in enumerate(names)}


# ----------------------------------------------------------------------------------- external test --


def _column(metadata, column: str) -> np.ndarray:
  if isinstance(metadata, Mapping) or hasattr(metadata, "columns"):  # dict of columns or a DataFrame
    available = list(metadata.columns) if hasattr(metadata, "columns") else list(metadata.keys())
    if column not in available:
      raise ValueError(f"external_test: unknown metadata column {column!r}; available: {available}.")
    return np.asarray(metadata[column])
  rows = list(metadata)  # a sequence of per-example dicts
  missing = [i for i, row in enumerate(rows) if column not in row]
  if missing:
    available = sorted(set().union(*(row.keys() for row in rows))) if rows else []
    raise ValueError(f"external_test: unknown metadata column {column!r} (missing in example(s) "
                     f"{missing[:5]}); available: {available}.")
  return np.asarray([row[column] for row in rows])


def external_test(metadata, column: str, values, *, patient_ids=None) -> Tuple[np.ndarray, np.ndarray]:
  """Keeps the examples whose metadata[column] is in `values` (a site, scanner, vendor) apart.

  Split the internal part further with `patient_kfold(patient_ids[internal], labels[internal], ...)` and
  map its indices back with `internal[train_idx]`.

  Args:
    metadata: per-example metadata: a dict column -> (N,) values, a DataFrame, or a list of N dicts.
    column: the metadata column that names the site/scanner.
    values: one value or a list of values of `column` that form the external test set.
    patient_ids: optional (N,) patient ids; when given, a patient with examples on both sides is an error.

  Returns:
    (internal_idx, external_idx): sorted int64 example indices.
  """
  col = _column(metadata, column)
  if col.ndim != 1:
    raise ValueError(f"external_test: metadata column {column!r} must be one value per example, got shape "
                     f"{col.shape}.")
  if isinstance(values, (str, bytes)) or np.ndim(values) == 0:
    values = [values]
  values = list(values)
  if not values:
    raise ValueError("external_test: values is empty; name at least one value of the column to hold out.")
  present = set(col.tolist())
  absent = [v for v in values if v not in present]
  if absent:
    raise ValueError(f"external_test: value(s) {absent} never occur in metadata column {column!r}; present: "
                     f"{sorted(present, key=str)}.")
  is_external = np.isin(col, np.asarray(values, dtype=col.dtype if col.dtype.kind != "O" else object))
  internal, external = np.flatnonzero(~is_external), np.flatnonzero(is_external)
  if patient_ids is not None:
    ids = _as_ids(patient_ids)
    if len(ids) != len(col):
      raise ValueError(f"external_test: patient_ids has {len(ids)} entries but metadata column {column!r} has "
                       f"{len(col)}.")
    check_no_leakage({"internal": internal, "external": external}, ids)
  return internal, external


# ----------------------------------------------------------------------------------------- leakage --


def check_no_leakage(splits: Mapping[str, Any], patient_ids=None) -> None:
  """Raises ValueError when a patient belongs to more than one split.

  Args:
    splits: dict split name -> example indices into patient_ids (int array, or a boolean mask of length
      N), or, when patient_ids is None, dict split name -> patient ids.
    patient_ids: (N,) patient id of each example, or None (the splits then hold patient ids).

  Raises:
    ValueError naming each shared patient and the splits that share it.
  """
  if not isinstance(splits, Mapping) or not splits:
    raise ValueError("check_no_leakage: splits must be a non-empty dict split name -> indices or patient ids.")
  ids = None if patient_ids is None else _as_ids(patient_ids)
  owners: Dict[Any, List[str]] = {}
  for name, members in splits.items():
    members = np.asarray(members)
    if members.ndim != 1:
      raise ValueError(f"check_no_leakage: split {name!r} must be 1-D, got shape {members.shape}.")
    if ids is not None:
      if members.dtype == bool:
        if len(members) != len(ids):
          raise ValueError(f"check_no_leakage: split {name!r} is a mask of length {len(members)} but there are "
                           f"{len(ids)} examples.")
        members = np.flatnonzero(members)
      elif members.size and members.dtype.kind not in "iu":
        raise ValueError(f"check_no_leakage: split {name!r} must hold integer example indices when "
                         f"patient_ids is given, got dtype {members.dtype}.")
      members = members.astype(np.int64)
      if members.size and (members.min() < 0 or members.max() >= len(ids)):
        raise ValueError(f"check_no_leakage: split {name!r} has example index outside [0, {len(ids)}): "
                         f"min {members.min()}, max {members.max()}.")
      members = ids[members]
    for patient in set(members.tolist()):
      owners.setdefault(patient, []).append(str(name))
  shared = sorted(((p, names) for p, names in owners.items() if len(names) > 1), key=lambda x: str(x[0]))
  if shared:
    shown = "; ".join(f"patient {p!r} is in splits {', '.join(repr(n) for n in names)}" for p, names in shared[:10])
    more = f"; and {len(shared) - 10} more" if len(shared) > 10 else ""
    raise ValueError(f"Patient leakage: {len(shared)} patient(s) appear in more than one split: {shown}{more}.")


def check_folds(folds: Sequence[Tuple[Any, Any]], patient_ids) -> None:
  """Checks k-fold splits: no leakage within any fold, and every example in exactly one validation fold."""
  ids = _as_ids(patient_ids)
  seen = np.zeros((len(ids),), np.int64)
  for f, (train, val) in enumerate(folds):
    check_no_leakage({f"fold{f}/train": train, f"fold{f}/val": val}, ids)
    np.add.at(seen, np.asarray(val, np.int64), 1)
  if np.any(seen != 1):
    bad = np.flatnonzero(seen != 1)
    raise ValueError(f"check_folds: {len(bad)} example(s) are not in exactly one validation fold, e.g. example "
                     f"{bad[0]} (patient {ids[bad[0]]!r}) is in {seen[bad[0]]}.")


# -------------------------------------------------------------------------------------------- JSON --


def _index_list(name: str, indices) -> List[int]:
  a = np.asarray(indices)
  if a.ndim != 1 or (a.size and a.dtype.kind not in "iu") or (a.size and a.min() < 0):
    raise ValueError(f"splits_to_json: split {name!r} must be 1-D non-negative integer indices, got "
                     f"{a.dtype} of shape {a.shape}.")
  return [int(i) for i in a]


def _json_path(path) -> str:
  path = os.fspath(path)
  return os.path.join(path, DEFAULT_JSON_NAME) if os.path.isdir(path) else path


def splits_to_json(path, splits: Union[Mapping[str, Any], Folds], *, patient_ids=None,
                   info: Optional[Mapping[str, Any]] = None) -> str:
  """Writes splits (dict name -> example indices) or k-fold splits (list of (train, val)) to a JSON file.

  The file is written to a temporary file in the same directory and moved into place, so a crash never
  leaves a half-written file. With patient_ids, the splits are checked for leakage first (nothing is
  written if they leak) and each split's patient ids are stored too, for reading by eye.

  Args:
    path: a .json file, or a dataset directory (then `splits.json` inside it).
    splits: dict name -> (n,) int indices, or a list of (train_idx, val_idx) pairs.
    patient_ids: optional (N,) patient ids the indices point into.
    info: optional JSON-serialisable dict stored alongside (seed, k, rule, dataset name ...).

  Returns:
    The path written.
  """
  path = _json_path(path)
  ids = None if patient_ids is None else _as_ids(patient_ids)
  doc: Dict[str, Any] = {"format": JSON_FORMAT, "version": JSON_VERSION, "info": dict(info or {})}
  if isinstance(splits, Mapping):
    if ids is not None:
      check_no_leakage(splits, ids)
    doc["splits"] = {str(name): _index_list(str(name), idx) for name, idx in splits.items()}
    if ids is not None:
      doc["patients"] = {name: sorted(set(ids[idx].tolist()), key=str) for name, idx in doc["splits"].items()}
  else:
    folds = list(splits)
    if not folds or any(len(pair) != 2 for pair in folds):
      raise ValueError("splits_to_json: splits must be a dict name -> indices or a non-empty list of "
                       "(train_idx, val_idx) pairs.")
    if ids is not None:
      check_folds(folds, ids)
    doc["folds"] = [{"train": _index_list(f"fold{f}/train", tr), "val": _index_list(f"fold{f}/val", va)}
                    for f, (tr, va) in enumerate(folds)]
  if ids is not None:
    doc["num_examples"] = int(len(ids))
  try:
    text = json.dumps(doc, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  except (TypeError, ValueError) as e:
    raise ValueError(f"splits_to_json: cannot serialise info for {path}: {e}") from e
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"splits_to_json: directory {directory} does not exist (writing {path}).")
  atomic.write_text_atomically(path, text)
  return path


def splits_from_json(path, *, with_info: bool = False):
  """Reads a file written by `splits_to_json`.

  Returns:
    dict name -> int64 indices, or a list of (train_idx, val_idx) for k-fold files; with with_info=True a
    pair (splits, info).
  """
  path = _json_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"splits_from_json: no splits file at {path}.")
  try:
    with open(path) as fh:
      doc = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"splits_from_json: {path} is not valid JSON: {e}") from e
  if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
    raise ValueError(f"splits_from_json: {path} is not a medjax splits file (missing 'format': "
                     f"{JSON_FORMAT!r}).")
  if doc.get("version") != JSON_VERSION:
    raise ValueError(f"splits_from_json: {path} has version {doc.get('version')!r}; this reader knows "
                     f"{JSON_VERSION}.")
  as_idx = lambda v: np.asarray(v, np.int64).reshape(-1)
  if "splits" in doc:
    out: Any = {name: as_idx(v) for name, v in doc["splits"].items()}
  elif "folds" in doc:
    try:
      out = [(as_idx(f["train"]), as_idx(f["val"])) for f in doc["folds"]]
    except (KeyError, TypeError) as e:
      raise ValueError(f"splits_from_json: {path} has a malformed 'folds' entry (each needs 'train' and 'val')."
                       ) from e
  else:
    raise ValueError(f"splits_from_json: {path} has neither a 'splits' nor a 'folds' key.")
  return (out, doc.get("info", {})) if with_info else out
