"""Tabular clinical features fitted on the training split only (medjax/data/tabular.py)."""

import dataclasses
import json
import math
import re
import warnings

import numpy as np
import pytest

from medjax.data import tabular

SPEC = {"numeric": ["age", "crp_mg_l"], "categorical": ["sex", "site"]}
# Training split: numbers, numeric strings with spaces, and several spellings of a missing cell on purpose.
TRAIN = {
    "t1": {"age": 60, "crp_mg_l": "7.5", "sex": "F", "site": "A", "label": 1},
    "t2": {"age": "70", "crp_mg_l": "NA", "sex": "M", "site": "B", "label": 0},
    "t3": {"age": " 50 ", "crp_mg_l": 2.5, "sex": " F", "site": None, "label": 1},
    "t4": {"age": float("nan"), "crp_mg_l": "", "sex": "M", "site": "A", "label": 0},
}
VAL = {
    "v1": {"age": 80, "crp_mg_l": 12.5, "sex": "F", "site": "B"},
    "v2": {"age": "n/a", "crp_mg_l": "5", "sex": "null", "site": "A"},
}


def _fit(records=TRAIN, spec=SPEC):
  return tabular.fit(list(records.values()), spec, list(records))


def _many(prep, records):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # none of the fixtures' categories is unseen
    return prep.transform_many(list(records.values()), list(records))


def test_fit_standardises_with_numpy_statistics_of_the_training_values_only():
  prep = _fit()
  age, crp = np.array([60.0, 70.0, 50.0]), np.array([7.5, 2.5])  # the non-missing training values
  np.testing.assert_allclose(prep.mean, [age.mean(), crp.mean()], rtol=0, atol=1e-12)
  np.testing.assert_allclose(prep.scale, [age.std(), crp.std()], rtol=0, atol=1e-12)  # population sd
  assert prep.vocabularies == (("F", "M"), ("A", "B")) and prep.cardinalities == (3, 3)
  assert prep.num_numeric == 2 and prep.num_categorical == 2

  out = _many(prep, TRAIN)
  assert out["numeric"].dtype == np.float32 and out["missing"].dtype == np.float32
  assert out["categorical"].dtype == np.int32
  assert out["numeric"].shape == out["missing"].shape == (4, 2) and out["categorical"].shape == (4, 2)
  sd_age = math.sqrt(200 / 3)
  np.testing.assert_allclose(out["numeric"], [[0, 1], [10 / sd_age, 0], [-10 / sd_age, -1], [0, 0]], atol=1e-6)
  np.testing.assert_array_equal(out["missing"], [[0, 0], [0, 1], [0, 0], [1, 1]])
  np.testing.assert_array_equal(out["categorical"], [[1, 1], [2, 2], [1, 0], [2, 1]])

  val = _many(prep, VAL)  # validation cases use the training statistics
  np.testing.assert_allclose(val["numeric"], [[20 / sd_age, 3.0], [0.0, 0.0]], atol=1e-6)
  np.testing.assert_array_equal(val["missing"], [[0, 0], [1, 0]])
  np.testing.assert_array_equal(val["categorical"], [[1, 2], [0, 1]])


@pytest.mark.parametrize("cell", [None, float("nan"), np.float32("nan"), "", "   ", "NA", "na", "N/A", "n/a", "NaN",
                                  "nan", "NULL", " null ", "\tNa\n"])
def test_every_missing_spelling_is_missing_in_both_kinds_of_column(cell):
  assert tabular.is_missing(cell)
  out = _fit().transform({"age": cell, "crp_mg_l": 5.0, "sex": cell, "site": "B"}, "c")
  np.testing.assert_array_equal(out["missing"], [1, 0])
  np.testing.assert_array_equal(out["numeric"], [0, 0])
  np.testing.assert_array_equal(out["categorical"], [0, 2])


@pytest.mark.parametrize("cell", [0, 0.0, "0", "none", "-", "F", False])
def test_values_that_are_not_missing(cell):
  assert not tabular.is_missing(cell)


