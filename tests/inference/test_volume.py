"""Whole-case prediction (medjax.inference.Predictor) on NIfTI / NRRD / MetaImage cases, and the predict CLI
(medjax.tools.predict)."""

import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from medjax import checkpoint, inference, models
from medjax.data import io
from medjax.inference import volume as inference_volume
from medjax.tools import cli
from medjax.tools import predict as predict_tool

nib = pytest.importorskip("nibabel")

SHAPE = (7, 16, 12)  # (z, y, x)
SPACING = (2.5, 0.8, 1.1)  # (z, y, x) mm, anisotropic


def _oblique_affine():
  """Rotated 30 degrees about world z, axes permuted and flipped, anisotropic, shifted: nothing is RAS."""
  angle = np.deg2rad(30.0)
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
  permute_flip = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])  # i -> -S, j -> -R, k -> A
  affine = np.eye(4)
  affine[:3, :3] = rotation @ permute_flip @ np.diag(SPACING[::-1])  # columns scaled by (x, y, z) spacing
  affine[:3, 3] = (-31.7, 12.25, 5.5)
  return affine


def _case(tmp_path, name="case.nii.gz", extra_blob=False, channels=None, xform_codes=None):
  """A positive ellipsoid (plus, optionally, a small separate blob) on a zero background, written in the format
  `name`'s suffix names; `channels` stacks copies into (z, y, x, C)."""
  z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
  image = np.where(((z - 3) / 2.2) ** 2 + ((y - 7) / 5.0) ** 2 + ((x - 5) / 3.5) ** 2 < 1, 2.0, 0.0)
  image = (image * (1 + 0.1 * np.sin(x + y))).astype(np.float32)  # inside: positive, not constant
  if extra_blob:
    image[5:7, 13:15, 9:11] = 1.0
  path = os.path.join(tmp_path, name)
  array = image if channels is None else np.stack([image] * channels, axis=-1)
  io.write_image(path, io.Volume.from_array(array, affine=_oblique_affine(), xform_codes=xform_codes))
  return path, image


def _threshold_model():
  """Pointwise 'network': logits (0, 8 x), so the argmax is x > 0 (exact where nothing is resampled)."""
  return inference.make_predict_fn(lambda w, x, train: x @ w, jnp.asarray([[0.0, 8.0]]))


def test_prediction_keeps_the_oblique_affine_and_shape_and_undoes_crop_and_reorientation(tmp_path):
  path, image = _case(tmp_path)
  out_path = os.path.join(tmp_path, "pred.nii.gz")
  inference.predict_volume_to_nifti(_threshold_model(), path, out_path, roi_size=(4, 6, 5),
                                    preprocessing=dict(crop_nonzero=True, normalization="none"))
  written, original = io.read_nifti(out_path), io.read_nifti(path)
  np.testing.assert_array_equal(written.affine, original.affine)
  assert written.array.shape == original.array.shape == SHAPE and written.array.dtype == np.uint8
  np.testing.assert_array_equal(written.array, (image > 0).astype(np.uint8))


@pytest.mark.parametrize("label_resample", ["linear", "nearest"])
def test_resampled_prediction_comes_back_on_the_input_grid(tmp_path, label_resample):
  path, image = _case(tmp_path)
  out_path = os.path.join(tmp_path, "pred.nii.gz")
  label = inference.predict_volume_to_nifti(
      _threshold_model(), path, out_path, roi_size=(8, 8, 8), label_resample=label_resample, tta=True,
      preprocessing=dict(target_spacing_mm=(1.2, 1.2, 1.2), crop_nonzero=True, normalization="zscore"))
  written = io.read_nifti(out_path)
  np.testing.assert_array_equal(written.affine, io.read_nifti(path).affine)
  assert written.array.shape == SHAPE
  np.testing.assert_array_equal(written.array, label.array)
  assert np.mean(written.array == (image > 0)) > 0.9  # resampling moves the boundary a little, no more


def test_lcc_removes_the_smaller_blob(tmp_path):
  path, image = _case(tmp_path, extra_blob=True)
  kwargs = dict(roi_size=(8, 8, 8), preprocessing=dict(normalization="none"))
  plain = inference.Predictor(_threshold_model(), **kwargs).predict_file(path, os.path.join(tmp_path, "a.nii"))
  kept = inference.Predictor(_threshold_model(), lcc=True, **kwargs).predict_file(path,
                                                                                  os.path.join(tmp_path, "b.nii"))
  np.testing.assert_array_equal(plain.array, image > 0)
  assert plain.array[5:7, 13:15, 9:11].all() and not kept.array[5:7, 13:15, 9:11].any()
  np.testing.assert_array_equal(kept.array[:, :12, :9], plain.array[:, :12, :9])


