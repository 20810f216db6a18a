"""The explain tool (and evaluate --explain) on tiny trained runs: files, maps equal to the library's, sanity
results, 3D figures and NIfTI, segmentation class regions, and one-line errors."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medjax import build, checkpoint, interpret
from medjax.interpret import figures
from medjax.tools import cli, evaluate, explain
from tests.train_testing import train_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _train(path, spec, **kwargs):
  train_experiment(path, spec, **kwargs)
  return str(path)


def _tiny_vgg(dims):
  return ("vgg11", dict(spatial_dims=dims, num_classes=3, width=4, stage_sizes=(1, 1), pool_size=2,
                        head_features=(8,), dropout=0.0))


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("cls"), "synthetic_resnet.py:quick=true", model=_tiny_vgg(2), num_test=6)


def _png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_explain_writes_maps_equal_to_the_library(cls_run, tmp_path):
  out = str(tmp_path / "gc")
  result = explain.run(cls_run, split="test", method="gradcam", num_cases=4, out=out, html=True, sanity=True,
                       random_labels_workdir=cls_run)
  assert len(result["cases"]) == 4 and all(_png(os.path.join(out, f)) for f in result["figures"])
  assert {"explain.json", "explain.md", "explain.html", "maps.npz", "overview.png"} <= set(os.listdir(out))
  saved = np.load(os.path.join(out, "maps.npz"))
  assert saved["maps"].shape == (4, 16, 16)
  loaded = checkpoint.load(cls_run)
  source = build.dataset(loaded.config).source("test")
  images = jnp.stack([jnp.asarray(source[c["index"]]["image"]) for c in result["cases"]])
  expected = interpret.grad_cam(loaded.model, loaded.variables, images, jnp.asarray(saved["classes"]))
  np.testing.assert_allclose(saved["maps"], np.asarray(expected), rtol=1e-5, atol=1e-6)
  for case in result["cases"]:  # the predicted class is explained, its probability reported
    assert case["class"] == case["predicted"] and 0 < case["probability"] <= 1
  sanity = result["sanity"]
  assert sanity["cascade"]["stages"][0] == "original" and sanity["cascade"]["spearman"][0] == pytest.approx(1.0)
  assert len(sanity["cascade"]["stages"]) == len(loaded.variables["params"]) + 1
  assert sanity["random_labels"]["spearman"] == pytest.approx(1.0)  # the same run: identical maps
  for mode in ("deletion", "insertion"):
    assert sanity[mode]["method_auc"]["n"] == 4 and 0 <= sanity[mode]["cases_better_than_random"] <= 4
  text = open(os.path.join(out, "explain.md")).read()
  assert "## Sanity checks" in text and "![overview.png](overview.png)" in text
  assert json.load(open(os.path.join(out, "explain.json")))["method"] == "gradcam"


def test_cases_cover_every_class_and_targets_follow_the_flag(cls_run, tmp_path):
  result = explain.run(cls_run, split="test", method="saliency", num_cases=3, out=str(tmp_path / "s"), target="label")
  labels = [c["label"] for c in result["cases"]]
  assert [c["class"] for c in result["cases"]] == labels
  source = build.dataset(checkpoint.load_config(cls_run)).source("test")
  assert len(set(labels)) == min(3, len({int(source[i]["label"]) for i in range(len(source))}))
  fixed = explain.run(cls_run, split="test", method="occlusion", num_cases=2, out=str(tmp_path / "o"), target="2",
                      options={"window": 4, "stride": 4})
  assert [c["class"] for c in fixed["cases"]] == [2, 2] and fixed["options"] == "stride=4, window=4"


def test_evaluate_explain_adds_the_figures_to_the_report(cls_run, tmp_path):
  out = str(tmp_path / "eval")
  report = evaluate.run(cls_run, split="test", out=out, num_samples=0, explain="gradcam++", explain_cases=2)
  assert report["explain"]["method"] == "gradcam++" and len(report["explain"]["cases"]) == 2
  assert os.path.join("explain", "overview.png") in report["plots"]
  assert _png(os.path.join(out, "explain", "overview.png"))
  assert "explanations: gradcam++" in open(os.path.join(out, "report.md")).read()


def test_segmentation_region_and_3d_nifti(tmp_path):
  run = _train(tmp_path / "seg", "synthetic_unet.py:dims=3,size=16,quick=true,validation=patches", num_train=4,
               num_val=2)
  out = str(tmp_path / "x")
  result = explain.run(run, split="val", method="gradcam", num_cases=1, out=out, nifti=True)
  case = result["cases"][0]
  assert case["explained"].startswith("class 1, ") and len(case["peak"]) == 3
  image = nib.load(os.path.join(out, case["nifti_image"]))
  attribution = nib.load(os.path.join(out, case["nifti_map"]))
  assert attribution.shape == image.shape[:3] == tuple(np.load(os.path.join(out, "maps.npz"))["maps"].shape[1:])
  np.testing.assert_allclose(attribution.affine, image.affine)


def test_case_figure_3d_planes_cross_at_the_peak(tmp_path):
  attribution = np.zeros((6, 7, 8), np.float32)
  attribution[2, 3, 5] = 1.0
  assert figures.peak(attribution) == (2, 3, 5)
  planes = figures.orthogonal_slices(np.arange(6 * 7 * 8).reshape(6, 7, 8), (2, 3, 5))
  assert [p.shape for p in planes] == [(7, 8), (6, 8), (6, 7)]
  assert _png(figures.case_figure(np.ones((6, 7, 8, 1)), attribution, str(tmp_path / "c.png")))
  with pytest.raises(ValueError, match="must match the image's spatial shape"):
    figures.case_figure(np.ones((6, 7, 8, 1)), attribution[:5], str(tmp_path / "d.png"))
  assert figures.map_scale(np.array([-2.0, 1.0])) == (True, 2.0) and figures.map_scale(np.zeros(3)) == (False, 1.0)


def test_user_mistakes_are_one_line(cls_run):
  with pytest.raises(cli.UsageError, match="--option 'steps': expected key=value"):
    explain.parse_options(["steps"])
  assert explain.parse_options(["steps=8", "layer=stage3", "window=(2, 3)"]) == {
      "steps": 8, "layer": "stage3", "window": (2, 3)}
  result = subprocess.run([sys.executable, "-m", "medjax.tools.explain", "--workdir", cls_run, "--method", "gradcma"],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("medjax.tools.explain: error: unknown attribution method")
