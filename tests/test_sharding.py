"""Meshes, sharding presets, and batches split over devices (8 fake CPU devices from conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medjax import sharding


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("spec, shape", [((("data", -1),), (8,)), ((("data", 1),), (1,)),
                                         ((("data", -1), ("model", 2)), (4, 2)), ((("data", 4),), (4,))])
def test_make_mesh(spec, shape):
  mesh = sharding.make_mesh(spec)
  assert tuple(mesh.devices.shape) == shape


@pytest.mark.parametrize("spec, pattern", [((("model", -1),), "must have a 'data' axis"),
                                           ((("data", 3),), "needs a multiple of 3 devices"),
                                           ((("data", -1), ("x", -1)), "at most one axis"),
                                           ((("data", 0),), "size: int >= 1 or -1")])
def test_bad_mesh_spec(spec, pattern):
  with pytest.raises(ValueError, match=pattern):
    sharding.make_mesh(spec)


def test_fsdp_spec_shards_largest_divisible_dim():
  mesh = sharding.make_mesh((("data", -1),))
  assert sharding.fsdp_spec((3, 3, 16, 32), mesh) == P(None, None, None, "data")
  assert sharding.fsdp_spec((3, 3, 12, 40), mesh) == P(None, None, None, "data")
  assert sharding.fsdp_spec((3, 3, 5, 7 * 13), mesh) == P()  # nothing divisible by 8: replicated
  assert sharding.fsdp_spec((16,), mesh) == P()  # small leaf: replicated
  assert sharding.data_parallel_spec((3, 3, 16, 32), mesh) == P()


def test_state_shardings_follow_shapes():
  mesh = sharding.make_mesh((("data", -1),))
  tree = {"kernel": jax.ShapeDtypeStruct((64, 32), np.float32), "bias": jax.ShapeDtypeStruct((32,), np.float32)}
  shardings = sharding.state_shardings(tree, mesh, "fsdp")
  assert shardings["kernel"].spec == P("data", None) and shardings["bias"].spec == P()


def test_host_to_global_splits_batch():
  mesh = sharding.make_mesh((("data", -1),))
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16, dtype=np.int32)}
  out = sharding.host_to_global(batch, mesh)
  assert out["image"].shape == (16, 3)
  assert len(out["image"].addressable_shards) == 8
  assert out["image"].addressable_shards[1].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])


def test_batch_not_divisible_by_data_axis_is_a_clear_error():
  mesh = sharding.make_mesh((("data", -1),))
  with pytest.raises(ValueError, match=r"config.input.batch_size=6 is not divisible by the mesh's 'data' axis \(size 8"):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.host_to_global({"image": np.zeros((6, 2), np.float32)}, mesh)
