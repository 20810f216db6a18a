"""Metrics: on-device per-example statistics and host-side summaries.

Device side (jittable, inside the eval step): small per-example statistics such as per-class voxel counts
or confusion counts, so only a few numbers per case leave the accelerator. Host side (numpy): metrics over
the whole split, computed from the concatenated statistics, so they are exact across devices and batches.
"""

from medjax.metrics.calibration import calibration_curve, confidence_and_correct, expected_calibration_error
from medjax.metrics.classification import (accuracy, balanced_accuracy, classification_metrics, cohen_kappa,
                                           confusion_matrix, f1, per_class_metrics, precision, recall, roc_auc_ovr,
                                           sensitivity, specificity)
from medjax.metrics.counts import confusion_counts
from medjax.metrics.ranking import average_precision, operating_point, pr_curve, roc_auc, roc_curve
from medjax.metrics.regression import regression_metrics
from medjax.metrics.segmentation import (average_surface_distance, dice_per_case, hausdorff_distance,
                                         segmentation_case_metrics, segmentation_counts, surface_distances)
from medjax.metrics.statistics import bootstrap_ci, subgroup_report

__all__ = [
    "accuracy", "average_precision", "average_surface_distance", "balanced_accuracy", "bootstrap_ci",
    "calibration_curve", "classification_metrics", "cohen_kappa", "confidence_and_correct",
    "confusion_counts", "confusion_matrix", "dice_per_case", "expected_calibration_error", "f1",
    "hausdorff_distance", "operating_point", "per_class_metrics", "pr_curve", "precision", "recall",
    "regression_metrics", "roc_auc", "roc_auc_ovr", "roc_curve", "segmentation_case_metrics",
    "segmentation_counts", "sensitivity", "specificity", "subgroup_report", "surface_distances",
]
