"""Evaluators on synthetic outputs: metrics against scikit-learn / numpy, reports, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from medjax import metrics
from medjax.data.datasets.base import DatasetInfo
from medjax.evaluators import EVALUATORS, collect, evaluate
from medjax.evaluators.classification import ClassificationEvaluator
from medjax.evaluators.regression import RegressionEvaluator
from medjax.evaluators.segmentation import SegmentationEvaluator


def _cls_info(num_classes):
  return DatasetInfo(task="classification", spatial_dims=2, image_shape=(4, 4), num_channels=1,
                     num_classes=num_classes, class_names=tuple(f"c{k}" for k in range(num_classes)),
                     label_kind="class")


SEG_INFO = DatasetInfo(task="segmentation", spatial_dims=2, image_shape=(6, 7), num_channels=1, num_classes=3,
                       class_names=("background", "organ", "lesion"), label_kind="map")


def _stats(evaluator, logits, labels, **extra):
  batch = {"label": jnp.asarray(labels), **{k: jnp.asarray(v) for k, v in extra.items()}}
  return jax.device_get(jax.jit(evaluator.stats_fn)(jnp.asarray(logits), {}, batch))


def _random_cls(num_cases, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_cases)
  logits = rng.normal(size=(num_cases, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  return logits.astype(np.float32), labels.astype(np.int32)


# ------------------------------------------------------------------------------------------ classification


def test_binary_metrics_match_sklearn():
  logits, labels = _random_cls(60, 2)
  evaluator = EVALUATORS.get("classification")(info=_cls_info(2))
  result = evaluator.summarize(_stats(evaluator, logits, labels))
  p1 = np.asarray(jax.nn.softmax(logits, -1))[:, 1]
  preds = (p1 >= 0.5).astype(int)
  assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, p1))
  assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
  assert result["sensitivity"] == pytest.approx(skm.recall_score(labels, preds))
  assert result["specificity"] == pytest.approx(skm.recall_score(labels, preds, pos_label=0))
  assert result["f1"] == pytest.approx(skm.f1_score(labels, preds))
  assert result["num_cases"] == 60
  assert result["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds))
  assert result["npv"] == pytest.approx(skm.precision_score(labels, preds, pos_label=0))
  assert result["fdr"] == pytest.approx(1 - skm.precision_score(labels, preds))
  assert "f2" not in result
  with_f2 = ClassificationEvaluator(_cls_info(2), betas=(2.0,))
  assert with_f2.summarize(_stats(with_f2, logits, labels))["f2"] == pytest.approx(skm.fbeta_score(labels, preds, beta=2))
  with pytest.raises(ValueError, match="every beta must be a positive number"):
    ClassificationEvaluator(_cls_info(2), betas=(0.0,))


def test_multiclass_metrics_match_sklearn():
  logits, labels = _random_cls(50, 4, seed=1)
  evaluator = ClassificationEvaluator(_cls_info(4))
  result = evaluator.summarize(_stats(evaluator, logits, labels))
  probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
  assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
  assert result["f1"] == pytest.approx(skm.f1_score(labels, probs.argmax(1), average="macro"))
  assert result["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, probs.argmax(1)))
  assert result["auc_weighted"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="weighted"))


def test_multilabel_uses_sigmoid_per_label():
  rng = np.random.default_rng(2)
  labels = (rng.random((40, 3)) < 0.4).astype(np.int32)
  logits = (rng.normal(size=(40, 3)) + 2.0 * labels - 1.0).astype(np.float32)
  evaluator = ClassificationEvaluator(_cls_info(3))
  stats = _stats(evaluator, logits, labels)
  np.testing.assert_allclose(stats["probs"], 1 / (1 + np.exp(-logits)), rtol=1e-5)
  result = evaluator.summarize(stats)
  assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, stats["probs"], average="macro"))
  assert result["subset_accuracy"] == pytest.approx(np.mean(np.all((stats["probs"] >= 0.5) == labels, 1)))


def test_task_kwarg_is_checked():
  with pytest.raises(ValueError, match="task must be one of"):
    ClassificationEvaluator(_cls_info(3), task="multiclass")
  with pytest.raises(ValueError, match="'binary' needs num_classes == 2"):
    ClassificationEvaluator(_cls_info(3), task="binary")
  evaluator = ClassificationEvaluator(_cls_info(3), task="multi-label")
  with pytest.raises(ValueError, match=r"outputs of shape \(4, 3\) do not fit labels of shape \(4,\)"):
    _stats(evaluator, np.zeros((4, 3), np.float32), np.zeros(4, np.int32))


def test_classification_bad_input():
  evaluator = ClassificationEvaluator(_cls_info(3))
  with pytest.raises(ValueError, match=r"outputs of shape \(4, 2\) do not fit labels"):
    _stats(evaluator, np.zeros((4, 2), np.float32), np.zeros(4, np.int32))
  logits, labels = _random_cls(6, 3)
  labels[[1, 4]] = [3, -1]
  stats = _stats(evaluator, logits, labels)
  with pytest.raises(ValueError, match=r"2 of 6 cases have labels outside \[0, 3\) \(#1, #4\)"):
    evaluator.summarize(stats)
  with pytest.raises(ValueError, match=r"labels outside \[0, 3\) \(id 11, id 14\)"):
    evaluator.report(stats, ids=list(range(10, 16)))
  logits[2, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN/inf outputs for 1 of 6 cases \(#2\)"):
    evaluator.summarize(_stats(evaluator, logits, np.zeros(6, np.int32)))
  # probabilities computed elsewhere (no on-device counters) are checked on the host too
  probs = np.full((3, 3), 1 / 3)
  probs[1] = np.nan
  with pytest.raises(ValueError, match=r"1 of 3 cases have NaN/inf probabilities \(first at position 1\)"):
    evaluator.summarize({"probs": probs, "label": np.array([0, 1, 2])})


# ------------------------------------------------------------------------------------------ segmentation


def _seg_case():
  """Two cases on a non-square 6x7 grid with known overlaps."""
  labels = np.zeros((2, 6, 7), np.int32)
  labels[:, 1:5, 1:5] = 1
  labels[0, 2:4, 2:4] = 2  # case 1 has no lesion
  pred = labels.copy()
  pred[0, 1:5, 1] = 0  # organ: remove a column of 4 voxels
  pred[1, 1:5, 5] = 1  # organ: add a column of 4
  return labels, pred


def test_segmentation_dice_iou_and_surface_metrics():
  labels, pred = _seg_case()
  evaluator = SegmentationEvaluator(SEG_INFO, surface_metrics=True)
  spacing = np.array([[1.0, 2.0]] * 2, np.float32)
  stats = _stats(evaluator, np.eye(3)[pred].astype(np.float32), labels, spacing_mm=spacing)
  np.testing.assert_array_equal(stats["prediction"], pred)
  result = evaluator.summarize(stats)
  organ = [2 * 8 / (8 + 12), 2 * 16 / (16 + 20)]  # case 0: ref 12 (16 - 4 lesion), pred 8; case 1: 16 -> 20
  assert result["dice/organ"] == pytest.approx(np.mean(organ))
  assert result["dice/lesion"] == pytest.approx(1.0)  # only case 0 has a lesion, perfectly found
  assert result["dice_mean"] == pytest.approx((np.mean(organ) + 1.0) / 2)
  assert result["dice_case_mean"] == pytest.approx(np.mean([(organ[0] + 1.0) / 2, organ[1]]))
  assert result["iou/organ"] == pytest.approx(np.mean([8 / 12, 16 / 20]))
  # case 1: the added column is one voxel (2 mm along x) from the reference surface
  values = evaluator.case_values(stats)
  assert values["hd95"][1, 0] == pytest.approx(2.0)
  assert np.isnan(values["hd95"][1, 1])  # no lesion in reference or prediction
  assert result["hd95/organ"] == pytest.approx(np.mean(values["hd95"][:, 0]))
  expected_hd95 = metrics.hausdorff_distance(labels[0] == 1, pred[0] == 1, (1.0, 2.0))
  assert values["hd95"][0, 0] == pytest.approx(expected_hd95)


def test_segmentation_default_keys_and_no_label_maps():
  labels, pred = _seg_case()
  evaluator = SegmentationEvaluator(SEG_INFO)
  stats = _stats(evaluator, np.eye(3)[pred].astype(np.float32), labels)
  assert "prediction" not in stats and stats["counts"].shape == (2, 3, 3)
  assert {"dice_mean", "dice/organ", "dice/lesion", "dice_case_mean", "num_cases", "iou/organ",
          "iou_mean"} <= set(evaluator.summarize(stats))
  assert "hd95_mean" not in evaluator.summarize(stats)


def test_segmentation_bad_input():
  evaluator = SegmentationEvaluator(SEG_INFO)
  with pytest.raises(ValueError, match=r"outputs of shape \(2, 6, 6, 3\) do not fit labels of shape \(2, 6, 7\)"):
    _stats(evaluator, np.zeros((2, 6, 6, 3), np.float32), np.zeros((2, 6, 7), np.int32))
  with pytest.raises(ValueError, match="do not fit"):  # 2 channels for 3 classes
    _stats(evaluator, np.zeros((2, 6, 7, 2), np.float32), np.zeros((2, 6, 7), np.int32))
  labels, pred = _seg_case()
  labels[1, 0, 0] = 7
  with pytest.raises(ValueError, match=r"1 of 2 cases have labels outside \[0, 3\) \(id b\)"):
    evaluator.report(_stats(evaluator, np.eye(3)[pred].astype(np.float32), labels), ids=["a", "b"])


def _gds(parts):
  """Generalized Dice of (intersection, predicted, reference) per class; weights 1 / reference^2, an absent class
  the largest weight of the present ones."""
  present = [1 / r**2 for _, _, r in parts if r > 0]
  weights = [1 / r**2 if r > 0 else max(present) for _, _, r in parts]
  return 2 * sum(w * i for w, (i, _, _) in zip(weights, parts)) / sum(w * (p + r) for w, (_, p, r) in zip(weights, parts))


def test_segmentation_false_positive_on_empty_reference_counts_and_options():
  labels, pred = _seg_case()
  pred[1, 0, 0] = 2  # case 1 has no lesion: one false-positive lesion voxel
  logits = np.eye(3)[pred].astype(np.float32)
  stats = _stats(SegmentationEvaluator(SEG_INFO), logits, labels)
  result = SegmentationEvaluator(SEG_INFO).summarize(stats)
  assert result["dice/lesion"] == pytest.approx(0.5)  # case 0 perfect, case 1's false positive scores 0
  assert result["num_false_positive_cases/lesion"] == 1 and result["num_both_empty/lesion"] == 0
  assert result["num_false_positive_cases/organ"] == 0 and result["num_both_empty/organ"] == 0
  organ = [2 * 8 / (8 + 12), 2 * 16 / (16 + 20)]
  assert result["dice_case_mean"] == pytest.approx(np.mean([(organ[0] + 1.0) / 2, organ[1] / 2]))
  assert result["generalized_dice"] == pytest.approx(np.mean([_gds([(8, 8, 12), (4, 4, 4)]),
                                                              _gds([(16, 20, 16), (0, 1, 0)])]))
  # MONAI's DiceMetric(ignore_empty=True): the case without a lesion is left out whatever is predicted.
  ignoring = SegmentationEvaluator(SEG_INFO, false_positive_score="nan").summarize(stats)
  assert ignoring["dice/lesion"] == pytest.approx(1.0) and ignoring["num_false_positive_cases/lesion"] == 1
  # Without the false positive, case 1's lesion is empty in both: NaN (default), or the chosen empty_score.
  clean = _stats(SegmentationEvaluator(SEG_INFO), np.eye(3)[_seg_case()[1]].astype(np.float32), labels)
  assert SegmentationEvaluator(SEG_INFO).summarize(clean)["num_both_empty/lesion"] == 1
  assert SegmentationEvaluator(SEG_INFO, empty_score=1.0).summarize(clean)["dice/lesion"] == pytest.approx(1.0)
  assert SegmentationEvaluator(SEG_INFO, empty_score=0.0).summarize(clean)["dice/lesion"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="segmentation evaluator: empty_score must be 'nan', 0.0 or 1.0"):
    SegmentationEvaluator(SEG_INFO, empty_score="one")
  with pytest.raises(ValueError, match="segmentation evaluator: empty_distance must be 'nan' or 'inf'"):
    SegmentationEvaluator(SEG_INFO, empty_distance=100.0)


def test_segmentation_nsd_empty_distance_and_report_convention():
  from medjax.evaluators import render
  labels, pred = _seg_case()
  pred[1, 0, 0] = 2  # false-positive lesion in case 1
  spacing = np.array([[1.0, 2.0]] * 2, np.float32)
  tolerances = {"organ": 2.0, "lesion": 1.0}
  evaluator = SegmentationEvaluator(SEG_INFO, surface_metrics=True, nsd_tolerance_mm=tolerances, empty_distance="inf")
  stats = _stats(evaluator, np.eye(3)[pred].astype(np.float32), labels, spacing_mm=spacing)
  values = evaluator.case_values(stats)
  for i in range(2):
    for c, tolerance in enumerate(tolerances.values()):
      expected = metrics.normalized_surface_dice(labels[i] == c + 1, pred[i] == c + 1, (1.0, 2.0), tolerance)
      assert values["nsd"][i, c] == pytest.approx(expected)
  assert values["nsd"][1, 1] == 0.0 and values["hd95"][1, 1] == np.inf  # false positive
  result = evaluator.summarize(stats)
  assert result["nsd/organ"] == pytest.approx(np.mean(values["nsd"][:, 0]))
  assert result["nsd_mean"] == pytest.approx(np.mean([result["nsd/organ"], result["nsd/lesion"]]))
  assert result["hd95/lesion"] == np.inf  # "inf" propagates into the mean; "nan" (default) would leave it out
  report = evaluator.report(stats, ["a", "b"], num_samples=10)
  convention = report["empty_mask_convention"]
  assert convention["empty_score"] == "nan" and convention["false_positive_score"] == 0.0
  assert convention["empty_distance"] == "inf" and convention["nsd_tolerance_mm"] == tolerances
  assert "false positive) -> 0" in convention["description"] and "lesion 1 mm" in convention["description"]
  assert report["metrics"]["num_false_positive_cases/lesion"] == {"value": 1.0, "low": None, "high": None}
  assert report["metrics"]["hd95/lesion"]["value"] is None  # inf is not JSON
  assert report["cases"][1]["nsd/lesion"] == 0.0 and report["cases"][1]["generalized_dice"] is not None
  assert "reference_voxels/organ" not in report["cases"][0]
  assert f"- empty masks: {convention['description']}" in render.markdown(report)
  with pytest.raises(ValueError, match=r"unknown \['tumour'\], missing \['lesion'\]"):
    SegmentationEvaluator(SEG_INFO, nsd_tolerance_mm={"organ": 1.0, "tumour": 2.0})
  with pytest.raises(ValueError, match="nsd_tolerance_mm of 'lesion' must be a finite number >= 0"):
    SegmentationEvaluator(SEG_INFO, nsd_tolerance_mm=(1.0, -2.0))


def test_segmentation_mask_makes_padding_invisible():
  labels, pred = _seg_case()
  pred[1, 0, 0] = 2
  spacing = np.array([[1.0, 2.0]] * 2, np.float32)
  evaluator = SegmentationEvaluator(SEG_INFO, surface_metrics=True)
  plain = evaluator.summarize(_stats(evaluator, np.eye(3)[pred].astype(np.float32), labels, spacing_mm=spacing))
  # Pad both cases to 9 x 10 with labels out of range and confident wrong predictions; the mask drops them.
  pad = ((0, 0), (1, 2), (0, 3))
  padded_labels = np.pad(labels, pad, constant_values=-1)
  padded_logits = np.pad(np.eye(3)[pred].astype(np.float32), pad + ((0, 0),))
  padded_logits[:, 0, :, 2] = 5.0  # lesion predicted along the padded top row
  mask = np.pad(np.ones(labels.shape, bool), pad)
  stats = _stats(evaluator, padded_logits, padded_labels, spacing_mm=spacing, mask=mask)
  assert evaluator.summarize(stats) == pytest.approx(plain, nan_ok=True)
  with pytest.raises(ValueError, match=r"batch\['mask'\] of shape \(2, 9\) does not fit"):
    _stats(evaluator, padded_logits, padded_labels, mask=mask[:, :, 0])


REGION_INFO = DatasetInfo(task="segmentation", spatial_dims=2, image_shape=(5, 6), num_channels=1, num_classes=3,
                          class_names=("whole", "core", "enhancing"), label_kind="map")


def test_multilabel_regions_use_sigmoid_threshold_per_channel():
  rng = np.random.default_rng(8)
  grade = rng.integers(0, 4, size=(3, 5, 6))
  grade[2] = np.minimum(grade[2], 2)  # case 2 has no enhancing tumour
  regions = np.stack([grade >= 1, grade >= 2, grade == 3], -1)
  logits = (rng.normal(size=regions.shape) + 3.0 * (2 * regions - 1)).astype(np.float32)
  logits[2, ..., 2] = -9.0
  predicted = logits >= np.log(0.3 / 0.7)  # sigmoid(logit) >= 0.3
  evaluator = SegmentationEvaluator(REGION_INFO, include_background=True, surface_metrics=True, threshold=0.3)
  stats = _stats(evaluator, logits, regions.astype(np.int32), spacing_mm=np.full((3, 2), 1.5, np.float32))
  result = evaluator.summarize(stats)
  for c, name in enumerate(REGION_INFO.class_names):
    dice = [skm.f1_score(regions[i, ..., c].ravel(), predicted[i, ..., c].ravel()) for i in range(3) if regions[i, ..., c].any()]
    assert result[f"dice/{name}"] == pytest.approx(np.mean(dice)), name
  assert result["num_both_empty/enhancing"] == 1
  hd95 = [metrics.hausdorff_distance(regions[i, ..., 1], predicted[i, ..., 1], (1.5, 1.5)) for i in range(3)]
  assert result["hd95/core"] == pytest.approx(np.nanmean(hd95))
  # include_background=False leaves channel 0 (here the whole tumour) out, as MONAI does.
  foreground = SegmentationEvaluator(REGION_INFO, threshold=0.3)
  assert set(foreground.summarize(_stats(foreground, logits, regions))) >= {"dice/core", "dice/enhancing"}
  assert "dice/whole" not in foreground.summarize(_stats(foreground, logits, regions))
  with pytest.raises(ValueError, match="threshold must lie in"):
    SegmentationEvaluator(REGION_INFO, threshold=1.5)


# ------------------------------------------------------------------------------------------ regression


def test_regression_metrics_and_scalar_head():
  rng = np.random.default_rng(3)
  target = rng.normal(50, 10, 30).astype(np.float32)
  pred = (target + rng.normal(0, 3, 30)).astype(np.float32)
  evaluator = RegressionEvaluator(None)
  result = evaluator.summarize(_stats(evaluator, pred[:, None], target))  # (B, 1) head for (B,) targets
  assert result["mae"] == pytest.approx(np.mean(np.abs(pred - target)), rel=1e-5)
  assert result["rmse"] == pytest.approx(np.sqrt(np.mean((pred - target) ** 2)), rel=1e-5)
  assert result["pearson_r"] == pytest.approx(scipy.stats.pearsonr(pred, target)[0], rel=1e-5)
  with pytest.raises(ValueError, match="do not fit"):
    _stats(evaluator, pred[:, None].repeat(2, 1), target)
  pred[4] = np.inf
  with pytest.raises(ValueError, match=r"NaN/inf outputs for 1 of 30 cases \(#4\)"):
    evaluator.summarize(_stats(evaluator, pred, target))


# ------------------------------------------------------------------------------------------ reports


def test_report_bootstrap_patients_subgroups_and_cases():
  logits, labels = _random_cls(24, 2, seed=4)
  evaluator = ClassificationEvaluator(_cls_info(2))
  stats = _stats(evaluator, logits, labels)
  ids = list(range(100, 124))
  metadata = {"patient_id": [i // 2 for i in range(24)],  # two images per patient
              "sex": ["F", "M", "M"] * 8, "age": list(range(24)), "site": [None] * 24}
  report = evaluator.report(stats, ids, metadata, num_samples=200, seed=1)
  assert report["bootstrap"]["unit"] == "patient" and report["bootstrap"]["num_units"] == 12
  summary = evaluator.summarize(stats)
  for name in ("accuracy", "auc", "f1"):
    entry = report["metrics"][name]
    assert entry["value"] == pytest.approx(summary[name]) and entry["low"] <= entry["value"] <= entry["high"]
  # the shared-resample cache gives the same interval as bootstrapping the metric on its own
  probs = np.asarray(stats["probs"], np.float64)
  direct = metrics.bootstrap_ci(lambda y, p: metrics.classification_metrics(y, p, task="binary")["auc"],
                                stats["label"], probs, groups=np.array(metadata["patient_id"]), num_samples=200,
                                seed=1)
  assert (report["metrics"]["auc"]["low"], report["metrics"]["auc"]["high"]) == pytest.approx(
      (direct["low"], direct["high"]))
  assert [c["id"] for c in report["cases"]] == ids and report["cases"][3]["sex"] == "F"
  assert report["cases"][5]["prob/c1"] == pytest.approx(probs[5, 1])
  females = np.array(metadata["sex"]) == "F"
  subgroup = report["subgroups"]["sex"]["groups"]["F"]
  assert subgroup["n"] == 8
  assert subgroup["accuracy"] == pytest.approx(
      evaluator.summarize({"probs": probs[females], "label": stats["label"][females]})["accuracy"])
  # documented results for unusable columns; patient ids are the resampling unit, not a subgroup
  assert report["subgroups_skipped"] == {"age": "24 distinct values; bin it first", "site": "no values"}
  assert "patient_id" not in report["subgroups"]
  assert set(report["curves"]) == {"roc", "pr", "confusion_matrix", "calibration"}
  assert np.sum(report["curves"]["confusion_matrix"]["matrix"]) == 24
  with pytest.raises(ValueError, match="metadata column 'sex' has 3 values for 24 cases"):
    evaluator.report(stats, ids, {"sex": ["F", "M", "F"]}, num_samples=10)


def test_report_without_metadata_resamples_cases_and_is_json_safe():
  labels, pred = _seg_case()
  evaluator = SegmentationEvaluator(SEG_INFO, surface_metrics=True)
  stats = _stats(evaluator, np.eye(3)[pred].astype(np.float32), labels)
  report = evaluator.report(stats, ["a", "b"], num_samples=20)
  assert report["bootstrap"]["unit"] == "case" and report["subgroups"] == {}
  assert report["cases"][1]["dice/lesion"] is None  # NaN (no lesion) becomes null
  assert report["metrics"]["num_cases"] == {"value": 2.0, "low": None, "high": None}
  import json
  json.dumps(report, allow_nan=False)


def test_collect_drops_padding_and_evaluate_summarizes():
  evaluator = ClassificationEvaluator(_cls_info(2))
  logits, labels = _random_cls(5, 2, seed=5)
  batches = [{"image": logits[:4], "label": labels[:4], "weight": np.ones(4, np.float32)},
             {"image": np.concatenate([logits[4:], logits[:3]]), "label": np.concatenate([labels[4:], labels[:3]]),
              "weight": np.array([1, 0, 0, 0], np.float32)}]
  eval_fn = lambda b: evaluator.stats_fn(jnp.asarray(b["image"]), {}, {"label": jnp.asarray(b["label"])})
  stats = collect(eval_fn, batches)
  assert stats["probs"].shape == (5, 2)
  assert evaluate(evaluator, eval_fn, batches)["num_cases"] == 5


def test_multilabel_and_regression_reports_plot(tmp_path):
  from medjax.evaluators import plots, render
  rng = np.random.default_rng(6)
  labels = (rng.random((20, 3)) < 0.5).astype(np.int32)
  evaluator = ClassificationEvaluator(_cls_info(3), threshold=0.4)
  stats = _stats(evaluator, (rng.normal(size=(20, 3)) + 2.0 * labels - 1.0).astype(np.float32), labels)
  report = evaluator.report(stats, list(range(20)), num_samples=10)
  assert report["classification_task"] == "multi-label" and report["threshold"] == 0.4
  matrix = np.array(report["curves"]["confusion_matrix"]["matrix"])
  assert matrix.shape == (3, 4) and np.all(matrix.sum(1) == 20)  # TN FP FN TP per label
  assert matrix[0, 3] == np.sum((stats["probs"][:, 0] >= 0.4) & (labels[:, 0] == 1))
  assert report["cases"][0]["label"] == labels[0].tolist()
  curves = report["curves"]
  written = [plots.roc_pr(curves, str(tmp_path / "roc.png")),
             plots.confusion(matrix, ["c0", "c1", "c2"], ["TN", "FP", "FN", "TP"], str(tmp_path / "cm.png")),
             plots.calibration(curves["calibration"], str(tmp_path / "cal.png"))]
  target = rng.normal(size=12).astype(np.float32)
  regression = RegressionEvaluator(None)
  reg_report = regression.report(_stats(regression, target + 0.1, target), list(range(12)), num_samples=10)
  assert reg_report["metrics"]["mae"]["value"] == pytest.approx(0.1, rel=1e-5)
  assert reg_report["cases"][3]["error"] == pytest.approx(0.1, rel=1e-4)
  scatter = reg_report["curves"]["scatter"]
  written.append(plots.scatter(scatter["prediction"], scatter["target"], str(tmp_path / "scatter.png")))
  for path in written:
    with open(path, "rb") as f:
      assert f.read(4) == b"\x89PNG"
  assert "| mae |" in render.markdown(reg_report) and "id,prediction,target,error" in render.cases_csv(reg_report)
