"""2D -> 3D inflation, input-channel adaptation and partial loading (`transfer.merge`) with its report."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models, transfer
from medjax.models import layers
from tests.transfer import transfer_testing


def _conv(kernel, x):
  """`layers.conv` (symmetric k // 2 padding) with `kernel` on channels-last `x`."""
  conv = layers.conv(kernel.shape[-1], kernel.shape[:-2], use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32)
  return np.asarray(conv.apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x)))


@pytest.mark.parametrize("mode", ["average", "center"])
def test_inflated_kernel_gives_the_2d_response_on_a_volume_of_repeated_slices(mode):
  rng = np.random.default_rng(0)
  kernel2d = rng.normal(size=(3, 5, 2, 4)).astype(np.float32)
  image = rng.normal(size=(1, 9, 11, 2)).astype(np.float32)
  kernel3d = transfer.inflate_kernel(kernel2d, 3, mode)
  assert kernel3d.shape == (3, 3, 5, 2, 4)
  volume = np.repeat(image[:, None], 6, axis=1)  # (1, depth 6, 9, 11, 2)
  expected, got = _conv(kernel2d, image), _conv(kernel3d, volume)
  # Interior slices see the whole depth kernel; the zero padding at the two end slices is the only difference.
  for z in range(1, 5):
    np.testing.assert_allclose(got[:, z], expected, rtol=1e-5, atol=1e-5)
  if mode == "center":
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-5)  # the middle slice needs no neighbours
  else:
    assert not np.allclose(got[:, 0], expected)


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_adapted_channels_give_the_rgb_response_to_equal_channels(channels):
  rng = np.random.default_rng(1)
  rgb = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  gray = rng.normal(size=(1, 8, 10, 1)).astype(np.float32)
  adapted = transfer.adapt_input_channels(rgb, channels)
  assert adapted.shape == (3, 3, channels, 5)
  got = _conv(adapted, np.repeat(gray, channels, axis=-1))
  expected = _conv(rgb, np.repeat(gray, 3, axis=-1))
  if channels % 3 == 0 or channels == 1:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  else:  # 2 channels: R and G repeated, scaled by 3/2; B is lost
    np.testing.assert_allclose(adapted, np.stack([rgb[:, :, 0], rgb[:, :, 1]], axis=2) * 1.5, rtol=1e-6)


def test_adapt_errors_name_the_shape_and_mode():
  with pytest.raises(ValueError, match=r"2D conv kernel \(kh, kw, I, O\), got shape \(3, 3, 3, 2, 4\)"):
    transfer.inflate_kernel(np.zeros((3, 3, 3, 2, 4)), 3)
  with pytest.raises(ValueError, match=r"unknown inflation mode 'mean'; choose from \['average', 'center'\]"):
    transfer.inflate_kernel(np.zeros((3, 3, 2, 4)), 3, "mean")
  with pytest.raises(ValueError, match="in_channels must be >= 1"):
    transfer.adapt_input_channels(np.zeros((3, 3, 2, 4)), 0)


# ---------------------------------------------------------------------------------------------- merge

KWARGS = {"num_classes": 4, "width": 4}


def _fresh(model_name="resnet18", in_channels=3, **kwargs):
  return transfer_testing.random_variables(model_name, {**KWARGS, **kwargs}, seed=7, in_channels=in_channels)


def test_merge_loads_everything_but_the_excluded_head_and_reports_by_path():
  source = _fresh(num_classes=10)
  target = transfer_testing.random_variables("resnet18", KWARGS, seed=8)
  merged, report = transfer.merge(target, source, exclude=("head",), source_name="a run")
  flat_source, flat_target, flat_merged = (transfer.flatten(t) for t in (source, target, merged))
  for path, value in flat_merged.items():
    kept = target if path[1] == "head" else source
    np.testing.assert_array_equal(value, transfer.flatten(kept)[path])
  assert sorted(report.initialised) == [("params/head/bias", "excluded by 'head'"),
                                        ("params/head/kernel", "excluded by 'head'")]
  assert sorted(report.skipped) == sorted(report.initialised)
  assert len(report.loaded) == len(flat_target) - 2 and not report.adapted
  assert report.counts() == {"loaded": len(flat_target) - 2, "adapted": 0, "initialised": 2, "skipped": 2}
  assert report.summary().startswith(f"init_from a run: {len(flat_target) - 2} loaded, 0 adapted, 2 initialised, "
                                     "2 skipped\n  initialised: params/head/bias (excluded by 'head')")
  assert set(flat_source) == set(flat_target)


