"""torchvision ResNet <-> medjax ResNet: exact round trips and the mismatch error without torch; with torch,
the same eval-mode logits as torchvision at a non-square input and an exact torch -> medjax -> torch trip."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import models, transfer
from tests.transfer import transfer_testing


def test_names_and_layouts_of_a_bottleneck_resnet():
  variables = transfer_testing.random_variables("resnet50", {"num_classes": 3, "width": 2})
  state_dict = transfer.to_torch(variables, "resnet50")
  params, stats = variables["params"], variables["batch_stats"]
  assert state_dict["conv1.weight"].shape == (2, 3, 7, 7)  # (O, I, H, W) from (H, W, I, O)
  assert np.array_equal(state_dict["conv1.weight"], params["stem_conv"]["kernel"].transpose(3, 2, 0, 1))
  assert np.array_equal(state_dict["layer2.0.downsample.0.weight"][:, :, 0, 0],
                        params["stage2_block0"]["proj_conv"]["kernel"][0, 0].T)
  assert np.array_equal(state_dict["layer3.1.bn2.weight"], params["stage3_block1"]["norm2"]["scale"])
  assert np.array_equal(state_dict["layer4.2.bn3.running_var"], stats["stage4_block2"]["norm3"]["var"])
  assert np.array_equal(state_dict["layer1.0.downsample.1.running_mean"], stats["stage1_block0"]["proj_norm"]["mean"])
  assert np.array_equal(state_dict["fc.weight"], params["head"]["kernel"].T) and state_dict["fc.weight"].shape == (3, 64)
  assert state_dict["layer1.0.bn3.num_batches_tracked"] == 0
  # torchvision resnet50: 53 convs + 1 fc weight, 53 norms (5 tensors each), fc bias.
  assert len(state_dict) == 54 + 53 * 5 + 1


@pytest.mark.parametrize("model_name,kwargs", [
    ("resnet18", {"num_classes": 5, "width": 4}),
    ("resnet34", {"num_classes": 2, "width": 2}),
    ("resnet101", {"num_classes": 3, "width": 2}),
    ("resnet101", {"num_classes": 3, "width": 2, "stage_sizes": (3, 8, 36, 3)}),  # torchvision's resnet152
])
def test_export_then_import_is_exact(model_name, kwargs):
  variables = transfer_testing.random_variables(model_name, kwargs, in_channels=1)
  state_dict = transfer.to_torch(variables, model_name)
  assert state_dict["conv1.weight"].shape[1] == 1
  # num_classes and the input channels are read from the state dict.
  given = {k: v for k, v in kwargs.items() if k != "num_classes"}
  transfer_testing.assert_exact_round_trip(None, state_dict, variables, model_name, given)


def test_mismatch_lists_every_missing_unexpected_and_misshaped_tensor():
  state_dict = transfer.to_torch(
      transfer_testing.random_variables("resnet18", {"num_classes": 5, "width": 4}), "resnet18")
  state_dict["extra.weight"] = np.zeros((2, 3), np.float32)
  with pytest.raises(transfer.WeightMismatchError) as info:
    transfer.from_torch(state_dict, "resnet34", {"num_classes": 7, "width": 4})
  error = info.value
  assert isinstance(error, ValueError)
  # resnet34 has blocks (3, 4, 6, 3), resnet18 (2, 2, 2, 2): 1 + 2 + 4 + 1 missing basic blocks of 2 convs and
  # 2 norms (conv weight, norm weight/bias/running_mean/running_var): 8 * 2 * 5 tensors.
  assert len(error.missing) == 80 and error.unexpected == [("extra.weight", (2, 3))]
  assert error.mismatched == [("fc.bias", "params/head/bias", (5,), (7,)),
                              ("fc.weight", "params/head/kernel", (5, 32), (7, 32))]
  message = str(error)
  assert message.startswith("the torchvision state dict does not fit medjax resnet34({'num_classes': 7, 'width': 4}): "
                            "80 missing, 1 unexpected, 2 mis-shaped tensors\n")
  assert "  layer3.5.conv2.weight <- params/stage3_block5/conv2/kernel (16, 16, 3, 3)\n" in message
  assert "  layer1.2.bn1.running_var <- batch_stats/stage1_block2/norm1/var (4,)\n" in message
  assert "unexpected in the state dict (torch name, torch shape):\n  extra.weight (2, 3)\n" in message
  assert message.endswith("  fc.bias: (5,) -> params/head/bias: (7,)\n"
                          "  fc.weight: (5, 32) -> params/head/kernel: (7, 32)")


def test_basic_blocks_into_a_bottleneck_model_report_shapes_and_names():
  state_dict = transfer.to_torch(
      transfer_testing.random_variables("resnet18", {"num_classes": 5, "width": 4}), "resnet18")
  with pytest.raises(transfer.WeightMismatchError) as info:
    transfer.from_torch(state_dict, "resnet50", {"width": 4})
  error = info.value
  assert ("layer1.0.conv1.weight", "params/stage1_block0/conv1/kernel", (4, 4, 3, 3), (4, 4, 1, 1)) in error.mismatched
  assert ("layer1.0.conv3.weight", "params/stage1_block0/conv3/kernel", (16, 4, 1, 1)) in error.missing


def test_unsupported_models_and_variables_are_refused():
  with pytest.raises(ValueError, match=r"no torchvision weight mapping for the medjax model 'unet'; supported \(source:model\): "):
    transfer.from_torch({}, "unet")
  variables = transfer_testing.random_variables("resnet18", {"num_classes": 2, "width": 4, "norm": "group"})
  with pytest.raises(ValueError, match=r"^no torchvision name for the medjax variable params/\w+/norm\d?/norm/\w+ \(module 'norm'\)$"):
    transfer.to_torch(variables, "resnet18")


# ---------------------------------------------------------------------------------------- with torch

PEER_MODULES = ("torchvision",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def _random_torchvision(torch, model_name, num_classes):
  """A randomly initialised torchvision model whose batch norms have random affine parameters and running
  statistics (torchvision's 1 / 0 would hide a swapped scale/mean/var)."""
  import torchvision
  torch.manual_seed(0)
  return transfer_testing.randomise_norms(torch, getattr(torchvision.models, model_name)(num_classes=num_classes))


@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_same_eval_logits_as_torchvision_and_exact_round_trip(torch_one_thread, model_name):
  torch = torch_one_thread
  model = _random_torchvision(torch, model_name, num_classes=10)
  x = np.random.default_rng(0).normal(size=(2, 3, 40, 56)).astype(np.float32)  # (B, C, H, W), non-square
  state_dict, expected = transfer_testing.torch_state_and_outputs(torch, model, x)

  variables = transfer.from_torch(state_dict, model_name)
  medjax_model = models.build_model(model_name, {"num_classes": 10})
  logits, _ = medjax_model.apply(variables, x.transpose(0, 2, 3, 1), train=False)  # channels-last
  assert logits.shape == (2, 10)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)

  # torchvision accepts the exported dict as it is (strict: same names, shapes, counters included).
  transfer_testing.assert_export_loads_strictly(torch, model, state_dict, transfer.to_torch(variables, model_name))


def test_timm_resnet_same_eval_logits(torch_one_thread):
  torch = torch_one_thread
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  model = transfer_testing.randomise_norms(torch, timm.create_model("resnet18", pretrained=False, num_classes=6))
  x = np.random.default_rng(1).normal(size=(2, 3, 45, 61)).astype(np.float32)
  state_dict, expected = transfer_testing.torch_state_and_outputs(torch, model, x)
  variables = transfer.from_torch(state_dict, "resnet18", source="timm")
  logits, _ = models.build_model("resnet18", {"num_classes": 6}).apply(variables, x.transpose(0, 2, 3, 1), train=False)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
  exported = transfer.to_torch(variables, "resnet18", source="timm")
  transfer_testing.assert_export_loads_strictly(torch, model, state_dict, exported)
