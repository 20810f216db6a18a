"""torchvision EfficientNet / MobileNetV2 / MobileNetV3 <-> medjax (medjax.transfer.torchvision_mobile): exact round
trips, names and the mismatch error without torch; with torch, the same eval-mode logits as torchvision at a
non-square odd input, an exact torch -> medjax -> torch trip and a strict `load_state_dict` of the export."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import models
from medjax.transfer import mapping
from medjax.transfer import torchvision_mobile as tm
from tests.transfer import transfer_testing

# (family, medjax model, small model kwargs for the torch-free tests)
FAMILIES = [
    (tm.TorchvisionEfficientNet(), "efficientnet_b0", {"num_classes": 5, "width_mult": 0.25}),
    (tm.TorchvisionEfficientNet(), "efficientnet_b2", {"num_classes": 3, "width_mult": 0.25}),  # depth 1.2
    (tm.TorchvisionMobileNetV2(), "mobilenet_v2", {"num_classes": 4, "width_mult": 0.25}),
    (tm.TorchvisionMobileNetV3Small(), "mobilenet_v3_small", {"num_classes": 6, "width_mult": 0.25}),
    (tm.TorchvisionMobileNetV3Large(), "mobilenet_v3_large", {"num_classes": 2, "width_mult": 0.25}),
]


@pytest.mark.parametrize("family,model_name,kwargs", FAMILIES, ids=[f[1] for f in FAMILIES])
def test_export_then_import_is_exact(family, model_name, kwargs):
  variables = transfer_testing.random_variables(model_name, kwargs, in_channels=1)
  state_dict = mapping.to_torch(family, variables, model_name)
  assert state_dict["features.0.0.weight"].shape[1] == 1
  # num_classes and the input channels are read from the state dict; width_mult is the caller's.
  transfer_testing.assert_exact_round_trip(family, state_dict, variables, model_name,
                                           {"width_mult": kwargs["width_mult"]})


def test_names_and_layouts():
  variables = transfer_testing.random_variables("mobilenet_v3_small", {"num_classes": 3, "width_mult": 0.5})
  state_dict = mapping.to_torch(tm.TorchvisionMobileNetV3Small(), variables, "mobilenet_v3_small")
  params, stats = variables["params"], variables["batch_stats"]
  # Block 0: depthwise (no expand), SE, project; block 1: expand, depthwise, project (no SE).
  dw = params["block0"]["depthwise"]["conv"]["kernel"]  # (3, 3, 1, C) grouped -> (C, 1, 3, 3)
  assert np.array_equal(state_dict["features.1.block.0.0.weight"], dw.transpose(3, 2, 0, 1))
  fc1 = params["block0"]["se"]["fc1"]["kernel"]  # Dense (C, squeeze) -> 1x1 conv (squeeze, C, 1, 1)
  assert state_dict["features.1.block.1.fc1.weight"].shape == (fc1.shape[1], fc1.shape[0], 1, 1)
  assert np.array_equal(state_dict["features.1.block.1.fc1.weight"][:, :, 0, 0], fc1.T)
  assert np.array_equal(state_dict["features.1.block.1.fc2.bias"], params["block0"]["se"]["fc2"]["bias"])
  assert np.array_equal(state_dict["features.1.block.2.1.running_var"], stats["block0"]["project"]["norm"]["var"])
  assert np.array_equal(state_dict["features.2.block.2.1.weight"], params["block1"]["project"]["norm"]["scale"])
  assert np.array_equal(state_dict["features.12.1.running_mean"], stats["head_conv"]["norm"]["mean"])
  assert np.array_equal(state_dict["classifier.0.weight"], params["classifier_hidden"]["kernel"].T)
  assert np.array_equal(state_dict["classifier.3.bias"], params["classifier"]["bias"])
  assert state_dict["features.4.block.1.1.num_batches_tracked"] == 0

  v2 = transfer_testing.random_variables("mobilenet_v2", {"num_classes": 3, "width_mult": 0.25})
  v2_dict = mapping.to_torch(tm.TorchvisionMobileNetV2(), v2, "mobilenet_v2")
  # Stage 3 block 1 is block 1 + 2 + 1 + 1 = 5; the projection is a bare conv (conv.2) and batch norm (conv.3).
  assert np.array_equal(v2_dict["features.5.conv.2.weight"][:, :, 0, 0],
                        v2["params"]["stage3_block1"]["project"]["conv"]["kernel"][0, 0].T)
  assert np.array_equal(v2_dict["features.1.conv.2.bias"], v2["params"]["stage1_block0"]["project"]["norm"]["bias"])
  assert "features.1.conv.3.weight" not in v2_dict and "features.18.1.weight" in v2_dict


def test_mismatch_lists_missing_and_misshaped_tensors():
  small = transfer_testing.random_variables("mobilenet_v3_small", {"num_classes": 5, "width_mult": 0.25})
  state_dict = mapping.to_torch(tm.TorchvisionMobileNetV3Small(), small, "mobilenet_v3_small")
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(tm.TorchvisionMobileNetV3Large(), state_dict, "mobilenet_v3_large", {"width_mult": 0.25})
  error = info.value
  message = str(error)
  assert message.startswith("the torchvision state dict does not fit medjax mobilenet_v3_large({'width_mult': 0.25, "
                            f"'num_classes': 5}}): {len(error.missing)} missing, {len(error.unexpected)} unexpected, "
                            f"{len(error.mismatched)} mis-shaped tensors\n")
  missing = {name for name, _, _ in error.missing}
  # Small has 11 blocks (features.1-11) and its head conv at features.12; large 15 blocks and the head at 16.
  assert {"features.16.0.weight", "features.15.block.3.1.running_var", "features.13.block.0.0.weight"} <= missing
  assert ("features.12.0.weight", (576 // 4, 24, 1, 1)) in error.unexpected  # small's head conv
  # Large's block 0 has no SE: the small's SE layer sits where large has its projection.
  assert ("features.1.block.1.fc1.weight", (8, 8, 1, 1)) in error.unexpected
  assert ("classifier.0.weight", "params/classifier_hidden/kernel", (256, 144), (320, 240)) in error.mismatched
  assert "  features.16.0.weight <- params/head_conv/conv/kernel (240, 40, 1, 1)\n" in message


def test_unsupported_variables_and_widths_are_refused():
  variables = transfer_testing.random_variables("efficientnet_b0", {"num_classes": 2, "width_mult": 0.25,
                                                                     "norm": "group"})
  with pytest.raises(ValueError, match=r"^no torchvision name for the medjax variable params/\w+/norm/norm/\w+$"):
    mapping.to_torch(tm.TorchvisionEfficientNet(), variables, "efficientnet_b0")
  with pytest.raises(ValueError, match=r"no torchvision mapping of TorchvisionMobileNetV3Small for model "):
    mapping.from_torch(tm.TorchvisionMobileNetV3Small(), {}, "mobilenet_v3_large")
  with pytest.raises(ValueError, match=r"width_mult=0\.1: a block after the first keeps its input width"):
    mapping.from_torch(tm.TorchvisionMobileNetV3Large(), {}, "mobilenet_v3_large", {"width_mult": 0.1})


# ---------------------------------------------------------------------------------------- with torch

PEER_MODULES = ("torchvision",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def _random_torchvision(torch, model_name, num_classes, **kwargs):
  """A randomly initialised torchvision model whose batch norms have random affine parameters and running
  statistics (torchvision's 1 / 0 would hide a swapped scale/mean/var)."""
  import torchvision
  torch.manual_seed(0)
  model = getattr(torchvision.models, model_name)(num_classes=num_classes, **kwargs)
  return transfer_testing.randomise_norms(torch, model)


@pytest.mark.parametrize("family,model_name,kwargs", [
    (tm.TorchvisionEfficientNet(), "efficientnet_b0", {}),
    (tm.TorchvisionMobileNetV2(), "mobilenet_v2", {"width_mult": 0.5}),
    (tm.TorchvisionMobileNetV3Small(), "mobilenet_v3_small", {}),
], ids=["efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small"])
def test_same_eval_logits_as_torchvision_and_exact_round_trip(torch_one_thread, family, model_name, kwargs):
  torch = torch_one_thread
  model = _random_torchvision(torch, model_name, num_classes=10, **kwargs)
  # (B, C, H, W), non-square and odd: every stride-2 layer sees odd sizes (45 -> 23 -> 12 -> 6 -> 3 -> 2).
  x = np.random.default_rng(0).normal(size=(2, 3, 45, 61)).astype(np.float32)
  state_dict, expected = transfer_testing.torch_state_and_outputs(torch, model, x)

  variables = mapping.from_torch(family, state_dict, model_name, kwargs)
  medjax_model = models.build_model(model_name, {"num_classes": 10, **kwargs})
  logits, _ = medjax_model.apply(variables, x.transpose(0, 2, 3, 1), train=False)  # channels-last
  assert logits.shape == (2, 10)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)

  # torchvision accepts the exported dict as it is (strict: same names, shapes, counters included).
  exported = mapping.to_torch(family, variables, model_name)
  transfer_testing.assert_export_loads_strictly(torch, model, state_dict, exported)
