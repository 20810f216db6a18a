"""Per-example losses, selectable by name from a config (`loss = "dice_xent"` or `dict(name=..., **kw)`).

Every loss maps `(logits, labels, *, mask=None, **kwargs)` to one value per example, shape (B,) float32;
the train step averages them. All arithmetic runs in float32 whatever the compute dtype of the model.

  voxelwise   "xent" (class weights, label smoothing, ignore_index, soft targets), "bce" (pos_weight),
              "focal" (softmax), "sigmoid_focal"
  overlap     "dice" (class_weights), "dice_xent", "dice_focal", "generalized_dice", "tversky", "focal_tversky"
  multilabel  "sigmoid_dice", "sigmoid_dice_focal", "sigmoid_dice_bce": overlapping regions (BraTS), labels
              (B, *spatial, K) binary masks, one sigmoid per channel
  boundary    "boundary", "dice_boundary" (need batch["distance_map"], made on the host by
              `medjax.data.preprocess.signed_distance_maps`)
  topology    "cldice", "dice_cldice"
  regression  "l1", "l2" (= "mse"), "huber"
  contrastive `nt_xent(z1, z2)` (SimCLR), `info_nce(q, k)` (MoCo v3), `byol_loss(p, t)`, per example over the
              global batch; not (logits, labels) losses, so not in the registry (medjax.pretext calls them)
  reconstruction  `masked_patch_loss` (MAE), `restoration_loss` (Models Genesis); not in the registry either
  objective   `make_objective` (deep supervision, multi-task sums), `validate_loss_config`,
              `deep_supervision_weights`

The config format and its reserved keys are described in `medjax.losses.objective`.
"""

from medjax.losses._base import BATCH_INPUTS, LOSSES
from medjax.losses.boundary import boundary_loss, dice_boundary
from medjax.losses.contrastive import byol_loss, info_nce, nt_xent
from medjax.losses.objective import (Objective, deep_supervision_weights, downsample_nearest, make_objective,
                                     nearest_indices, validate_loss_config)
from medjax.losses.multilabel import sigmoid_dice, sigmoid_dice_bce, sigmoid_dice_focal
from medjax.losses.overlap import dice_cross_entropy, dice_focal, focal_tversky, generalized_dice, soft_dice, tversky
from medjax.losses.reconstruction import masked_patch_loss, restoration_loss
from medjax.losses.regression import huber_loss, l1_loss, l2_loss
from medjax.losses.topology import dice_cldice, soft_cldice, soft_dilate, soft_erode, soft_skeleton
from medjax.losses.voxelwise import sigmoid_binary_cross_entropy, sigmoid_focal, softmax_cross_entropy, softmax_focal

__all__ = [
    "BATCH_INPUTS", "LOSSES", "Objective", "boundary_loss", "byol_loss", "deep_supervision_weights",
    "dice_boundary", "dice_cldice", "dice_cross_entropy", "dice_focal", "downsample_nearest", "focal_tversky",
    "generalized_dice", "huber_loss", "info_nce", "l1_loss", "l2_loss", "make_objective", "masked_patch_loss",
    "nearest_indices", "nt_xent", "restoration_loss", "sigmoid_binary_cross_entropy", "sigmoid_dice",
    "sigmoid_dice_bce", "sigmoid_dice_focal", "sigmoid_focal", "soft_cldice", "soft_dice", "soft_dilate",
    "soft_erode", "soft_skeleton", "softmax_cross_entropy", "softmax_focal", "tversky", "validate_loss_config",
]
