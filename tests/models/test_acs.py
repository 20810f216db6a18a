"""Tests for medjax.models.acs: ACS and 2.5D convolutions against slice-wise 2D convolutions, and the 3D
ResNets built from them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import acs
from tests.models.zoo_testing import KEY, host_variables_for, num_params, train_mode_gradients

PLANES = acs.PLANES


def _integer_array(shape, seed):
  # Small integers: every product and partial sum is exact in float32, so convolutions computed in any
  # order agree bit for bit.
  return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape), jnp.float32)


def _slicewise_reference(x, kernel, plane, strides):
  """The 2D convolution of `kernel` (k, k, C, F) over every slice of `x` (B, z, y, x, C) normal to
  `plane`, computed as a batch of 2D images: the normal axis is folded into the batch."""
  normal = acs.PLANE_NORMAL_AXIS[plane]
  in_plane = [a for a in range(3) if a != normal]
  perm = [0, 1 + normal] + [1 + a for a in in_plane] + [4]
  xs = jnp.transpose(x, perm)[:, ::strides[normal]]  # a stride along the normal axis keeps every s-th slice
  b, n, h, w, c = xs.shape
  k = kernel.shape[0]
  y = jax.lax.conv_general_dilated(xs.reshape(b * n, h, w, c), kernel, [strides[a] for a in in_plane],
                                   [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y.reshape(b, n, *y.shape[1:])
  return jnp.transpose(y, np.argsort(perm))


def test_acs_split_is_the_papers():
  assert acs.acs_split(64) == (22, 21, 21)
  assert acs.acs_split(65) == (22, 22, 21)
  assert acs.acs_split(3) == (1, 1, 1) and acs.acs_split(1) == (1, 0, 0)


@pytest.mark.parametrize("plane", PLANES)
def test_acs_one_group_equals_slicewise_2d_conv(plane):
  x = _integer_array((2, 5, 6, 7, 3), 0)
  kernel = _integer_array((3, 3, 3, 4), 1)
  split = tuple(4 if p == plane else 0 for p in PLANES)
  strides = (2, 1, 2)
  layer = acs.ACSConv(4, (3, 3, 3), strides, split=split)
  y = layer.apply({"params": {"kernel": kernel}}, x)
  np.testing.assert_array_equal(y, _slicewise_reference(x, kernel, plane, strides))
  assert y.shape == (2, 3, 6, 4, 4)


def test_acs_default_split_groups_in_plane_order_with_bias():
  x = _integer_array((1, 4, 5, 6, 2), 2)
  kernel, bias = _integer_array((3, 3, 2, 7), 3), _integer_array((7,), 4)
  y = acs.ACSConv(7, 3, 1, use_bias=True).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  assert y.shape == (1, 4, 5, 6, 7)
  bounds = np.cumsum((0,) + acs.acs_split(7))  # (3, 2, 2): axial 0..2, coronal 3..4, sagittal 5..6
  for plane, start, end in zip(PLANES, bounds[:-1], bounds[1:]):
    expected = _slicewise_reference(x, kernel[..., start:end], plane, (1, 1, 1)) + bias[start:end]
    np.testing.assert_array_equal(y[..., start:end], expected)


def test_acs_params_are_a_2d_kernel_and_shapes():
  x = jnp.ones((2, 5, 6, 7, 3))
  y, variables = jax.eval_shape(lambda x: acs.ACSConv(5, (3, 3), 2).init_with_output(KEY, x), x)
  assert jax.tree.map(lambda a: a.shape, variables) == {"params": {"kernel": (3, 3, 3, 5)}}
  assert y.shape == (2, 3, 3, 4, 5)  # ceil(n / 2) on every axis, for every group


def test_pointwise_acs_is_one_pointwise_conv():
  x, kernel = _integer_array((1, 3, 4, 5, 2), 5), _integer_array((1, 1, 2, 6), 6)
  y = acs.ACSConv(6, 1, (1, 2, 2)).apply({"params": {"kernel": kernel}}, x)
  np.testing.assert_array_equal(y, jnp.einsum("bzyxc,cf->bzyxf", x[:, :, ::2, ::2], kernel[0, 0]))


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 1)])
def test_2p5d_equals_per_slice_2d_conv(strides):
  x = _integer_array((2, 5, 6, 4, 3), 7)
  kernel = _integer_array((3, 3, 3, 4), 8)
  y = acs.SliceConv(4, 3, strides).apply({"params": {"kernel": kernel}}, x)
  # Independent of the helper above: each z-slice through lax's 2D convolution, one at a time.
  slices = [jax.lax.conv_general_dilated(x[:, z], kernel, strides[1:], [(1, 1)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for z in range(0, x.shape[1], strides[0])]
  np.testing.assert_array_equal(y, jnp.stack(slices, axis=1))


def test_conv_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"ACSConv applies 2D kernels to 3D volumes.*\(1, 6, 7, 3\)"):
    acs.ACSConv(4).init(KEY, jnp.ones((1, 6, 7, 3)))
  with pytest.raises(ValueError, match=r"SliceConv: kernel_size must be an odd k.*\(1, 3, 3\)"):
    acs.SliceConv(4, (1, 3, 3)).init(KEY, jnp.ones((1, 4, 6, 7, 3)))
  with pytest.raises(ValueError, match=r"split \(2, 2, 1\) must be three .* summing to features=4"):
    acs.ACSConv(4, split=(2, 2, 1)).init(KEY, jnp.ones((1, 4, 6, 7, 3)))


def test_conv_kind_registry():
  assert set(acs.CONV_KINDS) == {"2d", "3d", "acs", "2.5d"}
  assert acs.CONV_KINDS.get("acs") is acs.acs_conv and acs.CONV_KINDS.get("2.5d") is acs.slice_conv
  with pytest.raises(KeyError, match="Did you mean 'acs'"):
    acs.CONV_KINDS.get("asc")


def _param_shapes(name, x, **kw):
  model = models.build_model(name, dict(num_classes=1000, **kw))
  return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)["params"]


def _same_tree_and_shapes(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      u.shape == v.shape for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("depth", [18, 50])
def test_acs_and_2p5d_resnets_have_the_2d_parameter_tree(depth):
  shapes_2d = _param_shapes(f"resnet{depth}", jnp.zeros((1, 32, 32, 3)))
  volume = jnp.zeros((1, 16, 32, 32, 3))
  assert _same_tree_and_shapes(_param_shapes(f"resnet{depth}_acs", volume), shapes_2d)
  assert _same_tree_and_shapes(_param_shapes(f"resnet{depth}_2.5d", volume), shapes_2d)
  assert num_params(shapes_2d) == {18: 11_689_512, 50: 25_557_032}[depth]  # torchvision's counts
  assert num_params(_param_shapes(f"resnet{depth}", volume, spatial_dims=3)) > num_params(shapes_2d)


def test_acs_resnet_forward_and_grad_finite():
  model = models.build_model("resnet18_acs", dict(num_classes=3, width=4, small_input=True, stage_sizes=(1, 1)))
  x = jax.random.normal(KEY, (2, 6, 8, 7, 1))
  variables = host_variables_for(model, x)
  loss, logits, state, grads = train_mode_gradients(model, variables, x)
  chex.assert_shape(logits, (2, 3))
  assert np.isfinite(loss) and np.isfinite(logits).all() and np.std(logits) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads["stem_conv"]))


def test_2p5d_resnet_with_2d_weights_on_repeated_slices_equals_2d_resnet():
  # Slice-wise convolutions of identical slices give identical slices, eval-mode batch norm is per channel
  # and the pooling averages them: a 2D image repeated along z through the 2.5D ResNet with the 2D ResNet's
  # weights gives the 2D logits. This is what "2D weights load directly" has to mean.
  kw = dict(num_classes=3, width=4, stage_sizes=(1, 1))  # 7x7 stride-2 stem + max-pool, then a stride-2 stage
  model_2d, model_2p5d = models.build_model("resnet18", kw), models.build_model("resnet18_2.5d", kw)
  image = jax.random.normal(KEY, (2, 12, 10, 1))
  variables = host_variables_for(model_2d, image)
  logits_2d, _ = model_2d.apply(variables, image, train=False)
  volume = jnp.repeat(image[:, None], 5, axis=1)
  logits_2p5d, aux = model_2p5d.apply(variables, volume, train=False)
  chex.assert_shape(aux["stages"][0], (2, 2, 3, 3, 4))  # z is strided too: 5 -> 3 (stem) -> 2 (pool)
  np.testing.assert_allclose(logits_2p5d, logits_2d, rtol=1e-5, atol=1e-5)


def test_acs_resnet_refuses_2d_input():
  model = models.build_model("resnet18_acs", dict(num_classes=2, spatial_dims=2))
  with pytest.raises(ValueError, match="ACSConv applies 2D kernels to 3D volumes"):
    jax.eval_shape(lambda x: model.init(KEY, x, train=False), jnp.zeros((1, 8, 8, 1)))
