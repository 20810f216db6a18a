"""Tabular clinical features of a case (age, sex, lab values), preprocessed with training statistics only.

A dataset declares its columns in `config.data.tabular = {"numeric": [...], "categorical": [...]}`. `fit` computes
the statistics from the TRAINING records alone (the caller passes nothing else), and the frozen
`TabularPreprocessor` it returns turns the record of any case (training, validation, test, inference) into the
"tabular" entry of the model input:

  numeric      float32 (F,)  (x - training mean) / training sd; 0.0 where the value is missing
  missing      float32 (F,)  1.0 where the numeric value is missing, else 0.0
  categorical  int32 (K,)    0 = missing or unseen in training, 1..V_k = index in the sorted training vocabulary

Standardising with statistics of the validation or test cases would leak them into training; keeping the fit to
the training records and the preprocessor immutable rules that out. `to_dict`/`from_dict` store the fitted
statistics (JSON-safe) in a run's workdir, so inference re-uses exactly them.

Missing cells: None, float NaN, and strings that are empty or one of MISSING_STRINGS after stripping whitespace
(case-insensitive). Numeric cells may be numbers or numeric strings (" 7.5"); categorical values are compared as
`str(value).strip()`, so 1 and "1" are the same category but 1.0 is "1.0". Columns of a record that the spec does
not declare (a label, an image path) are ignored. Pure numpy: this runs on the host.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import dataclasses
import math
import numbers
import os
import warnings
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np

SPEC_KEY = "config.data.tabular"
# CSV spellings of a missing cell, compared after strip() and lower(); "" is missing too.
MISSING_STRINGS = frozenset({"", "na", "n/a", "nan", "null"})
FORMAT = "medjax.tabular/1"  # to_dict's version tag; from_dict refuses anything else


class UnseenCategoryWarning(UserWarning):
  """A categorical value that the training split never showed; it is mapped to index 0 (unknown)."""


@dataclasses.dataclass(frozen=True)
class TabularSpec:
  """The declared tabular columns: `numeric` (F names) and `categorical` (K names), unique across both."""
  numeric: Tuple[str, ...] = ()
  categorical: Tuple[str, ...] = ()

  def __post_init__(self):
    seen = set()
    for kind in ("numeric", "categorical"):
      names = getattr(self, kind)
      if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ValueError(f"{SPEC_KEY}.{kind} must be a list of column names, got {names!r}.")
      for name in names:
        if not isinstance(name, str) or not name.strip():
          raise ValueError(f"{SPEC_KEY}.{kind}: column names must be non-empty strings, got {name!r}.")
        if name in seen:
          raise ValueError(f"{SPEC_KEY}: column {name!r} is declared twice (names must be unique across numeric "
                           f"and categorical).")
        seen.add(name)
      object.__setattr__(self, kind, tuple(names))

  @property
  def columns(self) -> Tuple[str, ...]:
    return self.numeric + self.categorical


def parse_spec(mapping: Union[Mapping[str, Any], TabularSpec]) -> TabularSpec:
  """`{"numeric": [...], "categorical": [...]}` (either may be left out) -> TabularSpec; unknown keys raise."""
  if isinstance(mapping, TabularSpec):
    return mapping
  if not isinstance(mapping, Mapping):
    raise ValueError(f"{SPEC_KEY} must be a mapping with keys 'numeric' and 'categorical', got {mapping!r}.")
  unknown = sorted(set(mapping) - {"numeric", "categorical"})
  if unknown:
    raise ValueError(f"{SPEC_KEY}: unknown key(s) {unknown}; the keys are 'numeric' and 'categorical'.")
  return TabularSpec(numeric=mapping.get("numeric", ()), categorical=mapping.get("categorical", ()))


def is_missing(value: Any) -> bool:
  """True for None, a float NaN, and a string that is empty or in MISSING_STRINGS after strip()/lower()."""
  if value is None:
    return True
  if isinstance(value, str):
    return value.strip().lower() in MISSING_STRINGS
  if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
    return math.isnan(float(value))
  return False


def _cell(record: Mapping[str, Any], column: str, case_id: Any) -> Any:
  if not isinstance(record, Mapping):
    raise ValueError(f"Case {case_id!r}: the tabular record must be a mapping column -> value, got "
                     f"{type(record).__name__}.")
  if column not in record:
    raise ValueError(f"Case {case_id!r}: the record has no column {column!r} (declared in {SPEC_KEY}); "
                     f"it has {sorted(map(str, record))}.")
  return record[column]


def _number(record: Mapping[str, Any], column: str, case_id: Any) -> float:
  """The numeric cell as a float; NaN where missing. A value that is not a finite number raises."""
  value = _cell(record, column, case_id)
  if is_missing(value):
    return math.nan
  number = math.nan
  if isinstance(value, str):
    with contextlib.suppress(ValueError):  # not a number: number stays NaN and the check below raises
      number = float(value.strip())
  elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
    number = float(value)  # bools are refused: True/False belong in a categorical column
  if not math.isfinite(number):
    raise ValueError(f"Case {case_id!r}: numeric column {column!r} has the value {value!r}, which is not a finite "
                     f"number (missing values are written as empty, NA, N/A, NaN or null).")
  return number


def _category(record: Mapping[str, Any], column: str, case_id: Any) -> Union[str, None]:
  value = _cell(record, column, case_id)
  return None if is_missing(value) else str(value).strip()


def _check_ids(records: Sequence[Mapping[str, Any]], case_ids: Sequence[Any], what: str) -> None:
  if isinstance(records, Mapping) or len(records) != len(case_ids):
    raise ValueError(f"{what}: records must be a sequence of mappings with one case id each; got "
                     f"{type(records).__name__} of {len(records)} and {len(case_ids)} case ids.")


@dataclasses.dataclass(frozen=True)
class TabularPreprocessor:
  """Fitted statistics of the training split (immutable: nothing done with other records can change them).

  Attributes:
    spec: the declared columns.
    mean: (F,) training mean of each numeric column, in its own unit.
    scale: (F,) training population sd of each numeric column (1.0 where that sd is 0, e.g. a single value,
      so a constant column becomes 0 rather than a division by zero).
    vocabularies: (K,) per categorical column, the sorted distinct training values (strings); value i of a
      vocabulary has index i + 1, index 0 is missing/unknown.
  """
  spec: TabularSpec
  mean: Tuple[float, ...]
  scale: Tuple[float, ...]
  vocabularies: Tuple[Tuple[str, ...], ...]

  @property
  def num_numeric(self) -> int:
    return len(self.spec.numeric)

  @property
  def num_categorical(self) -> int:
    return len(self.spec.categorical)

  @property
  def cardinalities(self) -> Tuple[int, ...]:
    """Embedding table size of each categorical column: vocabulary size + 1 (index 0 = missing/unknown)."""
    return tuple(len(v) + 1 for v in self.vocabularies)

  def transform(self, record: Mapping[str, Any], case_id: Any) -> Dict[str, np.ndarray]:
    """One case's record -> {"numeric": float32 (F,), "missing": float32 (F,), "categorical": int32 (K,)}.

    Raises ValueError naming case, column and value for a non-numeric value in a numeric column, or for a
    declared column that the record lacks. Warns UnseenCategoryWarning (naming case, column and value) and uses
    index 0 for a categorical value not in the training vocabulary.
    """
    raw = np.array([_number(record, c, case_id) for c in self.spec.numeric], np.float64)
    missing = np.isnan(raw)
    numeric = np.where(missing, 0.0, (raw - np.asarray(self.mean, np.float64)) / np.asarray(self.scale, np.float64))
    indices = []
    for column, vocabulary in zip(self.spec.categorical, self.vocabularies):
      value, index = _category(record, column, case_id), 0
      if value is not None:
        position = bisect.bisect_left(vocabulary, value)  # vocabularies are sorted
        if position < len(vocabulary) and vocabulary[position] == value:
          index = position + 1
        else:
          warnings.warn(f"Case {case_id!r}: categorical column {column!r} has the value {value!r}, unseen in the "
                        f"training split; mapped to index 0 (unknown).", UnseenCategoryWarning, stacklevel=2)
      indices.append(index)
    return {"numeric": numeric.astype(np.float32), "missing": missing.astype(np.float32),
            "categorical": np.asarray(indices, np.int32).reshape(self.num_categorical)}

  def transform_many(self, records: Sequence[Mapping[str, Any]], case_ids: Sequence[Any]) -> Dict[str, np.ndarray]:
    """N records -> {"numeric": float32 (N, F), "missing": float32 (N, F), "categorical": int32 (N, K)}."""
    _check_ids(records, case_ids, "TabularPreprocessor.transform_many")
    rows = [self.transform(r, i) for r, i in zip(records, case_ids)]
    widths = {"numeric": self.num_numeric, "missing": self.num_numeric, "categorical": self.num_categorical}
    dtypes = {"numeric": np.float32, "missing": np.float32, "categorical": np.int32}
    return {k: np.stack([row[k] for row in rows]) if rows else np.zeros((0, widths[k]), dtypes[k]) for k in widths}

  def to_dict(self) -> Dict[str, Any]:
    """JSON-safe statistics: {"format", "numeric": [{name, mean, scale}], "categorical": [{name, vocabulary}]}."""
    numeric = zip(self.spec.numeric, self.mean, self.scale)
    categorical = zip(self.spec.categorical, self.vocabularies)
    return {"format": FORMAT, "numeric": [{"name": n, "mean": m, "scale": s} for n, m, s in numeric],
            "categorical": [{"name": n, "vocabulary": list(v)} for n, v in categorical]}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> TabularPreprocessor:
    """Inverse of to_dict; refuses another format, a non-positive or non-finite scale, or an unsorted vocabulary."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
      found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
      raise ValueError(f"Tabular statistics: expected format {FORMAT!r}, got {found!r}.")
    try:
      numeric, categorical = list(data["numeric"]), list(data["categorical"])
      spec = TabularSpec(tuple(e["name"] for e in numeric), tuple(e["name"] for e in categorical))
      mean = tuple(float(e["mean"]) for e in numeric)
      scale = tuple(float(e["scale"]) for e in numeric)
      vocabularies = tuple(tuple(e["vocabulary"]) for e in categorical)
    except (KeyError, TypeError) as e:
      raise ValueError(f"Tabular statistics: malformed entry ({type(e).__name__}: {e}).") from e
    for name, m, s in zip(spec.numeric, mean, scale):
      if not (math.isfinite(m) and math.isfinite(s) and s > 0):
        raise ValueError(f"Tabular statistics: numeric column {name!r} has mean {m} and scale {s}; both must be "
                         f"finite and the scale > 0.")
    for name, vocabulary in zip(spec.categorical, vocabularies):
      if not all(isinstance(v, str) for v in vocabulary) or list(vocabulary) != sorted(set(vocabulary)):
        raise ValueError(f"Tabular statistics: the vocabulary of categorical column {name!r} must be sorted "
                         f"distinct strings, got {list(vocabulary)!r}.")
    return cls(spec, mean, scale, vocabularies)


