"""torchvision VGG / DenseNet / GoogLeNet / ShuffleNetV2 <-> medjax: exact round trips and the mismatch error
without torch; with torch, the same eval-mode logits as torchvision at odd, non-square inputs, an exact
torch -> medjax -> torch trip and a strict `load_state_dict` of the export."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from medjax import models
from medjax.models import inception
from medjax.transfer import mapping, torchvision_cnns
from tests.transfer import transfer_testing

# Small members of each family: (mapping, medjax model, kwargs). VGG's classifier widths are free in medjax;
# torchvision's are fixed, so the torch tests swap in a classifier of the same names and these widths.
VGG = ("vgg11_bn", {"num_classes": 5, "width": 4, "head_features": (16, 12)})
DENSENET = ("densenet121", {"num_classes": 4, "growth_rate": 4, "block_config": (2, 3, 2), "bn_size": 2,
                            "init_features": 8})
GOOGLENET = ("googlenet", {"num_classes": 3, "aux_heads": True})
SHUFFLENET = ("shufflenet_v2_x0_5", {"num_classes": 6, "stage_channels": (8, 16, 32, 64, 48),
                                     "stage_blocks": (2, 1, 2)})
# One VGG mapping for every variant: `bind` configures it from the model.
VGG_FAMILY = torchvision_cnns.TorchvisionVGG()
FAMILIES = {"vgg11_bn": VGG_FAMILY,
            "densenet121": torchvision_cnns.TorchvisionDenseNet(),
            "googlenet": torchvision_cnns.TorchvisionGoogLeNet(),
            "shufflenet_v2_x0_5": torchvision_cnns.TorchvisionShuffleNetV2()}
# What the family reads off the state dict itself (the rest of the kwargs must be given).
INFERRED = {"vgg11_bn": ("num_classes", "width", "head_features"),
            "densenet121": ("num_classes", "growth_rate", "block_config", "bn_size", "init_features"),
            "googlenet": ("num_classes", "aux_heads"),
            "shufflenet_v2_x0_5": ("num_classes", "stage_channels", "stage_blocks")}


@pytest.mark.parametrize("model_name,kwargs", [VGG, ("vgg16", {"num_classes": 2, "width": 2, "head_features": (8, 8)}),
                                               DENSENET, GOOGLENET, SHUFFLENET])
def test_export_then_import_is_exact(model_name, kwargs):
  family = FAMILIES.get(model_name, VGG_FAMILY)
  variables = transfer_testing.random_variables(model_name, kwargs, in_channels=1)
  state_dict = mapping.to_torch(family, variables, model_name)
  given = {k: v for k, v in kwargs.items() if k not in INFERRED.get(model_name, ("num_classes",))}
  transfer_testing.assert_exact_round_trip(family, state_dict, variables, model_name, given)


def test_names_and_flatten_layouts():
  vgg = transfer_testing.random_variables(*VGG)
  state_dict = mapping.to_torch(FAMILIES["vgg11_bn"], vgg, "vgg11_bn")
  # vgg11_bn features: conv, bn, relu, pool | conv, bn, relu, pool | conv, bn, relu, conv, bn, relu, pool | ...
  assert np.array_equal(state_dict["features.8.weight"],
                        vgg["params"]["stage3"]["conv1"]["kernel"].transpose(3, 2, 0, 1))
  assert np.array_equal(state_dict["features.12.running_var"], vgg["batch_stats"]["stage3"]["norm2"]["var"])
  assert np.array_equal(state_dict["features.26.weight"], vgg["params"]["stage5"]["norm2"]["scale"])
  # classifier.0 reads the torch flatten (C=32, 7, 7); medjax rows are (7, 7, C).
  fc1 = vgg["params"]["fc1"]["kernel"]
  assert state_dict["classifier.0.weight"].shape == (16, 32 * 49)
  assert np.array_equal(state_dict["classifier.0.weight"].reshape(16, 32, 7, 7)[:, 5, 2, 3], fc1[(2 * 7 + 3) * 32 + 5])
  assert np.array_equal(state_dict["classifier.6.weight"], vgg["params"]["head"]["kernel"].T)
  assert len(state_dict) == 8 * 2 + 8 * 5 + 3 * 2

  names = set(mapping.to_torch(FAMILIES["googlenet"], transfer_testing.random_variables(*GOOGLENET), "googlenet"))
  assert {"conv3.bn.running_mean", "inception4e.branch3.0.conv.weight", "inception5b.branch4.1.bn.bias",
          "aux2.conv.conv.weight", "aux2.fc1.weight", "fc.bias"} <= names
  names = set(mapping.to_torch(FAMILIES["shufflenet_v2_x0_5"], transfer_testing.random_variables(*SHUFFLENET),
                               "shufflenet_v2_x0_5"))
  assert {"conv1.0.weight", "stage2.0.branch1.3.running_var", "stage3.0.branch2.4.weight", "conv5.1.bias",
          "fc.weight"} <= names and not any(name.startswith("stage2.1.branch1") for name in names)
  names = set(mapping.to_torch(FAMILIES["densenet121"], transfer_testing.random_variables(*DENSENET), "densenet121"))
  assert {"features.denseblock3.denselayer2.conv2.weight", "features.transition2.norm.running_mean",
          "features.norm5.weight", "classifier.weight"} <= names


def test_vgg11_into_vgg16_lists_missing_unexpected_and_misshaped():
  kwargs = {"num_classes": 5, "width": 2, "head_features": (8, 8)}
  state_dict = mapping.to_torch(VGG_FAMILY,
                                transfer_testing.random_variables("vgg11", kwargs), "vgg11")
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(VGG_FAMILY, state_dict, "vgg16", {"num_classes": 7})
  error = info.value
  # vgg16's convs sit at features 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; vgg11's at 0, 3, 6, 8, 11,
  # 13, 16, 18: only features.0 fits, 12 convs (weight + bias) are missing, 7 unexpected, the head mis-shaped.
  assert len(error.missing) == 24 and len(error.unexpected) == 14
  assert ("features.28.weight", "params/stage5/conv3/kernel", (16, 16, 3, 3)) in error.missing
  assert ("features.18.bias", (16,)) in error.unexpected
  assert error.mismatched == [("classifier.6.bias", "params/head/bias", (5,), (7,)),
                              ("classifier.6.weight", "params/head/kernel", (5, 8), (7, 8))]
  assert str(error).startswith("the torchvision state dict does not fit medjax vgg16({'num_classes': 7, 'width': 2, "
                               "'head_features': (8, 8)}): 24 missing, 14 unexpected, 2 mis-shaped tensors\n")


def test_one_vgg_mapping_binds_to_each_model():
  from medjax import transfer
  assert len({id(transfer.family(name)) for name in ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn")}) == 1
  # The names follow the model's own stage layout: vgg11 built with vgg16's stages is named as vgg16.
  kwargs = {"num_classes": 2, "width": 2, "head_features": (8, 8)}
  as_vgg16 = transfer.to_torch(transfer_testing.random_variables(
      "vgg11", {**kwargs, "stage_sizes": (2, 2, 3, 3, 3)}), "vgg11", {**kwargs, "stage_sizes": (2, 2, 3, 3, 3)})
  vgg16 = transfer.to_torch(transfer_testing.random_variables("vgg16", kwargs), "vgg16")
  assert sorted(as_vgg16) == sorted(vgg16) and "features.28.weight" in vgg16
  bn = transfer.to_torch(transfer_testing.random_variables("vgg11", {**kwargs, "batch_norm": True}), "vgg11",
                         {**kwargs, "batch_norm": True})
  assert "features.1.running_var" in bn


def test_refusals():
  with pytest.raises(ValueError, match=r"no torchvision mapping of TorchvisionVGG for model 'vgg13'"):
    mapping.from_torch(VGG_FAMILY, {}, "vgg13")
  with pytest.raises(ValueError, match=r"names tensors once bound"):
    VGG_FAMILY.torch_key(("params", "stage1", "conv1", "kernel"))
  variables = transfer_testing.random_variables("densenet121", {**DENSENET[1], "norm": "group"})
  with pytest.raises(ValueError, match=r"^no torchvision name for the medjax variable params/\w+/norm\d?/norm/\w+ "
                                       r"\(module 'norm'\)$"):
    mapping.to_torch(FAMILIES["densenet121"], variables, "densenet121")
  variables = transfer_testing.random_variables("vgg16", {"num_classes": 2, "width": 2, "pool_size": 2})
  with pytest.raises(ValueError, match=r"needs a multiple of 49 kernel rows, got 64"):
    mapping.to_torch(VGG_FAMILY, variables, "vgg16")
  # googlenet without aux heads in the dict but asked for them: the aux tensors are listed as missing.
  without_aux = transfer_testing.random_variables("googlenet", {"num_classes": 3})
  state_dict = mapping.to_torch(FAMILIES["googlenet"], without_aux, "googlenet")
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(FAMILIES["googlenet"], state_dict, "googlenet", {"aux_heads": True})
  assert ("aux1.fc1.weight", "params/aux1/fc1/kernel", (1024, 2048)) in info.value.missing
  assert not info.value.unexpected and not info.value.mismatched
  assert "aux1" not in mapping.from_torch(FAMILIES["googlenet"], state_dict, "googlenet")["params"]


# ---------------------------------------------------------------------------------------- with torch

PEER_MODULES = ("torchvision",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def _torchvision_model(torch, model_name):
  """The torchvision counterpart of the small medjax model `model_name` (VGG, DENSENET, ... kwargs)."""
  import torchvision
  from torchvision.models import vgg
  torch.manual_seed(0)
  nn = torch.nn
  if model_name == "vgg11_bn":
    w, (h1, h2) = VGG[1]["width"], VGG[1]["head_features"]
    cfg = [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w, "M"]
    model = vgg.VGG(vgg.make_layers(cfg, batch_norm=True), num_classes=VGG[1]["num_classes"])
    # torchvision's classifier is fixed at 512 * 7 * 7 -> 4096 -> 4096; the same modules (names) narrower.
    model.classifier = nn.Sequential(nn.Linear(8 * w * 49, h1), nn.ReLU(True), nn.Dropout(), nn.Linear(h1, h2),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(h2, VGG[1]["num_classes"]))
  elif model_name == "densenet121":
    k = DENSENET[1]
    model = torchvision.models.DenseNet(growth_rate=k["growth_rate"], block_config=k["block_config"],
                                        num_init_features=k["init_features"], bn_size=k["bn_size"],
                                        num_classes=k["num_classes"])
  elif model_name == "googlenet":
    model = torchvision.models.GoogLeNet(num_classes=GOOGLENET[1]["num_classes"], aux_logits=True,
                                         transform_input=False, init_weights=True)
  else:
    k = SHUFFLENET[1]
    model = torchvision.models.ShuffleNetV2(list(k["stage_blocks"]), list(k["stage_channels"]),
                                            num_classes=k["num_classes"])
  return transfer_testing.randomise_norms(torch, model)


def _medjax_logits(model_name, kwargs, variables, x):
  """Eval-mode logits of the medjax model on the torch-layout batch `x` (jitted: eager GoogLeNet is ~4x
  slower on CPU than compiling it)."""
  model = models.build_model(model_name, kwargs)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
  return np.asarray(logits)


# Odd, non-square inputs (B, C, H, W): VGG 75x109 pools to 2x3 and then adaptively to 7x7 (repeated cells);
# DenseNet's and ShuffleNet's stride-2 convs and pools see odd lengths; GoogLeNet's 40x56 makes three of its
# four ceil-mode max-pools add a partial window.
INPUTS = {"vgg11_bn": (2, 3, 75, 109), "densenet121": (2, 3, 45, 61), "googlenet": (2, 3, 40, 56),
          "shufflenet_v2_x0_5": (2, 3, 45, 61)}


@pytest.mark.parametrize("model_name", list(FAMILIES))
def test_same_eval_logits_as_torchvision_and_exact_round_trip(torch_one_thread, model_name):
  torch = torch_one_thread
  family, kwargs = FAMILIES[model_name], dict([VGG, DENSENET, GOOGLENET, SHUFFLENET])[model_name]
  model = _torchvision_model(torch, model_name)
  x = np.random.default_rng(0).normal(size=INPUTS[model_name]).astype(np.float32)
  state_dict, expected = transfer_testing.torch_state_and_outputs(torch, model, x)

  variables = mapping.from_torch(family, state_dict, model_name)  # the architecture is read off the dict
  logits = _medjax_logits(model_name, kwargs, variables, x)
  assert logits.shape == expected.shape
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

  exported = mapping.to_torch(family, variables, model_name)
  transfer_testing.assert_export_loads_strictly(torch, model, state_dict, exported)


def test_googlenet_aux_heads_and_transform_input_match_torchvision(torch_one_thread):
  torch = torch_one_thread
  model = _torchvision_model(torch, "googlenet")
  variables = mapping.from_torch(FAMILIES["googlenet"], {k: v.numpy() for k, v in model.state_dict().items()},
                                 "googlenet")
  # The aux heads run in training only; compare one directly on a 14x10 map of inception4a's 512 channels
  # (its flatten layout is checked by the 4x4 adaptive pool's cells).
  feature = np.random.default_rng(1).normal(size=(2, 512, 14, 10)).astype(np.float32)
  with torch.no_grad():
    expected = model.aux1(torch.from_numpy(feature)).numpy()
  aux1 = {c: variables[c]["aux1"] for c in ("params", "batch_stats")}
  got = inception.AuxHead(3).apply(aux1, feature.transpose(0, 2, 3, 1), train=False)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)

  # transform_input (torchvision's pretrained googlenet uses it) re-normalises the input the same way.
  model.transform_input = True
  x = np.random.default_rng(2).normal(size=(1, 3, 33, 47)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  logits = _medjax_logits("googlenet", {**GOOGLENET[1], "transform_input": True}, variables, x)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
