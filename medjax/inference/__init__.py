"""Inference: sliding-window N-D prediction with Gaussian blending, flip TTA, ensembles, whole-case NIfTI I/O.

  sliding_window.py  `sliding_window_inference` (one jitted program, windows batched, optional mesh)
  cases.py           whole cases of many shapes on shared canvases: `place_case`, `sliding_window_planned`
  combine.py         prediction functions: `make_predict_fn`, `flip_tta`, `ensemble`; `flip_tta_apply` (evaluation)
  volume.py          `Predictor` / `predict_volume_to_nifti`: preprocessing, undoing it, LCC post-processing
"""

from medjax.inference.cases import canvas_shape, crop_to_case, place_case, sliding_window_planned
from medjax.inference.combine import (all_flips, ensemble, ensemble_of_variables, flip_tta, flip_tta_apply,
                                     make_predict_fn)
from medjax.inference.sliding_window import (MIN_IMPORTANCE, gaussian_importance_map, sliding_window_inference,
                                             window_origins, window_starts)
from medjax.inference.volume import (PreprocessSpec, Predictor, keep_largest_component, label_dtype,
                                     nifti_inputs, predict_volume_to_nifti, preprocess_volume, restore_label)

__all__ = [
    "MIN_IMPORTANCE", "Predictor", "PreprocessSpec", "all_flips", "canvas_shape", "crop_to_case", "ensemble",
    "ensemble_of_variables", "flip_tta", "flip_tta_apply", "gaussian_importance_map", "keep_largest_component",
    "label_dtype", "make_predict_fn", "nifti_inputs", "place_case", "predict_volume_to_nifti", "preprocess_volume",
    "restore_label", "sliding_window_inference", "sliding_window_planned", "window_origins", "window_starts",
]