def fit(records: Sequence[Mapping[str, Any]], spec: Union[TabularSpec, Mapping[str, Any]],
        case_ids: Sequence[Any]) -> TabularPreprocessor:
  """Fits the statistics on the TRAINING records only (pass no validation or test record here).

  Args:
    records: one mapping column -> raw value per training case.
    spec: TabularSpec, or the mapping of `config.data.tabular`.
    case_ids: (N,) id of each record, for error messages.
  Returns: TabularPreprocessor with each numeric column's mean and population sd (ddof=0) over its non-missing
    training values, and each categorical column's sorted vocabulary of non-missing training values.
  Raises ValueError naming the case and column for a declared column a record lacks or a non-numeric numeric
    value, and naming the column when it has no non-missing training value (no statistic can be fitted).
  """
  spec = parse_spec(spec)
  _check_ids(records, case_ids, "tabular fit")
  if not records:
    raise ValueError("tabular fit: no training records; the statistics come from the training split.")
  mean, scale = [], []
  for column in spec.numeric:
    values = np.array([_number(r, column, i) for r, i in zip(records, case_ids)], np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
      raise ValueError(f"tabular fit: numeric column {column!r} has no non-missing value among the "
                       f"{len(records)} training cases; drop it from {SPEC_KEY} or fill it.")
    sd = float(values.std())
    mean.append(float(values.mean()))
    scale.append(sd if sd > 0 else 1.0)
  vocabularies = []
  for column in spec.categorical:
    values = {_category(r, column, i) for r, i in zip(records, case_ids)} - {None}
    if not values:
      raise ValueError(f"tabular fit: categorical column {column!r} has no non-missing value among the "
                       f"{len(records)} training cases; drop it from {SPEC_KEY} or fill it.")
    vocabularies.append(tuple(sorted(values)))
  return TabularPreprocessor(spec, tuple(mean), tuple(scale), tuple(vocabularies))


def read_csv(path: Union[str, os.PathLike], id_column: str) -> Dict[str, Dict[str, str]]:
  """Reads a table with one row per case -> {case_id: {column: cell string as read}} (ids stripped of spaces).

  Raises ValueError naming the file and the column for a missing id column or a repeated header, naming the
  file, line and id for a duplicate or empty case id, and naming the file and line for a row whose number of
  cells differs from the header's.
  """
  path = os.fspath(path)
  with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: drop the byte-order mark of Excel exports
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f"Tabular file {path}: empty (no header row).")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
      raise ValueError(f"Tabular file {path}: column(s) {repeated} appear more than once in the header.")
    if id_column not in header:
      raise ValueError(f"Tabular file {path}: no id column {id_column!r}; the columns are {header}.")
    table, first_line = {}, {}
    for row in reader:
      line = reader.line_num
      if not row:
        continue  # a blank line (e.g. at the end of the file) is no case
      if len(row) != len(header):
        raise ValueError(f"Tabular file {path}, line {line}: {len(row)} cells but the header has {len(header)}.")
      record = dict(zip(header, row))
      case_id = record[id_column].strip()
      if not case_id:
        raise ValueError(f"Tabular file {path}, line {line}: empty case id in column {id_column!r}.")
      if case_id in table:
        raise ValueError(f"Tabular file {path}, line {line}: duplicate case id {case_id!r} in column {id_column!r} "
                         f"(first on line {first_line[case_id]}).")
      table[case_id], first_line[case_id] = record, line
  return table
