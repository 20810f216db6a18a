"""MONAI UNETR / SwinUNETR / DynUNet / DenseNet121 <-> medjax: exact round trips and the mismatch error without
torch; with torch and MONAI, the same eval-mode outputs as randomly initialised small MONAI networks (norms
randomised), an exact torch -> medjax -> torch trip and MONAI's strict loading of the export."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import models, transfer
from medjax.transfer import mapping, monai_transformers
from tests.transfer import transfer_testing

# Tiny medjax configurations in MONAI's layouts: (family, model name, model kwargs, input channels). The
# registered families (one per model, bound to each configuration by its kwargs), but for MONAI's "mergingv2"
# SwinUNETR, which no tensor shape tells from the default "merging".
UNETR_KW = {"num_classes": 2, "image_size": (32, 48, 32), "feature_size": 2, "hidden_size": 8, "num_heads": 2,
            "mlp_dim": 8}
SWIN_KW = {"num_classes": 2, "feature_size": 6, "depths": (2, 1, 1, 1), "num_heads": (1, 2, 2, 3), "window_size": 3}
DYN_STRIDES = ((1, 2, 2), 2)
DYN_KW = {"spatial_dims": 3, "num_classes": 2, "features": (2, 4, 8), "kernel_size": (3, (1, 3, 3), 3),
          "strides": DYN_STRIDES, "residual": True, "decoder_residual": False, "decoder_kernel_from_below": True,
          "upsample_bias": False, "deep_supervision": 1}
DENSE_KW = {"num_classes": 3, "growth_rate": 4, "block_config": (2, 3), "init_features": 8}
CASES = {
  "unetr": (transfer.family("unetr", "monai"), "unetr", UNETR_KW, 1),
  "swin_unetr": (transfer.family("swin_unetr", "monai"), "swin_unetr", SWIN_KW, 2),
  "swin_unetr_v2_2d": (monai_transformers.MonaiSwinUNETR(downsample="mergingv2"), "swin_unetr",
                       {**SWIN_KW, "spatial_dims": 2}, 1),
  "dynunet": (transfer.family("unet", "monai"), "unet", DYN_KW, 1),
  "dynunet_2d": (transfer.family("unet", "monai"), "unet",
                 {"spatial_dims": 2, "num_classes": 2, "features": (2, 4, 4, 8), "norm": "batch",
                  "upsample_bias": True, "decoder_kernel_from_below": True, "deep_supervision": 2}, 1),
  "densenet121": (transfer.family("densenet121", "monai"), "densenet121", {**DENSE_KW, "spatial_dims": 2}, 3),
  "densenet121_3d": (transfer.family("densenet121", "monai"), "densenet121", {**DENSE_KW, "spatial_dims": 3}, 1),
}


def random_variables(family, model_name, kwargs, in_channels, seed=0):
  return transfer_testing.random_variables(model_name, kwargs, seed, in_channels, mapping=family)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_then_import_is_exact(case):
  family, model_name, kwargs, in_channels = CASES[case]
  variables = random_variables(family, model_name, kwargs, in_channels)
  state_dict = mapping.to_torch(family, variables, model_name, kwargs)
  # The family reads the architecture off the state dict; only what it cannot see is given.
  given = {k: v for k, v in kwargs.items() if k in ("image_size", "num_heads", "window_size")}
  transfer_testing.assert_exact_round_trip(family, state_dict, variables, model_name, given, kwargs)


def test_names_and_layouts():
  family, _, kwargs, _ = CASES["swin_unetr"]
  variables = random_variables(*CASES["swin_unetr"][:3], in_channels=2)
  sd = mapping.to_torch(family, variables, "swin_unetr", kwargs)
  params = variables["params"]
  # Transposed conv (I, O, 2, 2, 2) <-> Upsample (I, 8 * O): torch tap o is output offset o (row-major channel
  # block), unflipped.
  up, weight = params["decoder1_up"]["kernel"], sd["decoder3.transp_conv.conv.weight"]
  assert weight.shape == (24, 12, 2, 2, 2) and up.shape == (24, 8 * 12)
  assert np.array_equal(weight[:, 5, 1, 0, 1], up[:, (4 + 1) * 12 + 5])
  # MONAI "merging" in 3D: torch block t holds offsets 000, 100, 010, 001, 110, 101, 011, 111 (z, y, x).
  norm, torch_norm = params["stage1_merge"]["norm"]["scale"], sd["swinViT.layers1.0.downsample.norm.weight"]
  c = 6
  for t, (z, y, x) in enumerate(monai_transformers.MERGING_ORDERS["merging", 3]):
    m = 4 * z + 2 * y + x
    assert np.array_equal(torch_norm[t * c:(t + 1) * c], norm[m * c:(m + 1) * c])
    assert np.array_equal(sd["swinViT.layers1.0.downsample.reduction.weight"][:, t * c:(t + 1) * c],
                          params["stage1_merge"]["reduction"]["kernel"][m * c:(m + 1) * c].T)
  assert sd["swinViT.layers2.0.blocks.0.attn.relative_position_index"].shape == (27, 27)
  assert sd["swinViT.layers2.0.blocks.0.attn.relative_position_index"].dtype == np.int64
  assert np.array_equal(sd["encoder10.layer.conv1.conv.weight"], params["bottleneck"]["conv1"]["kernel"].transpose(4, 3, 0, 1, 2))
  # DynUNet: one tensor, two names (skip_layers aliases); level 1 -> downsamples.0, bottleneck last.
  family, name, kwargs, c_in = CASES["dynunet"]
  dyn = mapping.to_torch(family, random_variables(family, name, kwargs, c_in), name, kwargs)
  assert np.array_equal(dyn["skip_layers.next_layer.downsample.norm3.bias"], dyn["downsamples.0.norm3.bias"])
  assert np.array_equal(dyn["skip_layers.next_layer.next_layer.conv2.conv.weight"], dyn["bottleneck.conv2.conv.weight"])
  assert np.array_equal(dyn["skip_layers.next_layer.super_head.conv.conv.bias"], dyn["deep_supervision_heads.0.conv.conv.bias"])
  assert dyn["upsamples.1.transp_conv.conv.weight"].shape == (4, 2, 1, 2, 2)  # the (1, 2, 2) transition
  assert dyn["upsamples.1.conv_block.conv1.conv.weight"].shape == (2, 4, 1, 3, 3)  # the level-below kernel


def test_mismatch_lists_missing_unexpected_and_misshaped_tensors():
  family, name, kwargs, c_in = CASES["swin_unetr"]
  sd = mapping.to_torch(family, random_variables(family, name, kwargs, c_in), name, kwargs)
  del sd["decoder1.transp_conv.conv.weight"]
  sd["out.conv.conv.bias"] = np.zeros(5, np.float32)
  sd["swinViT.layers1c.0.0.conv1.conv.weight"] = np.zeros((6, 6, 3, 3, 3), np.float32)  # a use_v2 block
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(family, sd, name, {"num_classes": 2, "num_heads": kwargs["num_heads"]})
  error = info.value
  assert error.missing == [("decoder1.transp_conv.conv.weight", "params/decoder_in_up/kernel", (6, 6, 2, 2, 2))]
  assert error.mismatched == [("out.conv.conv.bias", "params/head/bias", (5,), (2,))]
  assert error.unexpected == [("swinViT.layers1c.0.0.conv1.conv.weight", (6, 6, 3, 3, 3))]
  assert "1 missing, 1 unexpected, 1 mis-shaped tensors" in str(error)
  # DynUNet: given strides that are not the network's (its up-convolution kernels) leave those mis-shaped.
  family, name, kwargs, c_in = CASES["dynunet"]
  sd = mapping.to_torch(family, random_variables(family, name, kwargs, c_in), name, kwargs)
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(family, sd, name, {"strides": 2})
  assert info.value.mismatched == [("upsamples.1.transp_conv.conv.weight", "params/up0/kernel", (4, 2, 1, 2, 2),
                                    (4, 2, 2, 2, 2))]
  assert not info.value.missing and not info.value.unexpected
  with pytest.raises(ValueError, match=r"names tensors once bound"):
    family.torch_key(("params", "enc0", "conv0", "conv", "kernel"))
  with pytest.raises(ValueError, match=r"needs the medjax unet field 'spatial_dims'"):
    transfer.to_torch({"params": {}}, "unet", {"strides": 2}, source="monai")
  gated = {**kwargs, "attention_gates": True}
  with pytest.raises(ValueError, match=r"no MONAI DynUNet name for the medjax variable params/gate0/"):
    mapping.to_torch(family, random_variables(family, name, gated, c_in), name, gated)


def test_public_entry_binds_one_dynunet_mapping_to_any_strides():
  """`transfer.from_torch / to_torch(..., source="monai")`: the registered DynUNet mapping takes anisotropic
  strides from the model kwargs on export and off the up-convolutions on import; exact both ways."""
  assert {("monai", m) for m in ("unetr", "swin_unetr", "unet", "densenet121")} <= set(transfer.supported())
  kwargs = {"spatial_dims": 3, "num_classes": 2, "features": (2, 4, 8), "strides": ((1, 2, 2), (2, 2, 2)),
            "kernel_size": ((1, 3, 3), 3, 3), "residual": True, "decoder_residual": False,
            "decoder_kernel_from_below": True, "norm": "batch"}
  variables = random_variables(transfer.family("unet", "monai"), "unet", kwargs, 1)
  sd = transfer.to_torch(variables, "unet", kwargs, source="monai")
  assert sd["upsamples.1.transp_conv.conv.weight"].shape == (4, 2, 1, 2, 2)  # transition 0: (1, 2, 2)
  assert sd["upsamples.0.transp_conv.conv.weight"].shape == (8, 4, 2, 2, 2)
  assert np.array_equal(sd["skip_layers.next_layer.next_layer.conv1.conv.weight"], sd["bottleneck.conv1.conv.weight"])
  # The architecture, strides included, is read off the dict.
  transfer_testing.assert_exact_round_trip(None, sd, variables, "unet", export_kwargs=kwargs, source="monai")
  # The UNet's default strides (2 per transition) where the kwargs leave them out.
  plain = {k: v for k, v in kwargs.items() if k not in ("strides", "kernel_size")}
  sd = transfer.to_torch(random_variables(transfer.family("unet", "monai"), "unet", plain, 1), "unet", plain,
                         source="monai")
  assert sd["upsamples.1.transp_conv.conv.weight"].shape == (4, 2, 2, 2, 2)


# ---------------------------------------------------------------------------------------- with torch and MONAI

PEER_MODULES = ("monai",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def _randomise_norms(torch, model):
  """Random affine parameters and running statistics on every norm MONAI uses (its 1 / 0 would hide mix-ups), and
  relative position biases large enough that an index mix-up shows."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, module in model.named_modules():
      if getattr(module, "relative_position_bias_table", None) is not None:
        module.relative_position_bias_table.normal_(0.0, 1.0)
      if "norm_cross_attn" in name:  # unused by MONAI, exported with its initial values
        continue
      if getattr(module, "weight", None) is not None and isinstance(
          module, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.modules.instancenorm._InstanceNorm)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
      if getattr(module, "running_mean", None) is not None:
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _check(torch, model_name, net, x, model_kwargs=None, build_kwargs=None):
  """MONAI `net` and the converted medjax model agree on `x` (B, C, *spatial); the export loads strictly. Through
  the registered family, bound to the network's configuration by the kwargs it reads off the state dict."""
  family = transfer.family(model_name, "monai")
  state_dict, expected = transfer_testing.torch_state_and_outputs(torch, net, x)
  variables = transfer.from_torch(state_dict, model_name, model_kwargs, source="monai")
  kwargs = family.model_kwargs(state_dict, dict(model_kwargs or {}))
  model = models.build_model(model_name, {**kwargs, **(build_kwargs or {})})
  logits, _ = model.apply(variables, np.moveaxis(x, 1, -1), train=False)
  np.testing.assert_allclose(np.moveaxis(np.asarray(logits), -1, 1), expected, rtol=1e-4, atol=1e-4)
  exported = transfer.to_torch(variables, model_name, kwargs, source="monai")
  transfer_testing.assert_export_loads_strictly(torch, net, state_dict, exported)


