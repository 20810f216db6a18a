"""torchvision / timm ViT <-> medjax ViT: names, exact round trips and the mismatch error without torch; with
torch, the same eval-mode logits as torchvision (square: all it takes) and timm (non-square; class token and
"gap" pooling), exact torch -> medjax -> torch trips that the torch models load strictly, and timm variants
outside the plain layout refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import models
from medjax.transfer import mapping
from medjax.transfer.vit_weights import TimmViT, TorchvisionViT
from tests.transfer import transfer_testing
from tests.transfer.transfer_testing import random_variables

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
TORCHVISION, TIMM = TorchvisionViT(), TimmViT()


def test_torchvision_and_timm_names_and_layouts():
  kwargs = {**TINY, "num_classes": 5, "image_size": 32, "patch_size": 8}
  variables = random_variables("vit_ti16", kwargs, mapping=TORCHVISION)
  params = variables["params"]
  block1 = params["transformer"]["encoder"]["block1"]
  tv = mapping.to_torch(TORCHVISION, variables, "vit_ti16")
  assert tv["conv_proj.weight"].shape == (32, 3, 8, 8)
  assert np.array_equal(tv["conv_proj.weight"], params["patch_embed"]["kernel"].transpose(3, 2, 0, 1))
  assert np.array_equal(tv["class_token"], params["transformer"]["cls_token"]) and tv["class_token"].shape == (1, 1, 32)
  assert tv["encoder.pos_embedding"].shape == (1, 17, 32)  # class token + 4 x 4 patches
  qkv = tv["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"]
  assert qkv.shape == (96, 32) and np.array_equal(qkv, block1["attn"]["qkv"]["kernel"].T)
  assert np.array_equal(tv["encoder.layers.encoder_layer_1.ln_2.weight"], block1["norm2"]["scale"])
  assert np.array_equal(tv["encoder.layers.encoder_layer_1.mlp.3.weight"], block1["mlp2"]["kernel"].T)
  assert np.array_equal(tv["heads.head.weight"], params["transformer"]["head"]["kernel"].T)
  # torchvision's ViT: 4 embedding tensors, 12 per block, final norm 2, head 2.
  assert len(tv) == 4 + 12 * 2 + 2 + 2

  timm = mapping.to_torch(TIMM, variables, "vit_ti16")
  renames = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed", "conv_proj.": "patch_embed.proj.",
             "encoder.layers.encoder_layer_": "blocks.", "ln_1": "norm1", "ln_2": "norm2", "encoder.ln.": "norm.",
             "self_attention.in_proj_": "attn.qkv.", "self_attention.out_proj": "attn.proj", "mlp.0": "mlp.fc1",
             "mlp.3": "mlp.fc2", "heads.head": "head"}
  for name, value in tv.items():
    for old, new in renames.items():
      name = name.replace(old, new)
    assert np.array_equal(timm.pop(name), value), name
  assert not timm


@pytest.mark.parametrize("family,model_name,kwargs,in_channels", [
    (TORCHVISION, "vit_ti16", {**TINY, "num_classes": 5, "image_size": 32, "patch_size": 16}, 3),
    (TORCHVISION, "vit_s16", {**TINY, "num_classes": 3, "image_size": (16, 40), "patch_size": (8, 4)}, 1),
    (TIMM, "vit_b16", {**TINY, "num_classes": 4, "image_size": (32, 48), "patch_size": 8}, 3),
    (TIMM, "vit_l16", {**TINY, "num_classes": 2, "image_size": 24, "patch_size": 8, "qkv_bias": False}, 2),
    (TIMM, "vit_b16", {**TINY, "num_classes": 2, "image_size": 16, "patch_size": 8, "classifier": "gap"}, 3),
])
def test_export_then_import_is_exact(family, model_name, kwargs, in_channels):
  variables = random_variables(model_name, kwargs, in_channels=in_channels, mapping=family)
  state_dict = mapping.to_torch(family, variables, model_name)
  # num_classes, patch_size, a square image_size, qkv_bias and the input channels are read off the state dict.
  given = {k: v for k, v in kwargs.items()
           if k not in ("num_classes", "patch_size", "qkv_bias") and not (k == "image_size" and np.ndim(v) == 0)}
  assert family.model_kwargs(state_dict, given) == kwargs
  transfer_testing.assert_exact_round_trip(family, state_dict, variables, model_name, given)


def test_mismatch_lists_missing_unexpected_and_misshaped_tensors():
  kwargs = {**TINY, "num_classes": 5, "image_size": 32, "patch_size": 8}
  state_dict = mapping.to_torch(TORCHVISION, random_variables("vit_ti16", kwargs, mapping=TORCHVISION), "vit_ti16")
  state_dict["heads.pre_logits.weight"] = np.zeros((32, 32), np.float32)  # torchvision representation_size
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(TORCHVISION, state_dict, "vit_ti16", {**TINY, "num_layers": 3, "mlp_dim": 48})
  error = info.value
  assert isinstance(error, ValueError)
  # The third block is missing (12 tensors), the MLPs of the two present ones are mis-shaped (64 vs 48).
  assert len(error.missing) == 12 and all(m[0].startswith("encoder.layers.encoder_layer_2.") for m in error.missing)
  assert ("encoder.layers.encoder_layer_2.self_attention.in_proj_weight",
          "params/transformer/encoder/block2/attn/qkv/kernel", (96, 32)) in error.missing
  assert error.unexpected == [("heads.pre_logits.weight", (32, 32))]
  assert len(error.mismatched) == 2 * 3
  assert ("encoder.layers.encoder_layer_0.mlp.0.weight", "params/transformer/encoder/block0/mlp1/kernel", (64, 32),
          (48, 32)) in error.mismatched
  message = str(error)
  assert message.startswith("the torchvision state dict does not fit medjax vit_ti16(")
  assert "12 missing, 1 unexpected, 6 mis-shaped tensors\n" in message
  assert message.endswith("  encoder.layers.encoder_layer_1.mlp.3.weight: (32, 64) -> "
                          "params/transformer/encoder/block1/mlp2/kernel: (32, 48)")

  # A wider timm model: every tensor with the hidden axis is mis-shaped, a pos_embed of another grid too.
  timm_dict = mapping.to_torch(TIMM, random_variables("vit_ti16", kwargs, mapping=TIMM), "vit_ti16")
  timm_dict["fc_norm.weight"] = np.ones(32, np.float32)  # timm's avg-pool fc_norm layout is refused
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(TIMM, timm_dict, "vit_ti16", {**TINY, "hidden_size": 48, "image_size": 40})
  error = info.value
  assert not error.missing and error.unexpected == [("fc_norm.weight", (32,))]
  assert ("patch_embed.proj.weight", "params/patch_embed/kernel", (32, 3, 8, 8), (48, 3, 8, 8)) in error.mismatched
  assert ("pos_embed", "params/transformer/encoder/pos_embedding", (1, 17, 32), (1, 26, 48)) in error.mismatched
  assert ("blocks.1.attn.qkv.weight", "params/transformer/encoder/block1/attn/qkv/kernel", (96, 32),
          (144, 48)) in error.mismatched


def test_unmapped_models_and_variables_are_refused():
  with pytest.raises(ValueError, match=r"no timm mapping of TimmViT for model 'vit_hybrid'"):
    mapping.from_torch(TIMM, {}, "vit_hybrid")
  with pytest.raises(ValueError, match=r"^no torchvision name for the medjax variable params/transformer/x/kernel$"):
    TORCHVISION.torch_key(("params", "transformer", "x", "kernel"))


# ---------------------------------------------------------------------------------------- with torch

PEER_MODULES = ("torchvision",)  # the torch_one_thread fixture (tests/conftest.py) skips without them


def _randomise(torch, model):
  """Random values in every parameter: torch's LayerNorm 1 / 0, torchvision's zero class token and head would
  hide swapped scales/biases or a misplaced class token."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_layer_norm = "norm" in name or ".ln" in name
      if is_layer_norm and name.endswith("weight"):
        param.uniform_(0.5, 1.5)
      elif is_layer_norm:
        param.normal_(0.0, 0.2)
      elif name in ("class_token", "cls_token", "encoder.pos_embedding", "pos_embed"):
        param.normal_(0.0, 0.5)
      else:
        param.normal_(0.0, 0.1)
  return model.eval()


