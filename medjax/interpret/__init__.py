"""Attribution: where a model looked, for images and volumes (issue 20, in progress).

Every method takes `(model, variables, images, target, **options)` and returns float32 maps at input
resolution, `(B, *spatial)` (or per channel where a method offers it), 2D and 3D, jitted:

  gradients   saliency, gradient_x_input, smoothgrad, integrated_gradients (five quadratures, completeness gap)
  occlusion   occlusion (N-D sliding occluder, batched)
  gradcam     grad_cam, grad_cam_plus_plus on any named submodule (`capture`: default the last feature map)
  targets     what is explained: a class logit, or a class region of a segmentation (`RegionTarget`)
"""

from medjax.interpret.gradcam import grad_cam, grad_cam_plus_plus
from medjax.interpret.gradients import (IG_METHODS, gradient_x_input, integrated_gradients, saliency,
                                        smoothgrad)
from medjax.interpret.occlusion import occlusion
from medjax.interpret.targets import RegionTarget, score_fn, scores

__all__ = ["IG_METHODS", "RegionTarget", "grad_cam", "grad_cam_plus_plus", "gradient_x_input", "integrated_gradients",
           "occlusion", "saliency", "score_fn", "scores", "smoothgrad"]
