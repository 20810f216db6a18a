"""Attribution: where a model looked, for images and volumes (issue 20, in progress).

Every method takes `(model, variables, images, target, **options)` and returns maps at input resolution;
`targets` says what is explained (a class logit, or a class region of a segmentation).
"""

from medjax.interpret.targets import RegionTarget, score_fn, scores

__all__ = ["RegionTarget", "score_fn", "scores"]