def test_preprocess_spec_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"unknown keys \['spacing'\]"):
    inference.PreprocessSpec.from_dict({"spacing": (1, 1, 1)})
  with pytest.raises(ValueError, match="needs intensity_stats"):
    inference.PreprocessSpec(normalization="ct")
  with pytest.raises(ValueError, match="normalization is unset"):
    inference.PreprocessSpec.from_data_config({"name": "msd", "data_dir": "x"})
  spec = inference.PreprocessSpec.from_data_config(
      {"name": "image_folder", "target_spacing_mm": (2, 1, 1), "crop_nonzero": True, "patch_size": (8, 8, 8)},
      normalization="ct", intensity_stats=[{"p005": -100, "p995": 300, "mean": 40, "std": 80}])
  assert spec.target_spacing_mm == (2.0, 1.0, 1.0) and spec.crop_nonzero and spec.normalization == "ct"
  with pytest.raises(FileNotFoundError):
    inference.nifti_inputs(os.path.join(tmp_path, "missing"))


def test_predict_cli_restores_a_run_and_writes_every_case(tmp_path):
  workdir, cases, out_dir = (os.path.join(tmp_path, d) for d in ("run", "cases", "out"))
  os.makedirs(cases)
  _case(cases, "a.nii.gz")
  _case(cases, "b.nii.gz", extra_blob=True)
  config = mlc.ConfigDict(dict(model_name="unet", model=dict(spatial_dims=3, num_classes=2, features=(2, 4)),
                               input=dict(patch_size=(4, 8, 8)), data=dict(name="image_folder", crop_nonzero=False)))
  model = models.build_model("unet", dict(config.model))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 8, 1)), train=False)["params"]
  checkpoint.save_config(workdir, config)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=1,
                               async_save=False) as ckpt:
    ckpt.save(3, {"params": params}, force=True)
  written = predict_tool.run_prediction(workdir, cases, out_dir, overlap=0.25, window_batch=2, lcc=True)
  assert sorted(written) == ["a", "b"]
  for name in ("a", "b"):
    out, source = io.read_nifti(written[name]), io.read_nifti(os.path.join(cases, f"{name}.nii.gz"))
    np.testing.assert_array_equal(out.affine, source.affine)
    assert out.array.shape == SHAPE and out.array.dtype == np.uint8 and out.array.max() <= 1
  no_roi = config.copy_and_resolve_references()
  del no_roi.input
  checkpoint.save_config(workdir, no_roi)
  with pytest.raises(ValueError, match="pass --roi"):
    predict_tool.run_prediction(workdir, cases, out_dir)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_input_gives_the_nifti_prediction_on_its_grid(tmp_path, suffix):
  kwargs = dict(roi_size=(4, 6, 5), preprocessing=dict(crop_nonzero=True, normalization="none"))
  path, image = _case(tmp_path, f"case{suffix}")
  label = inference.Predictor(_threshold_model(), **kwargs).predict_file(path, os.path.join(tmp_path, f"p{suffix}"))
  written, source = io.read_image(os.path.join(tmp_path, f"p{suffix}")), io.read_image(path)
  np.testing.assert_allclose(written.affine, source.affine, atol=1e-12)
  np.testing.assert_array_equal(written.array, (image > 0).astype(np.uint8))
  np.testing.assert_array_equal(label.array, written.array)
  nifti_path, _ = _case(tmp_path, "case.nii.gz")
  from_nifti = inference.Predictor(_threshold_model(), **kwargs).predict_file(nifti_path,
                                                                              os.path.join(tmp_path, "p.nii.gz"))
  np.testing.assert_array_equal(from_nifti.array, written.array)


def test_prediction_keeps_the_input_sform_and_qform_codes(tmp_path):
  path, _ = _case(tmp_path, "aligned.nii.gz", xform_codes=(2, 2))
  assert io.read_nifti(path).xform_codes == (2, 2)
  out = os.path.join(tmp_path, "pred.nii.gz")
  inference.predict_volume_to_nifti(_threshold_model(), path, out, roi_size=(8, 8, 8),
                                    preprocessing=dict(target_spacing_mm=(1.2, 1.2, 1.2), normalization="none"))
  header = nib.load(out).header
  assert (int(header["sform_code"]), int(header["qform_code"])) == (2, 2)
  assert io.read_nifti(out).xform_codes == (2, 2)