def _check_against_torch(torch, family, model, model_name, image_size, given_kwargs):
  x = np.random.default_rng(0).normal(size=(2, 3, *image_size)).astype(np.float32)  # (B, C, H, W)
  state_dict, expected = transfer_testing.torch_state_and_outputs(torch, model, x)

  variables = mapping.from_torch(family, state_dict, model_name, given_kwargs)
  kwargs = family.model_kwargs(state_dict, given_kwargs)
  logits, _ = models.build_model(model_name, kwargs).apply(variables, x.transpose(0, 2, 3, 1), train=False)
  assert logits.shape == (2, 5)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)

  exported = mapping.to_torch(family, variables, model_name)
  transfer_testing.assert_export_loads_strictly(torch, model, state_dict, exported)


def test_same_eval_logits_as_torchvision_and_exact_round_trip(torch_one_thread):
  import torchvision
  torch = torch_one_thread
  torch.manual_seed(0)
  # torchvision's ViT takes square inputs of exactly image_size only.
  model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                               mlp_dim=64, num_classes=5)
  # image_size, patch_size and num_classes are read off the state dict.
  _check_against_torch(torch, TORCHVISION, _randomise(torch, model), "vit_b16", (32, 32), TINY)


@pytest.mark.parametrize("timm_kwargs,medjax_kwargs", [
    ({}, {}),
    # No class token, mean over the final-normed tokens without fc_norm: medjax classifier="gap".
    ({"class_token": False, "global_pool": "avg", "fc_norm": False}, {"classifier": "gap"}),
])
def test_same_eval_logits_as_timm_at_a_non_square_input_and_exact_round_trip(torch_one_thread, timm_kwargs,
                                                                            medjax_kwargs):
  pytest.importorskip("timm")
  from timm.models.vision_transformer import VisionTransformer
  torch = torch_one_thread
  torch.manual_seed(0)
  model = VisionTransformer(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                            num_classes=5, **timm_kwargs)
  _check_against_torch(torch, TIMM, _randomise(torch, model), "vit_s16", (32, 48),
                       {**TINY, "image_size": (32, 48), **medjax_kwargs})


