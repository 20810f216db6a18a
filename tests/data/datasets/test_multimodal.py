"""The synthetic multimodal set: the model-input contract, missingness, training-only tabular statistics, the
absent-modality view and the presence check that names the case."""

import numpy as np
import pytest

from medjax.data import datasets, tabular
from medjax.data.datasets import multimodal
from medjax.data.datasets.base import MultimodalInfo, check_present
from medjax.data.pipeline import collate


def _build(**kwargs):
  options = dict(num_train=48, num_val=16, num_test=16, image_size=12)
  options.update(kwargs)
  return datasets.build_dataset("synthetic_multimodal", options)


@pytest.mark.parametrize("dims", [2, 3])
def test_examples_follow_the_model_input_contract(dims):
  ds = _build(spatial_dims=dims, image_size=10 if dims == 3 else 12)
  info = ds.info.multimodal
  assert info.modalities == ("t1", "t2") and info.numeric == ("age", "lab") and info.categorical == ("sex",)
  assert info.categorical_sizes == (3,) and info.may_be_missing == ()
  batch = collate([ds.source("val")[i] for i in range(3)])
  x = batch["image"]
  shape = (3,) + (10 if dims == 3 else 12,) * dims + (1,)
  assert {k: v.shape for k, v in x["images"].items()} == {"t1": shape, "t2": shape}
  assert all(v.dtype == np.float32 and v.shape == (3,) for v in x["present"].values())
  assert x["tabular"]["numeric"].shape == (3, 2) and x["tabular"]["categorical"].dtype == np.int32
  assert batch["label"].dtype == np.int32 and batch["id"].tolist() == [10**9, 10**9 + 1, 10**9 + 2]
  # Deterministic: a second build gives the same arrays.
  again = _build(spatial_dims=dims, image_size=10 if dims == 3 else 12).source("val")[2]["image"]["images"]["t1"]
  np.testing.assert_array_equal(again, x["images"]["t1"][2])


def test_missing_modalities_are_zero_images_with_present_0_and_never_both():
  ds = _build(missing={"t1": 0.6, "t2": 0.6, "lab": 0.5})
  source = ds.source("train")
  absent = {"t1": 0, "t2": 0}
  for i in range(len(source)):
    x = source[i]["image"]
    assert x["present"]["t1"] + x["present"]["t2"] >= 1
    for m in ("t1", "t2"):
      if not x["present"][m]:
        absent[m] += 1
        assert not np.any(x["images"][m])
  assert absent["t1"] > 5 and absent["t2"] > 5
  assert ds.info.multimodal.may_be_missing == ("t1", "t2")
  missing_lab = [source[i]["image"]["tabular"]["missing"][1] for i in range(len(source))]
  assert 0 < np.mean(missing_lab) < 1


def test_tabular_statistics_come_from_the_training_records_only():
  ds = _build()
  train = ds.source("train")
  expected = tabular.fit(train.records(), tabular.TabularSpec(("age", "lab"), ("sex",)),
                         [train.case_name(i) for i in range(len(train))])
  assert train.preprocessor == expected
  # Every split shares that one preprocessor, and a validation record changed after the build (a leaked
  # extreme value) changes only its own transform, never the statistics.
  val = ds.source("val")
  assert val.preprocessor is train.preprocessor
  before = train.preprocessor.to_dict()
  val.cases[0]["record"]["lab"] = 1e9
  assert val[0]["image"]["tabular"]["numeric"][1] > 1e6
  assert train.preprocessor.to_dict() == before


def test_labels_depend_on_the_rule():
  total = {rule: _build(rule=rule, num_train=400).source("train").labels() for rule in multimodal.RULES}
  assert 0.35 < total["sum"].mean() < 0.65 and 0.35 < total["interaction"].mean() < 0.65
  assert np.any(total["sum"] != total["interaction"])


def test_with_absent_removes_sources_and_names_unknown_ones():
  source = _build().source("test")
  view = multimodal.WithAbsent(source, ["t2", "tabular"])
  x = view[3]["image"]
  assert x["present"]["t2"] == 0 and not np.any(x["images"]["t2"]) and x["present"]["t1"] == 1
  assert np.all(x["tabular"]["missing"] == 1) and not np.any(x["tabular"]["numeric"])
  assert not np.any(x["tabular"]["categorical"])
  np.testing.assert_array_equal(x["images"]["t1"], source[3]["image"]["images"]["t1"])
  assert len(view) == len(source) and view.labels().tolist() == source.labels().tolist()
  with pytest.raises(ValueError, match=r"absent modality 'flair': the examples hold \('t1', 't2', 'tabular'\)"):
    multimodal.WithAbsent(source, ["flair"])


def test_bad_options_and_required_modalities_are_named():
  with pytest.raises(ValueError, match="config.data.missing: unknown source 'pet'"):
    _build(missing={"pet": 0.1})
  with pytest.raises(ValueError, match=r"config.data.missing.t2 must be a probability"):
    _build(missing={"t2": 1.0})
  with pytest.raises(ValueError, match="config.data.rule must be one of"):
    _build(rule="xor")
  info = MultimodalInfo(modalities=("t1", "flair"), shapes=((4, 4), (4, 4)), channels=(1, 1),
                        may_be_missing=("flair",))
  check_present({"t1": 1.0, "flair": 0.0}, info, "case_007")
  with pytest.raises(ValueError, match="case case_007: modality 't1' is missing, and the dataset declares it"):
    check_present({"t1": 0.0, "flair": 1.0}, info, "case_007")
