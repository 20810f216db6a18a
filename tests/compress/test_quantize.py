"""Quantization through Qwix: the QAT forward equals an integer reference to one accumulator LSB (dense, 2D and 3D
convs), QAT trains in the one train step, the int8 model of a trained ResNet agrees with the float one and runs
int8 convolutions, and the options (exclude, per-tensor, minmax, storage count, errors) do what they say."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import losses, models, steps
from medjax.compress import quantize
from medjax.train_state import TrainState

RESNET = dict(num_classes=2, width=8, small_input=True)
# Qwix 0.1.8 calls a deprecated Flax alias (nnx.VariableState) on every parameter lookup.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")


# ---- options ----------------------------------------------------------------------------------------------


def test_parse_fills_defaults_and_names_the_key_of_every_error():
  assert quantize.parse({}) == quantize.DEFAULTS
  assert quantize.parse(dict(mode="qat", act_bits=None, weight_bits=4))["act_bits"] is None
  bad = [
      (dict(bits=8), "unknown key 'bits'. Did you mean 'act_bits'?"),
      (dict(mode="int8"), "config.quantization.mode must be one of ('ptq', 'qat')"),
      (dict(weight_bits=16, act_bits=16), "config.quantization.weight_bits must be an int from 2 to 8"),
      (dict(mode="qat", weight_bits=4), "4 bits and fewer are stored as int4"),
      (dict(act_bits=None), "config.quantization.act_bits must equal weight_bits (8) in mode 'ptq'"),
      (dict(per_channel="yes"), "config.quantization.per_channel must be True or False"),
      (dict(calibration="percentile"), "config.quantization.calibration must be 'absmax'"),
      (dict(calibration="absmax,0"), "the range factor must be > 0"),
      (dict(calibration_batches=0), "config.quantization.calibration_batches must be an int >= 1"),
      (dict(exclude="head"), "config.quantization.exclude must be a list of module-path regexes"),
      (dict(exclude=("stem[",)), "config.quantization.exclude: 'stem[' is not a regular expression"),
  ]
  for given, message in bad:
    with pytest.raises(ValueError) as error:
      quantize.parse(given)
    assert message in str(error.value), given


def test_rules_leave_excluded_paths_float_and_quantize_convs_and_dense_layers():
  first, last = quantize.rules(dict(mode="qat", exclude=("head",), weight_bits=6, act_bits=8))
  assert (first.module_path, first.weight_qtype, first.act_qtype) == ("head", None, None)
  assert (last.module_path, last.weight_qtype, last.act_qtype) == (".*", "int6", jnp.int8)
  assert set(last.op_names) == {"conv_general_dilated", "dot_general"} and not last.act_static_scale
  assert quantize.rules({}, static_activations=True)[-1].act_static_scale


# ---- the integer reference and the LSB test --------------------------------------------------------------


def test_reference_quantize_known_answer():
  # absmax 2 -> scale 2 / 127.5; 0.5 / s = 31.875 -> 32, -1 / s = -63.75 -> -64, the max saturates at 127.
  q, scale = quantize.reference_quantize(jnp.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]), 8, keep_axes=(0,))
  np.testing.assert_array_equal(q, [[32, -64, 127], [0, 0, 0]])
  np.testing.assert_allclose(scale[:, 0], [2 / 127.5, 1.0], rtol=1e-7)  # an all-zero row gets scale 1
  q6, _ = quantize.reference_quantize(jnp.array([3.1, -0.4]), 6, keep_axes=())  # 6 bits: +-31.5, clip [-32, 31]
  np.testing.assert_array_equal(q6, [31, -4])


LAYERS = {
    # name: (module, input shape, reference keyword arguments)
    "dense": (nn.Dense(5), (3, 11), {}),
    "conv2d": (nn.Conv(6, (3, 2), strides=(2, 1), padding=[(1, 1), (0, 1)], feature_group_count=2), (2, 9, 7, 4),
               dict(strides=(2, 1), padding=[(1, 1), (0, 1)], groups=2)),
    "conv3d": (nn.Conv(4, (1, 3, 3), strides=(1, 2, 2), padding=[(0, 0), (1, 1), (1, 1)]), (2, 3, 6, 5, 2),
               dict(strides=(1, 2, 2), padding=[(0, 0), (1, 1), (1, 1)])),
}


@pytest.mark.parametrize("layer,bits,per_channel", [("dense", 8, True), ("conv2d", 8, True), ("conv3d", 8, True),
                                                    ("conv2d", 8, False), ("conv3d", 6, True)])
def test_qat_forward_is_the_integer_layer_to_one_lsb(layer, bits, per_channel):
  module, shape, conv_kwargs = LAYERS[layer]
  x = jax.random.normal(jax.random.key(0), shape) * 3.0
  variables = module.init(jax.random.key(1), x)
  bias = jax.random.normal(jax.random.key(2), variables["params"]["bias"].shape)
  variables = {"params": {**variables["params"], "bias": bias}}
  options = dict(mode="qat", weight_bits=bits, act_bits=bits, per_channel=per_channel)
  fake_quant = quantize.qat_model(module, options).apply(variables, x)
  reference, lsb = quantize.reference_forward(x, variables["params"]["kernel"], bias, weight_bits=bits,
                                              act_bits=bits, per_channel=per_channel, **conv_kwargs)
  lsb = jnp.broadcast_to(lsb, reference.shape)
  assert fake_quant.shape == reference.shape
  assert bool(jnp.all(jnp.abs(fake_quant - reference) <= lsb)), float(jnp.max(jnp.abs(fake_quant - reference) / lsb))
  # Not vacuous: the float layer is many LSBs away from both, so the rounding really happens.
  float_out = module.apply(variables, x)
  assert float(jnp.max(jnp.abs(float_out - reference) / lsb)) > 10


# ---- QAT in the train step -------------------------------------------------------------------------------


def _blobs(n, spatial, seed):
  """Two classes: a bright or a dark square in noise, `(n, *spatial, 1)` float32 and labels `(n,)`."""
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, 2, n)
  images = rng.randn(n, *spatial, 1).astype(np.float32) * 0.5
  centre = tuple(slice(s // 4, s // 4 + s // 2) for s in spatial)
  for i, label in enumerate(labels):
    images[(i,) + centre] += 1.5 if label else -1.5
  return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def _train(model, variables, spatial, steps_count, lr=3e-3):
  """`steps_count` Adam steps of medjax's train step on one batch of blobs; returns (states after each step,
  losses)."""
  images, labels = _blobs(8, spatial, seed=0)
  tx = optax.adam(lr)
  state = TrainState.create(variables=variables, tx=tx, rng=jax.random.key(0), use_ema=False)
  step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply,
                                   objective=losses.make_objective("xent", {}), tx=tx))
  states, history = [], []
  for _ in range(steps_count):
    state, metrics = step(state, {"image": images, "label": labels})
    states.append(state)
    history.append(float(metrics["loss"]))
  return states, history


@pytest.mark.parametrize("spatial_dims", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_qat_model_trains_in_the_train_step_with_gradients_through_every_quantized_layer(spatial_dims):
  spatial = (12, 10) if spatial_dims == 2 else (6, 8, 6)
  model = models.build_model("resnet18", dict(spatial_dims=spatial_dims, norm="batch", **RESNET))
  qat = quantize.qat_model(model, dict(mode="qat"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, *spatial, 1)), train=False)
  assert jax.tree.structure(qat.init(jax.random.key(0), jnp.zeros((1, *spatial, 1)), train=False)) == \
      jax.tree.structure(variables)  # the float model's variables, nothing added

  states, history = _train(qat, variables, spatial, steps_count=6)
  before = flax.traverse_util.flatten_dict(variables["params"])
  after = flax.traverse_util.flatten_dict(states[0].params)
  kernels = [p for p in before if p[-1] == "kernel"]
  assert len(kernels) == 21  # stem, 16 block convs, 3 projections, head
  # An Adam step moves a parameter iff its gradient is non-zero: the STE passes a gradient to every kernel.
  assert all(float(jnp.abs(after[p] - before[p]).max()) > 0 for p in kernels)

  assert history[-1] < 0.7 * history[0], history
  assert int(states[-1].step) == 6


# ---- PTQ of a trained ResNet -----------------------------------------------------------------------------


@functools.cache
def _trained_resnet(spatial_dims):
  """A ResNet-18 (width 8, BatchNorm) trained for a few steps on blobs; (model, variables, spatial)."""
  spatial = (12, 10) if spatial_dims == 2 else (6, 8, 6)
  model = models.build_model("resnet18", dict(spatial_dims=spatial_dims, norm="batch", **RESNET))
  variables = model.init(jax.random.key(0), jnp.zeros((1, *spatial, 1)), train=False)
  states, history = _train(model, variables, spatial, steps_count=8)
  assert history[-1] < history[0]
  return model, states[-1].variables(), spatial


def _calibration_batches(spatial, count=4):
  return [{"image": _blobs(8, spatial, seed=10 + i)[0]} for i in range(count)]


@pytest.mark.parametrize("spatial_dims", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ptq_of_a_trained_resnet_keeps_its_predictions(spatial_dims):
  model, variables, spatial = _trained_resnet(spatial_dims)
  qmodel, qvariables = quantize.calibrate_and_quantize(model, variables, _calibration_batches(spatial),
                                                       dict(calibration_batches=3))
  images = _blobs(64, spatial, seed=99)[0]
  reference, _ = model.apply(variables, images, train=False)
  logits, aux = quantize.predict_fn(qmodel, qvariables)(images)
  assert logits.shape == reference.shape and set(aux) == {"features", "stages"}
  agreement = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1)))
  relative = float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference))
  assert agreement >= 0.9 and relative < 0.1, (agreement, relative)
  assert relative > 1e-4  # it is not the float model

  # Storage: every conv / dense kernel is int8 with one float32 scale per output channel, and the statistics
  # of three calibration batches went into each static input scale.
  flat = flax.traverse_util.flatten_dict(qvariables["params"])
  kernels = {p: leaf.array for p, leaf in flat.items() if p[-1] == "kernel"}
  assert len(kernels) == 21
  for path, kernel in kernels.items():
    assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape[-1] == kernel.qvalue.shape[-1], path
  scales = [p for p in flat if p[-1].endswith("_lhs_scale")]
  assert len(scales) == 21 and all(flat[p].array.size == 1 for p in scales)
  floats = quantize.size_bytes(variables)
  assert quantize.size_bytes(qvariables) < 0.3 * floats


def test_the_int8_model_runs_int8_convolutions_and_matches_the_remat_model():
  model, variables, spatial = _trained_resnet(2)
  batches = _calibration_batches(spatial, 2)
  qmodel, qvariables = quantize.calibrate_and_quantize(model, variables, batches, {})
  images = batches[0]["image"]
  text = jax.jit(lambda v, x: qmodel.apply(v, x, train=False)).lower(qvariables, images).as_text()
  convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  assert len(convolutions) == 20 and all("xi8>, tensor<" in line and "xi32>" in line for line in convolutions)
  # Rematerialised blocks hold the same parameters; calibration turns remat off (Qwix cannot under remat).
  remat = model.clone(remat=True)
  rmodel, rvariables = quantize.calibrate_and_quantize(remat, variables, batches, {})
  np.testing.assert_array_equal(rmodel.apply(rvariables, images, train=False)[0],
                                qmodel.apply(qvariables, images, train=False)[0])


def test_ptq_options_exclude_per_tensor_and_minmax():
  model, variables, spatial = _trained_resnet(2)
  batches = _calibration_batches(spatial, 2)
  images = _blobs(32, spatial, seed=7)[0]
  reference, _ = model.apply(variables, images, train=False)

  _, excluded = quantize.calibrate_and_quantize(model, variables, batches, dict(exclude=("stem_conv", "head")))
  params = excluded["params"]
  for name in ("stem_conv", "head"):
    np.testing.assert_array_equal(params[name]["kernel"], variables["params"][name]["kernel"])
    assert set(params[name]) == set(variables["params"][name])  # no input scale either
  assert params["stage1_block0"]["conv1"]["kernel"].array.qvalue.dtype == jnp.int8
  with pytest.raises(ValueError, match=r"exclude: \['stem'\] match no convolution or dense layer; the quantizable "
                                       r"layers are \['head', 'stage1_block0/conv1'"):
    quantize.calibrate_and_quantize(model, variables, batches, dict(exclude=("stem",)))

  qmodel, tensor = quantize.calibrate_and_quantize(model, variables, batches, dict(per_channel=False))
  kernel = tensor["params"]["stage2_block0"]["conv1"]["kernel"].array
  assert kernel.scale.size == 1 and int(jnp.max(jnp.abs(kernel.qvalue))) == 127
  logits, _ = qmodel.apply(tensor, images, train=False)
  assert float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference)) < 0.2

  qmodel, minmax = quantize.calibrate_and_quantize(model, variables, batches, dict(calibration="minmax"))
  conv1 = minmax["params"]["stage1_block0"]["conv1"]
  assert conv1["conv_general_dilated0_lhs_zero_point"].dtype == jnp.int8
  logits, _ = qmodel.apply(minmax, images, train=False)
  assert float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference)) < 0.1


class _TinyNet(nn.Module):
  """Conv (2 -> 4 channels, 3x3, bias) then Dense (4 -> 3) on pooled features; medjax's call signature."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2))), {}