def test_unetr_matches_monai(torch_one_thread):
  torch = torch_one_thread
  from monai.networks.nets import UNETR
  torch.manual_seed(0)
  net = _randomise_norms(torch, UNETR(2, 3, img_size=(32, 48, 32), feature_size=4, hidden_size=24, mlp_dim=48,
                                      num_heads=4, norm_name=("instance", {"affine": True})))
  x = np.random.default_rng(0).normal(size=(1, 2, 32, 48, 32)).astype(np.float32)
  _check(torch, "unetr", net, x, {"num_heads": 4, "image_size": (32, 48, 32)})


def test_swin_unetr_matches_monai(torch_one_thread):
  torch = torch_one_thread
  from monai.networks.nets import SwinUNETR
  torch.manual_seed(0)
  net = _randomise_norms(torch, SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(2, 1, 1, 1),
                                          num_heads=(3, 3, 6, 6), window_size=7))
  x = np.random.default_rng(0).normal(size=(1, 1, 64, 32, 64)).astype(np.float32)
  # Stage 4 (4 x 2 x 4 tokens) has a shrunk window: MONAI's indexing of it needs monai_window_index.
  _check(torch, "swin_unetr", net, x, {"num_heads": (3, 3, 6, 6)},
         {"monai_window_index": True})


