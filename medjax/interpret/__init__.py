"""Attribution: where a model looked, for images and volumes, with the sanity checks the literature asks for.

Every method takes `(model, variables, images, target, **options)` and returns float32 maps at input
resolution, `(B, *spatial)` (or per channel where a method offers it), 2D and 3D, jitted:

  gradients   saliency, gradient_x_input, smoothgrad, integrated_gradients (five quadratures, completeness gap)
  occlusion   occlusion (N-D sliding occluder, batched)
  gradcam     grad_cam, grad_cam_plus_plus on any named submodule (`capture`: default the last feature map)
  rollout     attention_rollout (Abnar and Zuidema 2020; gradient_weighted: Chefer et al. 2021), ViT family, hybrids
  targets     what is explained: a class logit, or a class region of a segmentation (`RegionTarget`)
  methods     the methods by name with input-scaled defaults; `explain(name, ..., mesh=)` shards the batch
  sanity      Spearman rank correlation, cascading / independent parameter randomisation, deletion / insertion
              curves (Adebayo et al. 2018; Petsiuk et al. 2018)
  figures     image | map | overlay PNGs, 3D as three orthogonal slices through the map's peak
"""

from medjax.interpret.gradcam import grad_cam, grad_cam_plus_plus
from medjax.interpret.gradients import (IG_METHODS, gradient_x_input, integrated_gradients, saliency,
                                        smoothgrad)
from medjax.interpret.methods import METHODS, explain
from medjax.interpret.occlusion import occlusion
from medjax.interpret.rollout import attention_rollout
from medjax.interpret.sanity import (CascadeResult, cascading_randomization, compare_maps, deletion_insertion,
                                     gaussian_blur, parameter_groups, random_map, randomize, spearman)
from medjax.interpret.targets import RegionTarget, score_fn, scores

__all__ = ["IG_METHODS", "METHODS", "CascadeResult", "RegionTarget", "attention_rollout", "cascading_randomization",
           "compare_maps", "deletion_insertion", "explain", "gaussian_blur", "grad_cam", "grad_cam_plus_plus",
           "gradient_x_input", "integrated_gradients", "occlusion", "parameter_groups", "random_map", "randomize",
           "saliency", "score_fn", "scores", "smoothgrad", "spearman"]