def test_size_bytes_counts_int8_values_one_byte_and_scales_four():
  model = _TinyNet()
  x = jax.random.normal(jax.random.key(0), (4, 6, 5, 2))
  variables = model.init(jax.random.key(1), x, train=False)
  assert quantize.size_bytes(variables) == 4 * (3 * 3 * 2 * 4 + 4 + 4 * 3 + 3)
  _, qvariables = quantize.calibrate_and_quantize(model, variables, [x], {})
  conv = 72 + 4 * 4 + 4 + 4 * 4  # int8 kernel, 4 channel scales, 1 input scale, float bias
  head = 12 + 3 * 4 + 4 + 3 * 4
  assert quantize.size_bytes(qvariables) == conv + head
  assert quantize.size_bytes({"w": jnp.zeros((3, 5), jnp.int4)}) == 8  # packed: 15 values x 4 bits


def test_static_input_scale_is_the_batch_range_averaged_over_batches():
  model = _TinyNet()
  x1 = jax.random.normal(jax.random.key(0), (4, 6, 5, 2))
  x2 = 3.0 * jax.random.normal(jax.random.key(1), (4, 6, 5, 2))
  variables = model.init(jax.random.key(1), x1, train=False)
  _, qvariables = quantize.calibrate_and_quantize(model, variables, [x1, x2, 10 * x2], dict(calibration_batches=2))
  scale = qvariables["params"]["conv"]["conv_general_dilated0_lhs_scale"].array
  expected = (jnp.abs(x1).max() + jnp.abs(x2).max()) / 2 / 127.5  # the third batch is beyond calibration_batches
  np.testing.assert_allclose(scale.reshape(()), expected, rtol=1e-6)
  kernel = qvariables["params"]["conv"]["kernel"].array
  _, reference_scale = quantize.reference_quantize(variables["params"]["conv"]["kernel"], 8, keep_axes=(-1,))
  np.testing.assert_allclose(kernel.scale, reference_scale, rtol=1e-6)  # weights: absmax per output channel