def test_a_leaked_validation_value_changes_nothing_fitted():
  train_records, val_records = [dict(r) for r in TRAIN.values()], [dict(r) for r in VAL.values()]
  prep = tabular.fit(train_records, SPEC, list(TRAIN))
  fitted, train_out = json.dumps(prep.to_dict()), _many(prep, TRAIN)

  # Had the leaked value entered the statistics, they would differ: the check below can fail.
  leaked = dict(val_records[0], age=1e9, sex="X")
  assert tabular.fit(train_records + [leaked], SPEC, list(TRAIN) + ["v1"]).to_dict() != prep.to_dict()

  # Whatever the caller does with validation records (transform them, edit them, even edit the list and the
  # training records it passed to fit) leaves the preprocessor as fitted.
  val_records[0].update(age=1e9, crp_mg_l="-1e12", sex="X", site="Z")
  with pytest.warns(tabular.UnseenCategoryWarning):
    val_out = prep.transform_many(val_records, list(VAL))
  assert val_out["numeric"][0, 0] == pytest.approx((1e9 - 60) / math.sqrt(200 / 3), rel=1e-6)
  train_records.append(val_records[0])
  train_records[0]["age"] = 1e9
  with pytest.raises(dataclasses.FrozenInstanceError):
    prep.mean = (0.0, 0.0)
  assert json.dumps(prep.to_dict()) == fitted
  for key, value in _many(prep, TRAIN).items():
    np.testing.assert_array_equal(value, train_out[key])


def test_unseen_category_maps_to_unknown_with_a_warning_naming_case_column_and_value():
  prep = _fit()
  record = {"age": 61, "crp_mg_l": 1, "sex": "F", "site": "C"}
  with pytest.warns(tabular.UnseenCategoryWarning, match=r"Case 'p9': categorical column 'site' has the value 'C'"):
    out = prep.transform(record, "p9")
  np.testing.assert_array_equal(out["categorical"], [1, 0])
  with pytest.warns(tabular.UnseenCategoryWarning, match=r"'sex' has the value 'f'"):  # values are case-sensitive
    prep.transform(dict(record, sex="f", site="A"), "p9")


@pytest.mark.parametrize("cell", ["sixty", "7,5", "inf", float("inf"), True, [61]])
def test_non_numeric_value_in_a_numeric_column_names_case_column_and_value(cell):
  pattern = re.escape(f"Case 'p3': numeric column 'age' has the value {cell!r}")
  with pytest.raises(ValueError, match=pattern):
    _fit().transform({"age": cell, "crp_mg_l": 1, "sex": "F", "site": "A"}, "p3")
  with pytest.raises(ValueError, match=pattern):  # also while fitting
    tabular.fit([TRAIN["t1"], dict(TRAIN["t2"], age=cell)], SPEC, ["t1", "p3"])


def test_a_record_without_a_declared_column_is_refused_naming_case_and_column():
  with pytest.raises(ValueError, match=r"Case 't2': the record has no column 'crp_mg_l'"):
    tabular.fit([TRAIN["t1"], {"age": 1, "sex": "F", "site": "A"}], SPEC, ["t1", "t2"])
  with pytest.raises(ValueError, match=r"Case 'v7': the record has no column 'site'"):
    _fit().transform({"age": 1, "crp_mg_l": 1, "sex": "F"}, "v7")


def test_columns_without_training_values_and_constant_columns():
  with pytest.raises(ValueError, match=r"numeric column 'crp_mg_l' has no non-missing value among the 2 training"):
    tabular.fit([TRAIN["t2"], TRAIN["t4"]], SPEC, ["t2", "t4"])
  with pytest.raises(ValueError, match=r"categorical column 'site' has no non-missing value among the 1 training"):
    tabular.fit([TRAIN["t3"]], SPEC, ["t3"])
  prep = tabular.fit([TRAIN["t1"], dict(TRAIN["t1"], crp_mg_l=None)], SPEC, ["a", "b"])  # one value each
  assert prep.mean == (60.0, 7.5) and prep.scale == (1.0, 1.0)  # sd 0 -> scale 1: a constant becomes 0
  np.testing.assert_array_equal(prep.transform({"age": 62, "crp_mg_l": 7.5, "sex": "F", "site": "A"}, "c")["numeric"],
                                [2.0, 0.0])


def test_to_dict_from_dict_round_trip_through_json_gives_equal_transforms():
  prep = _fit()
  restored = tabular.TabularPreprocessor.from_dict(json.loads(json.dumps(prep.to_dict())))
  assert restored == prep and restored.cardinalities == (3, 3)
  for records in (TRAIN, VAL):
    a, b = _many(prep, records), _many(restored, records)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_from_dict_refuses_bad_statistics():
  good = _fit().to_dict()
  with pytest.raises(ValueError, match=r"expected format 'medjax.tabular/1', got None"):
    tabular.TabularPreprocessor.from_dict({k: v for k, v in good.items() if k != "format"})
  bad = json.loads(json.dumps(good))
  bad["numeric"][1]["scale"] = 0.0
  with pytest.raises(ValueError, match=r"numeric column 'crp_mg_l' has mean 5.0 and scale 0.0"):
    tabular.TabularPreprocessor.from_dict(bad)
  bad = json.loads(json.dumps(good))
  bad["categorical"][0]["vocabulary"] = ["M", "F"]
  with pytest.raises(ValueError, match=r"vocabulary of categorical column 'sex' must be sorted distinct strings"):
    tabular.TabularPreprocessor.from_dict(bad)
  bad = json.loads(json.dumps(good))
  del bad["numeric"][0]["mean"]
  with pytest.raises(ValueError, match=r"malformed entry \(KeyError: 'mean'\)"):
    tabular.TabularPreprocessor.from_dict(bad)


