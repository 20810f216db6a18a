"""Shared test geometry for tests/data/io."""

import numpy as np


def oblique_affine(spacing_zyx=(3.0, 0.8, 0.6), flip_lps=False):
  """A rotated (not axis-aligned) affine with anisotropic spacing; columns are (x, y, z) voxel steps."""
  a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
  rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
  rotation = rz @ rx
  if flip_lps:
    rotation = np.diag([-1.0, -1.0, 1.0]) @ rotation
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag(spacing_zyx[::-1])
  affine[:3, 3] = [-101.25, 37.5, 12.3]
  return affine
