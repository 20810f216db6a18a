"""Shared helpers of the loss tests."""

import numpy as np


def confident_logits(labels, num_classes: int, scale: float) -> np.ndarray:
  """Logits (*labels.shape, num_classes) float32 of +scale on each voxel's label and -scale elsewhere: a
  prediction as sure and as right as `scale` makes it."""
  return scale * (np.eye(num_classes)[labels] * 2 - 1).astype(np.float32)