def test_spec_validation_names_the_config_key():
  assert tabular.parse_spec({"numeric": ["age"]}) == tabular.TabularSpec(("age",), ())
  assert tabular.parse_spec(SPEC).columns == ("age", "crp_mg_l", "sex", "site")
  with pytest.raises(ValueError, match=r"config.data.tabular: column 'age' is declared twice"):
    tabular.parse_spec({"numeric": ["age"], "categorical": ["age"]})
  with pytest.raises(ValueError, match=r"config.data.tabular.categorical: column names must be non-empty strings, "
                                       r"got ' '"):
    tabular.TabularSpec(categorical=("sex", " "))
  with pytest.raises(ValueError, match=r"config.data.tabular.numeric must be a list of column names, got 'age'"):
    tabular.parse_spec({"numeric": "age"})
  with pytest.raises(ValueError, match=r"config.data.tabular: unknown key\(s\) \['numerical'\]"):
    tabular.parse_spec({"numerical": ["age"]})


@pytest.mark.parametrize("spec,widths", [({"numeric": ["age"]}, (1, 0)), ({"categorical": ["sex"]}, (0, 1))])
def test_zero_numeric_or_categorical_columns_give_zero_size_axes(spec, widths):
  prep = _fit(spec=spec)
  one = prep.transform(VAL["v1"], "v1")
  assert one["numeric"].shape == one["missing"].shape == (widths[0],) and one["categorical"].shape == (widths[1],)
  many = _many(prep, VAL)
  assert many["numeric"].shape == (2, widths[0]) and many["categorical"].shape == (2, widths[1])
  none = prep.transform_many([], [])
  assert none["numeric"].shape == (0, widths[0]) and none["categorical"].shape == (0, widths[1])
  assert none["categorical"].dtype == np.int32
  with pytest.raises(ValueError, match=r"one case id each; got list of 2 and 1 case ids"):
    prep.transform_many(list(VAL.values()), ["v1"])


def test_read_csv_reads_strings_that_fit_then_standardises(tmp_path):
  path = tmp_path / "clinical.csv"
  path.write_text("\ufeffcase_id,age,crp_mg_l,sex,site\n t1 ,60,7.5,F,A\nt2,70,NA,M,B\nt3, 50 ,2.5, F,\n\n",
                  encoding="utf-8")
  table = tabular.read_csv(path, "case_id")
  assert list(table) == ["t1", "t2", "t3"]
  assert table["t3"] == {"case_id": "t3", "age": " 50 ", "crp_mg_l": "2.5", "sex": " F", "site": ""}
  prep = tabular.fit(list(table.values()), SPEC, list(table))
  expected = _fit({k: TRAIN[k] for k in ("t1", "t2", "t3")})
  assert prep.to_dict() == expected.to_dict()


@pytest.mark.parametrize("text,pattern", [
    ("id,age\na,1\n", r"clinical.csv: no id column 'case_id'; the columns are \['id', 'age'\]"),
    ("case_id,age\na,1\nb,2\na ,3\n", r"clinical.csv, line 4: duplicate case id 'a' in column 'case_id' \(first on line 2\)"),
    ("case_id,age\na,1\n,2\n", r"clinical.csv, line 3: empty case id in column 'case_id'"),
    ("case_id,age\na,1,9\n", r"clinical.csv, line 2: 3 cells but the header has 2"),
    ("case_id,age,age\na,1,2\n", r"clinical.csv: column\(s\) \['age'\] appear more than once"),
    ("", r"clinical.csv: empty \(no header row\)"),
])
def test_read_csv_errors_name_the_file_and_the_problem(tmp_path, text, pattern):
  path = tmp_path / "clinical.csv"
  path.write_text(text)
  with pytest.raises(ValueError, match=pattern):
    tabular.read_csv(path, "case_id")