def test_dynunet_matches_monai(torch_one_thread):
  torch = torch_one_thread
  from monai.networks.nets import DynUNet
  torch.manual_seed(0)
  strides = [1, (1, 2, 2), 2]
  net = _randomise_norms(torch, DynUNet(3, 1, 3, kernel_size=[3, (1, 3, 3), 3], strides=strides,
                                        upsample_kernel_size=strides[1:], filters=[8, 16, 24], res_block=True,
                                        deep_supervision=True, deep_supr_num=1))
  x = np.random.default_rng(0).normal(size=(1, 1, 32, 48, 40)).astype(np.float32)
  _check(torch, "unet", net, x)


def test_dynunet_2d_batch_norm_matches_monai(torch_one_thread):
  torch = torch_one_thread
  from monai.networks.nets import DynUNet
  torch.manual_seed(0)
  net = _randomise_norms(torch, DynUNet(2, 2, 3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                        upsample_kernel_size=[2, 2, 2], filters=[4, 8, 8, 16], norm_name="batch",
                                        trans_bias=True, deep_supervision=True, deep_supr_num=2))
  x = np.random.default_rng(0).normal(size=(2, 2, 40, 24)).astype(np.float32)
  _check(torch, "unet", net, x)


@pytest.mark.parametrize("spatial", [(40, 56), (32, 40, 36)])
def test_densenet121_matches_monai(torch_one_thread, spatial):
  torch = torch_one_thread
  from monai.networks.nets import DenseNet121
  torch.manual_seed(0)
  net = _randomise_norms(torch, DenseNet121(spatial_dims=len(spatial), in_channels=2, out_channels=5,
                                            init_features=8, growth_rate=4, block_config=(2, 3, 2)))
  x = np.random.default_rng(0).normal(size=(2, 2, *spatial)).astype(np.float32)
  _check(torch, "densenet121", net, x)