# ---- U-Net, errors ---------------------------------------------------------------------------------------


def test_unet_3d_int8_model_runs_on_another_patch_size():
  model = models.build_model("unet", dict(spatial_dims=3, num_classes=3, features=(8, 16), norm="group"))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  qmodel, qvariables = quantize.calibrate_and_quantize(model, variables, [x, x[::-1]], {})
  # The Upsample einsum stays float (see the module docstring); the convs are int8.
  assert isinstance(qvariables["params"]["up0"]["kernel"], jax.Array)
  assert qvariables["params"]["seg_head"]["kernel"].array.qvalue.dtype == jnp.int8
  other = jax.random.normal(jax.random.key(2), (1, 4, 8, 12, 1))  # static scales are per tensor, not per voxel
  out, _ = quantize.predict_fn(qmodel, qvariables)(other)
  reference, _ = model.apply(variables, other, train=False)
  assert out.shape == reference.shape == (1, 4, 8, 12, 3)
  assert float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)) < 0.1


def test_calibration_refuses_what_it_cannot_quantize():
  model = _TinyNet()
  x = jnp.ones((2, 6, 5, 2))
  variables = model.init(jax.random.key(1), x, train=False)
  with pytest.raises(ValueError, match="no calibration batches"):
    quantize.calibrate_and_quantize(model, variables, [], {})
  with pytest.raises(ValueError, match="act_bits is None: nothing to calibrate"):
    quantize.calibrate(model, variables, [x], dict(mode="qat", act_bits=None))
  with pytest.raises(ValueError, match=r"the int8 model needs act_bits == weight_bits \(6\), got act_bits=8"):
    quantize.calibrate_and_quantize(model, variables, [x], dict(mode="qat", weight_bits=6, act_bits=8))
  assert isinstance(quantize.qat_model(model, {}), type(model))  # a subclass: same fields, same apply
