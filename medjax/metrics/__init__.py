"""Metrics: on-device per-example statistics and host-side summaries.

Device side (jittable, inside the eval step): small per-example statistics such as per-class voxel counts
or confusion counts, so only a few numbers per case leave the accelerator. Host side (numpy): metrics over
the whole split, computed from the concatenated statistics, so they are exact across devices and batches.
Empty-mask conventions of the segmentation metrics: `medjax.metrics.overlap`.
"""

from medjax.metrics.calibration import calibration_curve, confidence_and_correct, expected_calibration_error
from medjax.metrics.classification import (accuracy, balanced_accuracy, classification_metrics, cohen_kappa,
                                           confusion_matrix, f1, fbeta, fbeta_per_class, fdr, fnr, fpr,
                                           informedness, markedness, matthews_corrcoef, mcc, mcc_from_confusion,
                                           npv, per_class_metrics, precision, recall, roc_auc_ovr, sensitivity,
                                           specificity)
from medjax.metrics.counts import confusion_counts
from medjax.metrics.overlap import (dice_per_case, generalized_dice_score, iou_per_case,
                                    multilabel_segmentation_counts, segmentation_counts)
from medjax.metrics.ranking import average_precision, operating_point, pr_curve, roc_auc, roc_curve
from medjax.metrics.regression import regression_metrics
from medjax.metrics.segmentation import (average_surface_distance, binary_case_metrics, hausdorff_distance,
                                         multilabel_case_metrics, normalized_surface_dice,
                                         segmentation_case_metrics, surface_distances)
from medjax.metrics.statistics import bootstrap_ci, subgroup_report

__all__ = [
    "accuracy", "average_precision", "average_surface_distance", "balanced_accuracy", "binary_case_metrics",
    "bootstrap_ci", "calibration_curve", "classification_metrics", "cohen_kappa", "confidence_and_correct",
    "confusion_counts", "confusion_matrix", "dice_per_case", "expected_calibration_error", "f1", "fbeta",
    "fbeta_per_class", "fdr", "fnr", "fpr", "generalized_dice_score", "hausdorff_distance", "informedness",
    "iou_per_case", "markedness", "matthews_corrcoef", "mcc", "mcc_from_confusion", "multilabel_case_metrics",
    "multilabel_segmentation_counts", "normalized_surface_dice", "npv", "operating_point", "per_class_metrics",
    "pr_curve", "precision", "recall", "regression_metrics", "roc_auc", "roc_auc_ovr", "roc_curve",
    "segmentation_case_metrics", "segmentation_counts", "sensitivity", "specificity", "subgroup_report",
    "surface_distances",
]
