"""Importing medjax.models registers every family, and every name builds through the registry."""

import pytest

from medjax import models

EXPECTED = {
    "unet", "attention_unet", "resnet18", "resnet34", "resnet50", "resnet101", "vgg11", "vgg11_bn", "vgg16",
    "vgg16_bn", "densenet121", "googlenet", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "vit_ti16", "vit_s16", "vit_b16",
    "vit_l16", "vit_hybrid", "unetr", "swin_unetr", "transunet", "cnn_lstm", "cnn_gnn",
}


def test_every_family_is_registered_by_importing_the_package():
  assert set(models.MODELS.names()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_model_accepts_the_documented_minimum(name):
  model = models.build_model(name, {"num_classes": 3, "spatial_dims": 3 if name in ("unetr", "swin_unetr") else 2})
  assert model.num_classes == 3
