"""The exported predictor (medjax.compress.export) and its standalone loader: a 2D classifier and a 3D sliding-window
U-Net reloaded in a fresh process where medjax cannot be imported give the in-memory model's outputs bit for bit;
normalisation inside agrees with the datasets'; fixed batches, bfloat16 weights and damaged folders."""

import json
import os
import site
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import inference, models
from medjax.compress import export, predictor_loader
from medjax.data.datasets import medmnist as mm, volumes
from tests.data.test_medmnist import write_fake

WINDOW = dict(roi_size=(8, 8, 8), overlap=0.5, mode="gaussian", window_batch=2)
ZSCORE = [{"scheme": "zscore"}]


def _classifier():
  model = models.build_model("vgg11", dict(spatial_dims=2, num_classes=3, width=4, stage_sizes=(1, 1), pool_size=2,
                                           head_features=(8,), dropout=0.0, batch_norm=True))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 12, 1)), train=False)
  # Batch statistics away from their (0, 1) init, so a mix-up of collections would show.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.3 if "batch_stats" in jax.tree_util.keystr(path) else v, variables)
  return model, variables


def _unet():
  model = models.build_model("unet", dict(spatial_dims=3, num_classes=3, features=(4, 8), blocks_per_stage=1,
                                          norm="batch"))
  return model, model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 8, 1)), train=False)


def _volumes(n, seed=2):
  """(n, 12, 16, 20, 1) volumes in raw units, zero around a box (a z-score over nonzero voxels sees the box)."""
  x = np.zeros((n, 12, 16, 20, 1), np.float32)
  x[:, 2:10, 3:14, 4:18] = 100 + 30 * np.random.default_rng(seed).standard_normal((n, 8, 11, 14, 1))
  return x


def _in_memory_classifier(model, variables, images):
  return np.asarray(jax.jit(lambda p, x: p(x))(inference.make_predict_fn(model.apply, variables), images))


def _in_memory_volumes(model, variables, images):
  """The medjax path one volume at a time: normalise, then `sliding_window_inference` with softmax windows."""
  predict = inference.make_predict_fn(model.apply, variables)
  normalized = jax.jit(lambda x: export.normalize(x, ZSCORE))(images)
  return np.concatenate([np.asarray(inference.sliding_window_inference(predict, normalized[i:i + 1], **WINDOW))
                         for i in range(len(images))])


