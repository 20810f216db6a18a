"""Metrics: on-device per-example statistics and host-side summaries.

Device side (jittable, inside the eval step): small per-example statistics such as per-class voxel counts,
so only a few numbers per case leave the accelerator. Host side (numpy): metrics over the whole split,
computed from the concatenated statistics, so they are exact across devices and batches.
"""

from medjax.metrics.classification import accuracy, roc_auc, roc_auc_ovr
from medjax.metrics.segmentation import dice_per_case, segmentation_counts

__all__ = ["accuracy", "roc_auc", "roc_auc_ovr", "dice_per_case", "segmentation_counts"]
