"""Patient-level k-fold and hold-out splits, external test sets, the leakage check and JSON files."""

import json
import os

import numpy as np
import pytest

from medjax.data import splits


def _random_cohort(seed, num_patients=60, num_classes=3):
  """1-5 examples per patient, shuffled; each patient's examples share its label except for some noise."""
  rng = np.random.default_rng(seed)
  per_patient = rng.integers(1, 6, num_patients)
  patient_label = rng.choice(num_classes, num_patients, p=np.linspace(2, 1, num_classes) / np.linspace(
      2, 1, num_classes).sum())
  ids = np.repeat(np.array([f"P{i:03d}" for i in range(num_patients)]), per_patient)
  labels = np.repeat(patient_label, per_patient)
  order = rng.permutation(len(ids))  # examples of a patient are not contiguous in real data either
  return ids[order], labels[order]


def _patients_per_class(patients, patient_label, ids_in_split):
  present = np.isin(patients, ids_in_split)
  return {c: int(np.sum(present & (patient_label == c))) for c in np.unique(patient_label)}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 5])
def test_kfold_groups_patients_covers_examples_and_stratifies(seed, k):
  ids, labels = _random_cohort(seed)
  folds = splits.patient_kfold(ids, labels, k=k, seed=seed)
  assert len(folds) == k
  val_count = np.zeros(len(ids), int)
  patients, patient_label = splits.patient_labels(ids, labels)
  num_per_class = {c: int(np.sum(patient_label == c)) for c in np.unique(patient_label)}
  for train, val in folds:
    assert not set(ids[train]) & set(ids[val])  # no patient on both sides
    assert len(train) + len(val) == len(ids)
    val_count[val] += 1
    for c, count in _patients_per_class(patients, patient_label, ids[val]).items():
      assert abs(count - num_per_class[c] / k) < 1, (c, count, num_per_class[c], k)
    assert abs(len(set(ids[val])) - len(patients) / k) < 1
  np.testing.assert_array_equal(val_count, 1)  # every example in exactly one val fold
  # No patient in two val folds.
  fold_of = splits.assign_folds(ids, labels, k=k, seed=seed)
  for p in patients:
    assert len(set(fold_of[ids == p])) == 1
  splits.check_folds(folds, ids)


def test_kfold_determinism_and_seed_and_example_order():
  ids, labels = _random_cohort(0)
  a = splits.assign_folds(ids, labels, k=5, seed=7)
  np.testing.assert_array_equal(a, splits.assign_folds(ids, labels, k=5, seed=7))
  assert not np.array_equal(a, splits.assign_folds(ids, labels, k=5, seed=8))
  # Reordering the examples permutes the answer with them: folds depend on patients, not on row order.
  perm = np.random.default_rng(1).permutation(len(ids))
  np.testing.assert_array_equal(splits.assign_folds(ids[perm], labels[perm], k=5, seed=7), a[perm])


def test_unstratified_kfold_with_integer_ids():
  ids = np.repeat(np.arange(11), 3)
  folds = splits.patient_kfold(ids, k=3, seed=0)
  sizes = sorted(len(set(ids[val])) for _, val in folds)
  assert sizes == [3, 4, 4]
  splits.check_folds(folds, ids)


def test_patient_label_rules():
  ids = np.array(["a", "a", "a", "b", "b", "c"])
  labels = np.array([0, 0, 2, 1, 2, 1])
  patients, majority = splits.patient_labels(ids, labels)
  assert patients.tolist() == ["a", "b", "c"]
  assert majority.tolist() == [0, 2, 1]  # "b" ties 1 vs 2: the more severe wins
  _, most_severe = splits.patient_labels(ids, labels, rule="max")
  assert most_severe.tolist() == [2, 2, 1]


