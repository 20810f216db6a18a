"""Inference: sliding-window N-D prediction with Gaussian blending, flip TTA, ensembles, whole-case image I/O.

  sliding_window.py  `sliding_window_inference` (one jitted program, windows batched, optional mesh)
  cases.py           whole cases of many shapes on shared canvases: `place_case`, `sliding_window_planned`
  combine.py         prediction functions: `make_predict_fn`, `flip_tta`, `ensemble`; `flip_tta_apply` (evaluation)
  volume.py          `Predictor` / `predict_volume_to_nifti`: preprocessing, undoing it, LCC post-processing;
                     writes NIfTI, NRRD or MetaImage (`output_name`)
"""

from medjax.inference.cases import canvas_shape, crop_to_case, place_case, sliding_window_planned
from medjax.inference.combine import (all_flips, ensemble, ensemble_of_variables, flip_tta, flip_tta_apply,
                                     make_predict_fn)
from medjax.inference.sliding_window import (MIN_IMPORTANCE, gaussian_importance_map, sliding_window_inference,
                                             window_origins, window_starts)
from medjax.inference.volume import (PreprocessSpec, Predictor, image_inputs, keep_largest_component, label_dtype,
                                     nifti_inputs, output_name, predict_volume_to_nifti, preprocess_volume,
                                     restore_label)

__all__ = [
                                     "MIN_IMPORTANCE",
                                     "Predictor",
                                     "PreprocessSpec",
                                     "all_flips",
                                     "canvas_shape",
                                     "crop_to_case",
                                     "ensemble",
                                     "ensemble_of_variables",
                                     "flip_tta",
                                     "flip_tta_apply",
                                     "gaussian_importance_map",
                                     "image_inputs",
                                     "keep_largest_component",
                                     "label_dtype",
                                     "make_predict_fn",
                                     "nifti_inputs",
                                     "output_name",
                                     "place_case",
                                     "predict_volume_to_nifti",
                                     "preprocess_volume",
                                     "restore_label",
                                     "sliding_window_inference",
                                     "sliding_window_planned",
                                     "window_origins",
                                     "window_starts",
]
