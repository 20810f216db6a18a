"""Inference: sliding-window N-D prediction with Gaussian blending, flip TTA, ensembles, whole-case NIfTI I/O.

  sliding_window.py  `sliding_window_inference` (one jitted program, windows batched, optional mesh)
  combine.py         prediction functions: `make_predict_fn`, `flip_tta`, `ensemble`; `flip_tta_apply` (evaluation)
  volume.py          `Predictor` / `predict_volume_to_nifti`: preprocessing, undoing it, LCC post-processing
"""

from medjax.inference.combine import (all_flips, ensemble, ensemble_of_variables, flip_tta, flip_tta_apply,
                                     make_predict_fn)
from medjax.inference.sliding_window import (MIN_IMPORTANCE, gaussian_importance_map, sliding_window_inference,
                                             window_origins, window_starts)
from medjax.inference.volume import (PreprocessSpec, Predictor, keep_largest_component, label_dtype,
                                     nifti_inputs, predict_volume_to_nifti, preprocess_volume, restore_label)

__all__ = [
    "MIN_IMPORTANCE", "Predictor", "PreprocessSpec", "all_flips", "ensemble", "ensemble_of_variables", "flip_tta",
    "flip_tta_apply", "gaussian_importance_map", "keep_largest_component", "label_dtype", "make_predict_fn",
    "nifti_inputs", "predict_volume_to_nifti", "preprocess_volume", "restore_label", "sliding_window_inference",
    "window_origins", "window_starts",
]