def test_merge_lists_every_missing_and_misshaped_variable_in_one_error():
  source = transfer.flatten(_fresh(num_classes=10))
  del source["params", "stage2_block1", "conv1", "kernel"]
  del source["batch_stats", "stem_norm", "var"]
  source["params", "extra", "kernel"] = np.zeros((2, 2), np.float32)
  target = _fresh()
  with pytest.raises(transfer.WeightMismatchError) as info:
    transfer.merge(target, {"/".join(k): v for k, v in source.items()}, source_name="file w.safetensors")
  message = str(info.value)
  assert message.startswith("the pretrained variables of file w.safetensors do not fit the model: 2 missing, "
                            "2 mis-shaped\n")
  assert "  batch_stats/stem_norm/var (4,)\n" in message and "  params/stage2_block1/conv1/kernel (3, 3, 8, 8)\n" in message
  assert "  params/head/kernel: (32, 10) -> (32, 4) (no option adapts it)" in message
  assert "in the source but not in the model (1): params/extra/kernel" in message
  # allow_missing keeps the fresh values for the missing ones; the heads still differ, so exclude it too.
  merged, report = transfer.merge(target, {"/".join(k): v for k, v in source.items()}, allow_missing=True,
                                  exclude=("head",))
  assert ("params/stage2_block1/conv1/kernel", "not in the source") in report.initialised
  np.testing.assert_array_equal(merged["batch_stats"]["stem_norm"]["var"], target["batch_stats"]["stem_norm"]["var"])


def test_rgb_weights_into_a_one_channel_model_and_2d_into_3d():
  source = _fresh()
  gray = transfer_testing.random_variables("resnet18", KWARGS, in_channels=1)
  merged, report = transfer.merge(gray, source)
  assert report.adapted == [("params/stem_conv/kernel", "input channels 3 -> 1")]
  np.testing.assert_allclose(merged["params"]["stem_conv"]["kernel"],
                             source["params"]["stem_conv"]["kernel"].sum(axis=2, keepdims=True), rtol=1e-6)
  with pytest.raises(transfer.WeightMismatchError, match="adapt"):
    transfer.merge(gray, source, adapt_channels=False)

  volume = transfer_testing.random_variables("resnet18", {**KWARGS, "spatial_dims": 3}, in_channels=1)
  with pytest.raises(transfer.WeightMismatchError, match=r"a 2D kernel for a 3D model: set inflate"):
    transfer.merge(volume, source)
  merged, report = transfer.merge(volume, source, inflate="average")
  kinds = {how for _, how in report.adapted}
  assert kinds == {"inflated to depth 3 (average)", "inflated to depth 1 (average)",
                   "inflated to depth 7 (average), input channels 3 -> 1"}
  assert len(report.adapted) == 20 and not report.initialised  # every conv kernel of the ResNet-18
  np.testing.assert_allclose(merged["params"]["stage1_block0"]["conv1"]["kernel"],
                             np.repeat(source["params"]["stage1_block0"]["conv1"]["kernel"][None], 3, 0) / 3, rtol=1e-6)


def test_2d_weights_load_unchanged_into_acs_and_2p5d_resnets():
  source = _fresh()
  for name in ("resnet18_acs", "resnet18_2.5d"):
    target = transfer_testing.random_variables(name, KWARGS, seed=3)
    merged, report = transfer.merge(target, source)
    assert not report.adapted and not report.initialised and len(report.loaded) == len(transfer.flatten(target))
    model = models.build_model(name, KWARGS)
    logits, _ = model.apply(merged, jnp.ones((1, 8, 16, 16, 3)), train=False)
    assert logits.shape == (1, 4) and np.isfinite(np.asarray(logits)).all()
  # The torchvision mapping converts straight into them as well.
  state_dict = transfer.to_torch(source, "resnet18")
  acs = transfer.from_torch(state_dict, "resnet18_acs", {"width": 4})
  jax.tree.map(np.testing.assert_array_equal, acs, source)
