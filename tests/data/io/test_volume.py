"""The Volume, canonical reorientation and the shared checks."""


import numpy as np
import pytest

from medjax.data import io
from tests.data.io import io_testing

nib = pytest.importorskip("nibabel")


# ------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("channels", [False, True])
def test_canonical_and_undo_are_exact(channels):
  affine = io_testing.oblique_affine(flip_lps=True)
  assert io.orientation_codes(affine) != ("R", "A", "S")
  shape = (5, 6, 7, 2) if channels else (5, 6, 7)
  array = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  volume = io.Volume.from_array(array, affine=affine)
  canonical, undo = io.to_canonical(volume)
  assert io.orientation_codes(canonical.affine) == ("R", "A", "S")
  # Same voxels at the same world positions: check one voxel through both affines.
  z, y, x = 1, 2, 3
  world = volume.affine @ [x, y, z, 1]
  zc, yc, xc = np.round(np.linalg.solve(canonical.affine, world)[:3][::-1]).astype(int)
  np.testing.assert_allclose(np.linalg.solve(canonical.affine, world)[:3][::-1], (zc, yc, xc), atol=1e-9)
  np.testing.assert_array_equal(canonical.array[zc, yc, xc], array[z, y, x])
  assert sorted(canonical.spacing_mm) == pytest.approx(sorted(volume.spacing_mm))
  back = undo(canonical)
  np.testing.assert_array_equal(back.array, array)
  np.testing.assert_array_equal(back.affine, affine)
  assert back.spacing_mm == volume.spacing_mm
  # undo also takes a bare array in the canonical grid, e.g. a prediction.
  np.testing.assert_array_equal(undo(canonical.array).array, array)
  with pytest.raises(ValueError, match="spatial shape"):
    undo(np.zeros((1, 2, 3)))


def test_lps_axis_aligned_to_canonical():
  affine = np.diag([-0.7, -0.7, 2.0, 1.0])  # LPS
  array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
  canonical, undo = io.to_canonical(io.Volume.from_array(array, affine=affine))
  np.testing.assert_array_equal(canonical.array, array[:, ::-1, ::-1])
  assert np.all(np.diag(canonical.affine)[:3] > 0)
  np.testing.assert_array_equal(undo(canonical).array, array)



# ---------------------------------------------------------------------------------------------- checks


def test_check_pair():
  affine = io_testing.oblique_affine()
  image = io.Volume.from_array(np.zeros((4, 5, 6, 2), np.float32), affine=affine)
  label = io.Volume.from_array(np.zeros((4, 5, 6), np.uint8), affine=affine + 5e-5 * np.eye(4))
  io.check_pair(image, label, "case_007")  # channels ignored, float32-level differences tolerated
  with pytest.raises(ValueError, match=r"case case_007: image spatial shape \(4, 5, 6\).*\(4, 5, 7\)"):
    io.check_pair(image, io.Volume.from_array(np.zeros((4, 5, 7), np.uint8), affine=affine), "case_007")
  moved = affine.copy()
  moved[0, 3] += 0.5
  with pytest.raises(ValueError, match="case case_007: image and label affines differ"):
    io.check_pair(image, io.Volume.from_array(np.zeros((4, 5, 6), np.uint8), affine=moved), "case_007")


def test_check_finite():
  io.check_finite(np.zeros((3, 3, 3), np.float32), "ok")
  io.check_finite(np.zeros((3, 3, 3), np.int16), "ints")
  array = np.zeros((3, 4, 5), np.float32)
  array[1, 2, 3] = np.nan
  array[2, 0, 0] = np.inf
  with pytest.raises(ValueError, match=r"case_3/image: 1 NaN and 1 inf voxels of 60 \(first at index \(1, 2, 3\)\)"):
    io.check_finite(array, "case_3/image")


def test_xform_codes_default_travel_and_are_checked():
  volume = io.Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0), np.eye(4))
  assert volume.xform_codes is None and io.Volume.from_array(np.zeros((2, 3, 4))).xform_codes is None
  coded = io.Volume.from_array(np.zeros((2, 3, 4)), affine=np.diag([-1.0, -1.0, 2.0, 1.0]), xform_codes=(2, 1))
  assert coded.replace(array=np.ones((2, 3, 4))).xform_codes == (2, 1)
  canonical, undo = io.to_canonical(coded)
  assert canonical.xform_codes == (2, 1) and undo(canonical).xform_codes == (2, 1)
  for bad in ((2,), (1, 7), (True, 1), 2):
    with pytest.raises(ValueError, match=r"Volume.xform_codes must be None or \(sform_code, qform_code\)"):
      io.Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0), np.eye(4), bad)
