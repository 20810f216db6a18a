"""Model families and their registry.

`build_model(name, kwargs)` instantiates a registered model from a config (`config.model_name`,
`config.model`). Importing this package imports every model file, so the registry is complete.
Every model's `__call__(x, *, train)` takes channels-last `(B, *spatial, C)` input and returns
`(outputs, aux)`; see DESIGN.md.
"""

from medjax.models.base import MODELS, build_model
# Imported for their registrations (each file registers its models in MODELS).
from medjax.models import (acs, densenet, efficientnet, graph, inception, mobilenet, resnet, sequence,  # noqa: F401
                           shufflenet, swin_unetr, transunet, unet, unetr, vgg, vit)
from medjax.models import fusion  # noqa: F401  (registers "fusion"; its encoders are looked up by name at call time)
from medjax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50, ResNet101
from medjax.models.unet import UNet

__all__ = ["MODELS", "ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "UNet", "build_model"]