def test_a_4d_image_for_a_single_channel_model_names_the_file_and_shape(tmp_path):
  path, _ = _case(tmp_path, "four.nrrd", channels=3)
  predictor = inference.Predictor(_threshold_model(), roi_size=(8, 8, 8), num_channels=1)
  with pytest.raises(ValueError, match=r"four\.nrrd: image of shape \(7, 16, 12, 3\) \(z, y, x\[, C\]\) has 3 "
                                       r"channel\(s\), the model takes 1 \(a 4D image where a 3D one is expected\)"):
    predictor.predict_file(path, os.path.join(tmp_path, "out.nrrd"))
  assert not os.path.exists(os.path.join(tmp_path, "out.nrrd"))


def test_image_inputs_and_output_names(tmp_path):
  _case(tmp_path, "a.nii.gz")
  _case(tmp_path, "b.mha")
  _case(tmp_path, "c.nii")
  cases = inference.nifti_inputs(tmp_path)  # the old name, now every format
  assert sorted(cases) == ["a", "b", "c"] and cases["b"].endswith("b.mha")
  assert inference_volume.image_inputs(cases["b"]) == {"b": cases["b"]}
  assert [inference_volume.output_name(n, p) for n, p in sorted(cases.items())] == ["a.nii.gz", "b.mha", "c.nii.gz"]
  assert inference_volume.output_name("b", cases["b"], ".nrrd") == "b.nrrd"
  with pytest.raises(ValueError, match=r"output suffix '\.png' must be one of \.nii\.gz, \.nii, \.nrrd"):
    inference_volume.output_name("b", cases["b"], ".png")
  _case(tmp_path, "a.nrrd")
  with pytest.raises(ValueError, match=r"predict input: .* holds two image files for case 'a': a\.nii\.gz and "
                                       r"a\.nrrd"):
    inference.nifti_inputs(tmp_path)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"predict input .*empty holds no image files \(\.nii\.gz, \.nii, \.nrrd"):
    inference_volume.image_inputs(tmp_path / "empty")


def _saved_unet_run(workdir, num_channels=None, data=None, patch_size=(4, 8, 8)):
  """An untrained 3D U-Net saved as a run (config.json + a checkpoint of step 3); `patch_size` None: none in the
  config."""
  data = dict(name="image_folder", crop_nonzero=False) if data is None else data
  if num_channels is not None:
    data["num_channels"] = num_channels
  config = mlc.ConfigDict(dict(model_name="unet", model=dict(spatial_dims=3, num_classes=2, features=(2, 4)),
                               input=dict(patch_size=patch_size) if patch_size else {}, data=data))
  model = models.build_model("unet", dict(config.model))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 8, num_channels or 1)), train=False)["params"]
  checkpoint.save_config(workdir, config)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=1,
                               async_save=False) as ckpt:
    ckpt.save(3, {"params": params}, force=True)


def test_predict_cli_refuses_a_4d_image_naming_it_and_writes_the_input_format(tmp_path):
  workdir, cases, out_dir = (os.path.join(tmp_path, d) for d in ("run", "cases", "out"))
  os.makedirs(cases)
  _saved_unet_run(workdir)  # config.data names no num_channels: the weights say 1
  _case(cases, "a.nrrd")
  _case(cases, "b.nii.gz", channels=2)
  with pytest.raises(ValueError, match=r"b\.nii\.gz: image of shape \(7, 16, 12, 2\) \(z, y, x\[, C\]\) has 2 "
                                       r"channel\(s\), the model takes 1 \(a 4D image where a 3D one is expected\)"):
    predict_tool.run_prediction(workdir, cases, out_dir, overlap=0.25, window_batch=2)
  # Case a came first and was written, in its own format, on its grid.
  out, source = io.read_image(os.path.join(out_dir, "a.nrrd")), io.read_image(os.path.join(cases, "a.nrrd"))
  np.testing.assert_allclose(out.affine, source.affine, atol=1e-12)
  assert out.array.shape == SHAPE and out.array.dtype == np.uint8
  # A two-channel run refuses the 3D image (before any network call).
  two = os.path.join(tmp_path, "run2")
  _saved_unet_run(two, num_channels=2)
  with pytest.raises(ValueError, match=r"a\.nrrd: image of shape \(7, 16, 12\) .* has 1 channel\(s\), the model "
                                       r"takes 2\."):
    predict_tool.run_prediction(two, cases, out_dir)