def test_kfold_errors():
  ids, labels = np.array(["a", "a", "b", "c"]), np.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"k=4 folds but only 3 patient"):
    splits.patient_kfold(ids, labels, k=4, seed=0)
  with pytest.raises(ValueError, match="labels has 3 entries but patient_ids has 4"):
    splits.patient_kfold(ids, labels[:3], k=2, seed=0)
  with pytest.raises(ValueError, match="k must be an integer >= 2"):
    splits.patient_kfold(ids, labels, k=1, seed=0)
  with pytest.raises(ValueError, match="empty"):
    splits.patient_kfold([], k=2, seed=0)
  with pytest.raises(ValueError, match="rule"):
    splits.patient_kfold(ids, labels, k=2, seed=0, rule="mean")
  with pytest.warns(UserWarning, match="fewer patients than k"):
    splits.patient_kfold(np.arange(6), [0, 0, 0, 0, 0, 1], k=3, seed=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.5, 0.0, 0.5), (0.34, 0.33, 0.33)])
def test_holdout_fractions_within_one_patient(seed, fractions):
  ids, labels = _random_cohort(seed, num_patients=47, num_classes=4)
  out = splits.holdout_split(ids, labels, fractions, seed=seed)
  assert list(out) == ["train", "val", "test"]
  splits.check_no_leakage(out, ids)
  assert sorted(np.concatenate(list(out.values())).tolist()) == list(range(len(ids)))
  patients, patient_label = splits.patient_labels(ids, labels)
  num_per_class = {c: int(np.sum(patient_label == c)) for c in np.unique(patient_label)}
  for f, idx in zip(fractions, out.values()):
    assert abs(len(set(ids[idx])) - f * len(patients)) < 1
    for c, count in _patients_per_class(patients, patient_label, ids[idx]).items():
      assert abs(count - f * num_per_class[c]) < 1


def test_holdout_determinism_and_errors():
  ids, labels = _random_cohort(3)
  a = splits.holdout_split(ids, labels, seed=1)
  b = splits.holdout_split(ids, labels, seed=1)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["test"], splits.holdout_split(ids, labels, seed=2)["test"])
  named = splits.holdout_split(ids, None, {"dev": 0.5, "test": 0.5}, seed=0)
  assert list(named) == ["dev", "test"]
  with pytest.raises(ValueError, match="sum to 1"):
    splits.holdout_split(ids, labels, (0.5, 0.2, 0.2), seed=0)
  with pytest.raises(ValueError, match="labels has"):
    splits.holdout_split(ids, labels[:-1], seed=0)


def test_external_test_keeps_site_apart():
  rng = np.random.default_rng(0)
  ids = np.repeat(np.arange(30), 2)
  site = np.repeat(rng.choice(["A", "B", "C"], 30), 2)  # a patient is scanned at one site
  labels = np.repeat(rng.integers(0, 2, 30), 2)
  internal, external = splits.external_test({"site": site, "age": np.zeros(60)}, "site", "C", patient_ids=ids)
  assert set(site[external]) == {"C"} and "C" not in set(site[internal])
  assert len(internal) + len(external) == 60
  # Downstream splits of the internal part never see site C.
  folds = splits.patient_kfold(ids[internal], labels[internal], k=3, seed=0)
  for train, val in folds:
    assert "C" not in set(site[internal[train]]) | set(site[internal[val]])
  held = splits.holdout_split(ids[internal], labels[internal], seed=0)
  for idx in held.values():
    assert "C" not in set(site[internal[idx]])
  splits.check_no_leakage({"external": external, **{n: internal[i] for n, i in held.items()}}, ids)
  # Several values and a list of per-example dicts.
  rows = [{"site": s} for s in site]
  _, ext2 = splits.external_test(rows, "site", ["B", "C"])
  assert set(site[ext2]) == {"B", "C"}