@pytest.mark.parametrize("timm_kwargs,unexpected,missing,mismatched", [
    ({"global_pool": "avg"}, ["fc_norm.bias", "fc_norm.weight"], ["norm.bias", "norm.weight"], []),
    ({"pre_norm": True}, ["norm_pre.bias", "norm_pre.weight"], ["patch_embed.proj.bias"], []),
    ({"init_values": 0.1}, ["blocks.0.ls1.gamma", "blocks.0.ls2.gamma"], [], []),
    ({"no_embed_class": True}, [], [], ["pos_embed"]),
    ({"qk_norm": True}, ["blocks.0.attn.k_norm.bias", "blocks.0.attn.k_norm.weight", "blocks.0.attn.q_norm.bias",
                         "blocks.0.attn.q_norm.weight"], [], []),
])
def test_timm_variants_other_than_the_plain_layout_are_refused(torch_one_thread, timm_kwargs, unexpected, missing,
                                                               mismatched):
  pytest.importorskip("timm")
  from timm.models.vision_transformer import VisionTransformer
  model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, mlp_ratio=2, num_classes=5,
                            **timm_kwargs)
  state_dict = {name: value.numpy() for name, value in model.state_dict().items()}
  with pytest.raises(mapping.WeightMismatchError) as info:
    mapping.from_torch(TIMM, state_dict, "vit_s16", {**TINY, "num_layers": 1, "image_size": 32})
  error = info.value
  assert [u[0] for u in error.unexpected] == unexpected and [m[0] for m in error.missing] == missing
  assert [m[0] for m in error.mismatched] == mismatched