def test_input_channels_reads_the_weights(tmp_path):
  model = models.build_model("unet", dict(spatial_dims=3, num_classes=2, features=(2, 4)))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 8, 3)), train=False)
  predict_fn = inference.make_predict_fn(model.apply, variables)
  assert predict_tool.input_channels(predict_fn, (4, 8, 8)) == 3
  assert predict_tool.input_channels(predict_fn, (4, 8, 8), hint=3) == 3
  assert predict_tool.input_channels(predict_fn, (4, 8, 8), most=2) is None


# The whole-image phantoms of the README demo: the run has no patch, its window is the training image size.
PHANTOMS = dict(name="synthetic_phantoms", spatial_dims=3, image_size=(8, 12, 8), num_classes=2, num_train=2)


def test_predict_without_roi_on_a_run_without_patch_size_uses_the_training_image_size(tmp_path, capsys):
  workdir, cases, out_dir = (os.path.join(tmp_path, d) for d in ("run", "cases", "out"))
  os.makedirs(cases)
  _saved_unet_run(workdir, data=dict(PHANTOMS), patch_size=None)
  _case(cases, "a.nii.gz")
  written = predict_tool.run_prediction(workdir, cases, out_dir, window_batch=2)
  assert "window (8, 12, 8) (z, y, x) from the training image size (dataset image_shape)" in capsys.readouterr().out
  out = io.read_image(written["a"])
  assert out.array.shape == SHAPE and out.array.dtype == np.uint8


def test_window_size_prefers_the_inference_roi_then_the_patch_then_the_image_size():
  config = mlc.ConfigDict(dict(inference=dict(roi_size=(4, 4, 4)), input=dict(patch_size=(8, 8, 8)),
                               data=dict(PHANTOMS, patch_size=(16, 16, 16))))
  assert predict_tool.window_size(config) == ((4, 4, 4), "config.inference.roi_size")
  del config.inference
  assert predict_tool.window_size(config) == ((8, 8, 8), "config.input.patch_size")
  del config.input
  assert predict_tool.window_size(config) == ((16, 16, 16), "config.data.patch_size")
  del config.data.patch_size
  assert predict_tool.window_size(config) == ((8, 12, 8), "the training image size (dataset image_shape)")


def _predict_error(capsys, *argv) -> str:
  """The one line `python -m medjax.tools.predict ARGV` writes for a mistake (run in this process), after exit 2."""
  with pytest.raises(SystemExit) as exit_info:
    cli.call(predict_tool.main, predict_tool._FLAGS, ["predict", *argv])
  assert exit_info.value.code == 2, argv
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("medjax.tools.predict: error: "), lines
  return lines[0][len("medjax.tools.predict: error: "):]


def test_predict_command_line_mistakes_are_one_line(tmp_path, capsys):
  workdir, cases, out_dir = (os.path.join(tmp_path, d) for d in ("run", "cases", "out"))
  os.makedirs(cases)
  _saved_unet_run(workdir, patch_size=None)  # image_folder with no data here: no window known without --roi
  _case(cases, "a.nii.gz")
  run = (f"--workdir={workdir}", f"--output={out_dir}")
  assert _predict_error(capsys, *run) == "predict needs --input (or --benchmark)."
  assert _predict_error(capsys, *run, f"--input={tmp_path}/cses") == (
      f"--input {tmp_path}/cses does not exist. Did you mean 'cases'?")
  assert _predict_error(capsys, f"--workdir={tmp_path}/rnu", f"--output={out_dir}", f"--input={cases}") == (
      f"--workdir {tmp_path}/rnu does not exist. Did you mean 'run'?")
  assert _predict_error(capsys, *run, f"--input={cases}", "--roi=8,a") == (
      "--roi takes positive integers separated by commas, got '8,a'.")
  assert _predict_error(capsys, *run, f"--input={cases}", "--roi=8,8") == (
      "--roi takes one or three positive integers (z,y,x), got '8,8'.")
  assert _predict_error(capsys, f"--workdir={workdir}", f"--input={cases}", f"--output={cases}/a.nii.gz") == (
      f"--output {cases}/a.nii.gz is a file; give a folder for the label maps.")
  assert _predict_error(capsys, *run, f"--input={cases}").startswith(
      "The run has no config.inference.roi_size, input.patch_size or data.patch_size, and its dataset (for the "
      "training image size) cannot be built here (")
  with open(os.path.join(tmp_path, "broken.nii.gz"), "w") as f:
    f.write("not an image")
  assert _predict_error(capsys, *run, f"--input={tmp_path}/broken.nii.gz", "--roi=4,8,8").startswith(
      f"cannot read NIfTI file {tmp_path}/broken.nii.gz: ")
  assert not os.path.exists(os.path.join(out_dir, "a.nii.gz"))