def test_external_test_errors():
  meta = {"site": np.array(["A", "A", "B", "B"])}
  with pytest.raises(ValueError, match=r"unknown metadata column 'scanner'.*'site'"):
    splits.external_test(meta, "scanner", "A")
  with pytest.raises(ValueError, match=r"\['Z'\] never occur"):
    splits.external_test(meta, "site", ["B", "Z"])
  with pytest.raises(ValueError, match="patient 'p1' is in splits 'internal', 'external'"):
    splits.external_test(meta, "site", "B", patient_ids=["p0", "p1", "p1", "p2"])
  with pytest.raises(ValueError, match="patient_ids has 3 entries"):
    splits.external_test(meta, "site", "B", patient_ids=["p0", "p1", "p2"])


def test_leakage_check_names_the_patient_and_splits():
  ids, labels = _random_cohort(0)
  out = splits.holdout_split(ids, labels, seed=0)
  splits.check_no_leakage(out, ids)  # proper splits pass
  victim = ids[out["test"][0]]
  leaky = dict(out, train=np.append(out["train"], out["test"][0]))
  with pytest.raises(ValueError, match=f"patient '{victim}' is in splits 'train', 'test'"):
    splits.check_no_leakage(leaky, ids)
  # Splits given as patient ids directly.
  with pytest.raises(ValueError, match=r"patient 7 is in splits 'a', 'b'"):
    splits.check_no_leakage({"a": [1, 7], "b": [7, 9], "c": [2]})
  splits.check_no_leakage({"a": [1, 2], "b": [3]})
  # Boolean masks, and a broken fold.
  splits.check_no_leakage({"x": ids == ids[0], "y": ids != ids[0]}, ids)
  folds = splits.patient_kfold(ids, labels, k=3, seed=0)
  bad = [(folds[0][0], np.append(folds[0][1], folds[0][0][0]))] + folds[1:]
  with pytest.raises(ValueError, match="Patient leakage"):
    splits.check_folds(bad, ids)
  with pytest.raises(ValueError, match="outside"):
    splits.check_no_leakage({"a": [0, len(ids)]}, ids)


def test_json_round_trip(tmp_path):
  ids, labels = _random_cohort(2)
  out = splits.holdout_split(ids, labels, seed=0)
  path = splits.splits_to_json(tmp_path / "holdout.json", out, patient_ids=ids, info={"seed": 0})
  back, info = splits.splits_from_json(path, with_info=True)
  assert info == {"seed": 0} and list(back) == list(out)
  for name in out:
    np.testing.assert_array_equal(back[name], out[name])
    assert back[name].dtype == np.int64
  assert json.loads(open(path).read())["patients"]["test"] == sorted(set(ids[out["test"]].tolist()))

  folds = splits.patient_kfold(ids, labels, k=4, seed=0)
  written = splits.splits_to_json(tmp_path, folds, patient_ids=ids)  # a dataset directory
  assert written == os.path.join(tmp_path, "splits.json")
  back = splits.splits_from_json(tmp_path)
  assert len(back) == 4
  for (tr, va), (tr2, va2) in zip(folds, back):
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
  # No stray temporary files.
  assert sorted(os.listdir(tmp_path)) == ["holdout.json", "splits.json"]


def test_json_refuses_leaks_and_bad_files(tmp_path):
  ids = np.array(["a", "a", "b"])
  target = tmp_path / "s.json"
  with pytest.raises(ValueError, match="patient 'a'"):
    splits.splits_to_json(target, {"train": [0], "val": [1, 2]}, patient_ids=ids)
  assert not target.exists() and os.listdir(tmp_path) == []  # nothing written half-way
  with pytest.raises(FileNotFoundError, match="no splits file"):
    splits.splits_from_json(tmp_path / "missing.json")
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match="broken.json is not valid JSON"):
    splits.splits_from_json(tmp_path / "broken.json")
  (tmp_path / "other.json").write_text('{"a": 1}')
  with pytest.raises(ValueError, match="not a medjax splits file"):
    splits.splits_from_json(tmp_path / "other.json")
