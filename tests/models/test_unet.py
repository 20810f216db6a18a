"""Tests for medjax.models: UNet, the shared layers and build_model."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models import layers
from medjax.models.unet import UNet
from tests.models.zoo_testing import KEY, variables_and_outputs as _init_apply

SHAPES = [(12, 16), (8, 12, 16)]  # non-square on purpose


@pytest.mark.parametrize("spatial", SHAPES, ids=lambda s: f"{len(s)}d")
def test_unet_shapes_and_aux(spatial):
  nd = len(spatial)
  model = UNet(spatial_dims=nd, num_classes=3, features=(4, 8, 16), deep_supervision=1, head_classes=5)
  x = jax.random.normal(KEY, (2, *spatial, 2))
  _, (logits, aux) = _init_apply(model, x)
  chex.assert_shape(logits, (2, *spatial, 3))
  assert logits.dtype == jnp.float32
  assert set(aux) == {"bottleneck", "features", "deep_supervision", "head_logits"}
  chex.assert_shape(aux["bottleneck"], (2, *(s // 4 for s in spatial), 16))
  chex.assert_shape(aux["features"], (2, *spatial, 4))
  assert len(aux["deep_supervision"]) == 1
  chex.assert_shape(aux["deep_supervision"][0], (2, *(s // 2 for s in spatial), 3))
  assert aux["deep_supervision"][0].dtype == jnp.float32
  chex.assert_shape(aux["head_logits"], (2, 5))


def test_unet_defaults_have_only_core_aux():
  model = UNet(spatial_dims=2, num_classes=2, features=(4, 8))
  _, (logits, aux) = _init_apply(model, jnp.ones((1, 8, 12, 1)))
  chex.assert_shape(logits, (1, 8, 12, 2))
  assert set(aux) == {"bottleneck", "features"}


def test_unet_anisotropic_strides_3d():
  model = UNet(spatial_dims=3, num_classes=2, features=(4, 8, 8), strides=((1, 2, 2), 2),
               kernel_size=((1, 3, 3), 3, 3), deep_supervision=1)
  x = jnp.ones((1, 8, 12, 16, 1))
  variables, (logits, aux) = _init_apply(model, x)
  chex.assert_shape(logits, (1, 8, 12, 16, 2))
  chex.assert_shape(aux["bottleneck"], (1, 4, 3, 4, 8))
  chex.assert_shape(aux["deep_supervision"][0], (1, 8, 6, 8, 2))
  params = variables["params"]
  chex.assert_shape(params["enc0"]["conv0"]["conv"]["kernel"], (1, 3, 3, 1, 4))
  chex.assert_shape(params["up0"]["kernel"], (8, 4 * 4))  # (1, 2, 2) -> 4 offsets x 4 features


def test_unet_odd_sizes_are_cropped_back():
  model = UNet(spatial_dims=2, num_classes=2, features=(4, 8, 8))
  _, (logits, _) = _init_apply(model, jnp.ones((1, 7, 9, 1)))
  chex.assert_shape(logits, (1, 7, 9, 2))


def test_unet_bf16_compute_fp32_params():
  model = UNet(spatial_dims=2, num_classes=2, features=(4, 8), dtype=jnp.bfloat16, head_classes=2,
               norm="group")
  variables, (logits, aux) = _init_apply(model, jnp.ones((2, 12, 16, 1)))
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and aux["head_logits"].dtype == jnp.float32
  assert aux["features"].dtype == jnp.bfloat16


def test_unet_remat_matches():
  spatial = (4, 6, 8)  # remat is rank-independent; one small 3D case covers it
  kw = dict(spatial_dims=len(spatial), num_classes=2, features=(4, 8), residual=True, norm="batch")
  x = jax.random.normal(KEY, (2, *spatial, 1))
  plain, remat = UNet(**kw), UNet(**kw, remat=True)
  variables = jax.jit(lambda x: plain.init(KEY, x, train=False))(x)
  assert jax.tree.structure(variables) == jax.tree.structure(
    jax.eval_shape(lambda x: remat.init(KEY, x, train=False), x))

  def loss(params, model):
    (logits, _), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.mean(logits ** 2), logits

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, y1), g1 = grad(variables["params"], plain)
  (_, y2), g2 = grad(variables["params"], remat)
  assert np.isfinite(y1).all() and np.std(y1) > 0
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_unet_dropout_uses_dropout_stream():
  model = UNet(spatial_dims=2, num_classes=2, features=(4, 8), dropout=0.5)
  x = jax.random.normal(KEY, (1, 8, 8, 1))
  variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)
  train = jax.jit(lambda k: model.apply(variables, x, train=True, rngs={"dropout": k})[0])
  a, b = train(jax.random.key(1, impl="rbg")), train(jax.random.key(2, impl="rbg"))
  c = jax.jit(lambda v: model.apply(v, x, train=False)[0])(variables)  # eval needs no dropout rng
  assert not np.allclose(a, b) and not np.allclose(a, c)


def test_unet_errors():
  with pytest.raises(ValueError, match=r"UNet\(spatial_dims=3\) expects input \(B, z, y, x, C\)"):
    UNet(spatial_dims=3, num_classes=2, features=(4, 8)).init(KEY, jnp.ones((1, 8, 8, 1)), train=False)
  with pytest.raises(ValueError, match=r"deep_supervision=2 must be in \[0, 1\]"):
    UNet(spatial_dims=2, num_classes=2, features=(4, 8, 8), deep_supervision=2).init(
      KEY, jnp.ones((1, 8, 8, 1)), train=False)
  with pytest.raises(ValueError, match="ambiguous"):
    layers.per_stage((1, 2, 2), 3, 3, "strides")


def test_per_stage_expansion():
  assert layers.per_stage(2, 2, 3, "s") == ((2, 2, 2), (2, 2, 2))
  assert layers.per_stage((1, 2, 2), 2, 3, "s") == ((1, 2, 2), (1, 2, 2))
  assert layers.per_stage((1, 2), 2, 3, "s") == ((1, 1, 1), (2, 2, 2))
  assert layers.per_stage(((1, 2, 2), 2), 2, 3, "s") == ((1, 2, 2), (2, 2, 2))
  assert layers.per_stage((2, 2, 2), 3, 3, "s") == ((2, 2, 2),) * 3


# ---- layers ---------------------------------------------------------------------------------------------


def test_depth_to_space_known_answer():
  # (1, 1, 2, 2*2*1): channel c of pixel (0, j) goes to (c // 2, 2 * j + c % 2).
  x = jnp.arange(8.0).reshape(1, 1, 2, 4)
  y = layers.depth_to_space(x, (2, 2))
  np.testing.assert_array_equal(y[0, ..., 0], [[0, 1, 4, 5], [2, 3, 6, 7]])


@pytest.mark.parametrize("spatial,strides", [
  ((3, 5), (2, 2)), ((3, 5, 4), (1, 2, 2)), ((2, 3, 2), (2, 2, 2))])
def test_upsample_equals_transposed_conv(spatial, strides):
  x = jax.random.normal(KEY, (2, *spatial, 3))
  nd = len(spatial)
  k_t, k_b = jax.random.split(jax.random.key(1, impl="rbg"))
  kernel = jax.random.normal(k_t, (*strides, 3, 5))
  bias = jax.random.normal(k_b, (5,))
  up = layers.Upsample(5, strides)
  dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")

  @jax.jit
  def outputs(x, kernel, bias):
    # Flax ConvTranspose (transpose_kernel=False) reads the kernel taps flipped.
    ref = nn.ConvTranspose(5, strides, strides=strides, padding="VALID").apply(
      {"params": {"kernel": kernel, "bias": bias}}, x)
    ours = up.apply({"params": {"kernel": layers.upsample_kernel_from_conv_transpose(kernel),
                                "bias": bias}}, x)
    # PyTorch semantics (the gradient of a conv; lax.conv_transpose with transpose_kernel=True takes the
    # forward conv's (*s, F, C_in) kernel): output offset o reads tap o, no flip.
    ref_t = jax.lax.conv_transpose(x, jnp.swapaxes(kernel, -1, -2), strides, "VALID", dimension_numbers=dn,
                                   transpose_kernel=True) + bias
    ours_t = up.apply({"params": {"kernel": layers.upsample_kernel_from_conv_transpose(kernel, flipped=False),
                                  "bias": bias}}, x)
    return ref, ours, ref_t, ours_t

  ref, ours, ref_t, ours_t = outputs(x, kernel, bias)
  chex.assert_shape(ours, (2, *(d * s for d, s in zip(spatial, strides)), 5))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_t, ref_t, rtol=1e-5, atol=1e-5)


class _Wrap(nn.Module):
  """Binds a `make_norm` layer (train mode) so it can be initialised on its own."""
  kind: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.make_norm(self.kind, train=True, dtype=self.dtype)(x)


def test_instance_norm_is_per_sample_per_channel():
  x = jax.random.normal(KEY, (2, 4, 6, 3)) * jnp.array([1.0, 5.0, 0.1]) + 3.0
  y, variables = _Wrap("instance").init_with_output(KEY, x)
  chex.assert_shape(jax.tree.leaves(variables["params"]), [(3,), (3,)])  # per-channel affine
  np.testing.assert_allclose(jnp.mean(y, axis=(1, 2)), 0.0, atol=1e-5)
  var = np.var(x, axis=(1, 2))
  np.testing.assert_allclose(jnp.var(y, axis=(1, 2)), var / (var + layers.NORM_EPSILON), rtol=1e-4)


@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_norm_stats_float32_under_bf16(kind):
  # A large offset with small variance: bf16 statistics would lose the variance entirely.
  x = (1000.0 + jax.random.normal(KEY, (2, 4, 4, 8))).astype(jnp.bfloat16)
  (y, variables) = _Wrap(kind, jnp.bfloat16).init_with_output(KEY, x, mutable=["params", "batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  ref = _Wrap(kind).init_with_output(KEY, x.astype(jnp.float32), mutable=["params", "batch_stats"])[0]
  np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=0.1)


def test_unknown_norm_and_activation():
  with pytest.raises(ValueError, match="Unknown norm 'layer'"):
    layers.make_norm("layer", train=False)
  with pytest.raises(ValueError, match="Unknown activation 'tanhh'"):
    layers.activation("tanhh")


# ---- registry / build_model ------------------------------------------------------------------------------


def test_registry_names():
  assert {"unet", "resnet18", "resnet34", "resnet50", "resnet101"} <= set(models.MODELS.names())


def test_build_model():
  model = models.build_model("unet", dict(spatial_dims=2, num_classes=3, features=(4, 8)))
  assert isinstance(model, UNet) and model.features == (4, 8)


def test_build_model_unknown_name():
  with pytest.raises(KeyError, match="Did you mean 'unet'"):
    models.build_model("unte", {})


def test_build_model_bad_kwarg():
  with pytest.raises(ValueError, match=r"config\.model: unknown key 'featurs' for model 'unet'\. Did you mean 'features'.*Accepted keys"):
    models.build_model("unet", dict(spatial_dims=2, num_classes=3, featurs=(4, 8)))
  with pytest.raises(ValueError, match="cannot build model 'unet'.*num_classes"):
    models.build_model("unet", dict(spatial_dims=2))


def test_nnunet_style_parameter_count_matches_monai_dynunet():
  """MONAI DynUNet, filters 32..320, 6 levels, 3 classes, instance norm, 1 input channel: 31,181,763.

  Ours has 31,190,243 (+0.03%); part of the gap is the bias our upsampling layers carry (800 parameters).
  """
  model = models.build_model("unet", dict(spatial_dims=3, num_classes=3, features=(32, 64, 128, 256, 320, 320)))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 128, 1)),
                                                train=False))
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert abs(count - 31_181_763) / 31_181_763 < 0.01, count


@pytest.mark.parametrize("shape", [(12, 16), (8, 12, 16)])
def test_attention_unet_exposes_gate_maps(shape):
  model = models.build_model("attention_unet", dict(spatial_dims=len(shape), num_classes=2, features=(4, 8, 16)))
  x = jnp.ones((2,) + shape + (1,))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), x, train=False))
  (logits, aux) = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert logits.shape == (2,) + shape + (2,)
  assert [a.shape for a in aux["attention"]] == [(2,) + shape + (1,),
                                                 (2,) + tuple(n // 2 for n in shape) + (1,)]
  assert "gate0" in variables["params"] and "gate1" in variables["params"]


def test_attention_gate_values_in_unit_interval():
  model = models.build_model("attention_unet", dict(spatial_dims=2, num_classes=2, features=(4, 8), norm="instance"))
  x = jax.random.normal(jax.random.key(1, impl="rbg"), (1, 8, 12, 1))
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  _, aux = model.apply(variables, x, train=False)
  gate = np.asarray(aux["attention"][0])
  assert gate.shape == (1, 8, 12, 1) and gate.min() >= 0.0 and gate.max() <= 1.0


def test_input_too_small_names_stage_and_minimum():
  model = models.build_model("unet", dict(spatial_dims=3, num_classes=2, features=(4, 8, 16, 32),
                                          strides=((1, 2, 2), 2, 2)))
  x = jnp.ones((1, 2, 16, 16, 1))
  with pytest.raises(ValueError, match=r"too small for encoder stage enc3.*at least \(4, 8, 8\) per axis"):
    jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), x, train=False))