def run_without_medjax(code: str, cwd) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter that cannot import medjax: `-I -S` skips site (and so the editable
  install's .pth finder) and the working directory; the site-packages folders go on sys.path as plain folders."""
  prelude = f"import sys\nsys.path.extend({site.getsitepackages()!r})\n"
  return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)], cwd=str(cwd),
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Both artefacts, the inputs, and the outputs a fresh process without medjax computed from them."""
  root = tmp_path_factory.mktemp("export")
  model, variables = _classifier()
  cls_meta = export.export_predictor(str(root / "cls"), model.apply, variables, input_shape=(16, 12, 1),
                                     task="classification", class_names=("a", "b", "c"))
  unet, unet_variables = _unet()
  seg_meta = export.export_predictor(str(root / "seg"), unet.apply, unet_variables, input_shape=(12, 16, 20, 1),
                                     normalization=ZSCORE, window=WINDOW, task="segmentation")
  rng = np.random.default_rng(0)
  inputs = {"cls3": rng.standard_normal((3, 16, 12, 1)).astype(np.float32),
            "cls5": rng.standard_normal((5, 16, 12, 1)).astype(np.float32), "seg1": _volumes(1), "seg2": _volumes(2)}
  np.savez(root / "inputs.npz", **inputs)
  child = run_without_medjax(f"""
      import importlib.util
      assert importlib.util.find_spec("medjax") is None, "medjax is importable"
      import numpy as np
      sys.path.insert(0, {str(root / "cls")!r})
      import load_predictor
      inputs = np.load("inputs.npz")
      cls, seg = load_predictor.load("cls"), load_predictor.load("seg")
      outputs = {{k: (cls if k.startswith("cls") else seg).predict(inputs[k]) for k in inputs.files}}
      np.savez("outputs.npz", **outputs)
      assert not any(m == "medjax" or m.startswith("medjax.") for m in sys.modules)
      print(sorted(m for m in ("jax", "numpy", "flax", "optax", "orbax", "tensorflow") if m in sys.modules))
      """, root)
  assert child.returncode == 0, child.stderr[-3000:]
  assert child.stdout.split("\n")[-2] == "['jax', 'numpy']"  # no Flax, Orbax or TensorFlow behind the loader
  outputs = dict(np.load(root / "outputs.npz"))
  return dict(root=root, model=model, variables=variables, unet=unet, unet_variables=unet_variables,
              cls_meta=cls_meta, seg_meta=seg_meta, inputs=inputs, outputs=outputs)


def test_classifier_reloaded_without_medjax_equals_the_model_at_two_batch_sizes(exported):
  for key in ("cls3", "cls5"):
    got, images = exported["outputs"][key], exported["inputs"][key]
    expected = _in_memory_classifier(exported["model"], exported["variables"], images)
    assert got.dtype == np.float32 and got.shape == (len(images), 3)
    np.testing.assert_array_equal(got, expected)
  meta = exported["cls_meta"]
  assert meta["input"]["shape"] == ["b", 16, 12, 1] and meta["output"]["shape"] == ["b", 3]
  assert meta["input"]["spatial_order"] == ["y", "x"] and meta["output"]["activation"] == "softmax"
  assert meta["classes"] == ["a", "b", "c"] and meta["platforms"] == ["cpu"] and meta["jax_version"] == jax.__version__
  on_disk = json.loads((exported["root"] / "cls" / "metadata.json").read_text())
  assert list(on_disk) == list(export.METADATA_KEYS) and on_disk == {k: meta[k] for k in export.METADATA_KEYS}
  for name, size in meta["files"].items():
    assert os.path.getsize(exported["root"] / "cls" / name) == size > 0
  with open(predictor_loader.__file__) as f:  # the loader travels as it is
    assert (exported["root"] / "cls" / "load_predictor.py").read_text() == f.read()


def test_sliding_window_volumes_reloaded_without_medjax_equal_the_model(exported):
  for key in ("seg1", "seg2"):
    got, images = exported["outputs"][key], exported["inputs"][key]
    expected = _in_memory_volumes(exported["unet"], exported["unet_variables"], images)
    assert got.shape == images.shape[:-1] + (3,)
    np.testing.assert_array_equal(got, expected)
  meta = exported["seg_meta"]
  assert meta["input"]["shape"] == ["b", 12, 16, 20, 1] and meta["output"]["shape"] == ["b", 12, 16, 20, 3]
  assert meta["output"]["axes"] == ["batch", "z", "y", "x", "class"]
  assert meta["sliding_window"] == {"roi_size": [8, 8, 8], "overlap": 0.5, "mode": "gaussian", "window_batch": 2}
  assert meta["normalization"]["inside"] == ZSCORE


def test_the_medjax_host_pipeline_agrees_within_float32_rounding(exported):
  """The datasets z-score in float64 with numpy, the export in float32 on the device."""
  images = exported["inputs"]["seg2"]
  host = np.stack([volumes.normalize(v, ("zscore",), None) for v in images])
  predict = inference.make_predict_fn(exported["unet"].apply, exported["unet_variables"])
  expected = np.concatenate([np.asarray(inference.sliding_window_inference(predict, host[i:i + 1], **WINDOW))
                             for i in range(2)])
  np.testing.assert_allclose(exported["outputs"]["seg2"], expected, rtol=0, atol=1e-5)


def test_normalize_matches_the_volume_datasets_schemes():
  rng = np.random.default_rng(3)
  image = np.zeros((6, 7, 5, 3), np.float32)
  image[1:5, 2:6, 1:4] = rng.normal(200.0, 400.0, (4, 4, 3, 3)).astype(np.float32)
  stats = [{"p005": -100.0, "p995": 600.0, "mean": 150.0, "std": 250.0}] * 3
  schemes = ("zscore", "ct", "abdomen")
  spec = inference.PreprocessSpec(normalization=schemes, intensity_stats=tuple(stats))
  inside = export.preprocessing_from_data_config(dict(name="msd", normalization=schemes, intensity_stats=stats),
                                                 3).inside
  assert [s["scheme"] for s in inside] == ["zscore", "ct", "window"]
  got = np.asarray(export.normalize(image[None], inside))[0]
  np.testing.assert_allclose(got, volumes.normalize(image, spec.schemes(3), stats), rtol=1e-5, atol=1e-5)
  assert np.all(got[..., 0][image[..., 0] == 0] == 0)  # z-score: zero outside the nonzero voxels
  untouched = export.normalize(image[None], [{"scheme": "none"}] * 3)
  np.testing.assert_array_equal(np.asarray(untouched)[0], image)
  with pytest.raises(ValueError, match="normalization has 1 scheme"):
    export.normalize(image[None], ZSCORE)
  with pytest.raises(ValueError, match="channel 0: scheme 'minmax'"):
    export.normalize(image[None], [{"scheme": "minmax"}] * 3)


def test_medmnist_scaling_inside_is_the_datasets_own(tmp_path):
  fake = write_fake(tmp_path, "pneumoniamnist", sizes=(4, 1, 1))
  dataset = mm.medmnist(subset="pneumoniamnist", data_dir=str(tmp_path), verify_md5=False)
  prep = export.preprocessing_from_data_config(dict(name="medmnist", subset="pneumoniamnist"), 1)
  raw = fake["train_images"][..., None].astype(np.float32)  # the 0..255 pixels a hospital has
  got = np.asarray(jax.jit(lambda x: export.normalize(x, prep.inside))(raw))
  # The same float32 formula; XLA may fuse its multiply and add into one FMA (one rounding instead of two).
  expected = np.stack([dataset.source("train")[i]["image"] for i in range(4)])
  np.testing.assert_allclose(got, expected, rtol=0, atol=np.finfo(np.float32).eps)
  assert "0..255" in prep.before[0] and prep.spacing_mm is None


def test_preprocessing_from_data_config_says_what_stays_with_the_caller():
  msd = export.preprocessing_from_data_config(
      dict(name="msd", normalization="zscore", target_spacing_mm=(3.0, 1.5, 1.5), crop_nonzero=True), 2)
  assert msd.inside == ZSCORE * 2 and msd.spacing_mm == (3.0, 1.5, 1.5)
  assert any("RAS+" in s for s in msd.before) and any("[3.0, 1.5, 1.5]" in s for s in msd.before)
  assert any("bounding box" in s for s in msd.before)
  with pytest.raises(ValueError, match="config.data.normalization is unset"):
    export.preprocessing_from_data_config(dict(name="msd"), 1)
  sites = export.preprocessing_from_data_config(
      dict(name="sites", base=dict(name="medmnist", subset="pathmnist", channels=3), harmonise="histogram"), 3)
  assert sites.inside[0]["scheme"] == "affine" and "'histogram'" in sites.before[-1]
  synthetic = export.preprocessing_from_data_config(dict(name="synthetic_phantoms"), 1)
  assert synthetic.inside == [{"scheme": "none"}] and "synthetic_phantoms generator" in synthetic.before[0]


def test_fixed_batch_bfloat16_weights_and_flips(tmp_path):
  model, variables = _classifier()
  half = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), variables)
  flips = ((), (1,))
  meta = export.export_predictor(str(tmp_path / "m"), model.apply, half, input_shape=(16, 12, 1), batch=2,
                                 flips=flips, output="logits")
  assert meta["input"]["shape"] == [2, 16, 12, 1] and set(meta["weights"]["dtypes"]) == {"bfloat16"}
  assert meta["output"]["kind"] == "logits" and meta["flips"] == [[], [1]]
  predictor = predictor_loader.load(tmp_path / "m")
  assert predictor.input_shape == (2, 16, 12, 1)
  images = np.random.default_rng(4).standard_normal((2, 16, 12, 1)).astype(np.float32)
  expected = jax.jit(lambda p, x: p(x))(inference.make_predict_fn(inference.flip_tta_apply(model.apply, flips),
                                                                  half, output="logits"), images)
  np.testing.assert_array_equal(predictor.predict(images), np.asarray(expected))
  with pytest.raises(ValueError, match=r"images of shape \(3, 16, 12, 1\); this predictor takes \(2, 16, 12, 1\)"):
    predictor.predict(np.zeros((3, 16, 12, 1)))


def test_refusals_name_the_folder_file_or_option(tmp_path):
  model, variables = _classifier()
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("")
  with pytest.raises(FileExistsError, match=f"{tmp_path}/busy exists and is not empty"):
    export.export_predictor(str(tmp_path / "busy"), model.apply, variables, input_shape=(16, 12, 1))
  with pytest.raises(ValueError, match="output must be one of"):
    export.predict_function(model.apply, variables, output="probs")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['overlapp'\]"):
    export.predict_function(model.apply, variables, window=dict(roi_size=(8, 8), overlapp=0.5))
  folder = tmp_path / "m"
  export.export_predictor(str(folder), model.apply, variables, input_shape=(16, 12, 1))
  predictor = predictor_loader.load(folder)
  with pytest.raises(ValueError, match=r"this predictor takes \(b, 16, 12, 1\) float32, channels last"):
    predictor.predict(np.zeros((16, 12, 1)))
  export.export_predictor(str(folder), model.apply, variables, input_shape=(16, 12, 1), overwrite=True)
  with open(folder / "weights.npz", "ab") as f:
    f.write(b"\0")
  with pytest.raises(ValueError, match="weights.npz has .* bytes, .*metadata.json says"):
    predictor_loader.load(folder)
  os.remove(folder / "metadata.json")
  with pytest.raises(FileNotFoundError, match="is no medjax export folder"):
    predictor_loader.load(folder)
